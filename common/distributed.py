"""torch.distributed for the training scripts: process setup from torchrun or SLURM, a gather
with exact gradients, synchronised BatchNorm on any device, and global means.

Under torchrun the environment holds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
under SLURM (srun, or submitit's job arrays) they are derived from SLURM's own variables.
"""
import os

import torch
import torch.distributed as dist
from torch import nn


def init(device):
    """Joins the process group when launched as several processes; returns (rank, world size,
    device), the device being this process's GPU on CUDA."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for our rows: with each process
    computing the loss of the whole gathered batch, the parameter gradients after DDP's averaging
    equal those of one process on the global batch (neither dropped nor off by the world size)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum that every process uses is the sum of theirs."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather(x):
    """Concatenates x over all processes, differentiably; x itself in a single process."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def global_mean(x):
    """The mean of a per-process quantity over all processes (e.g. DINO's batch centre)."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch, differentiable, for devices where torch's SyncBatchNorm
    is unavailable (it refuses CPU tensors, so multi-process CPU runs and their tests use this).
    Statistics come from all-reduced sums, whose backward all-reduces the gradients."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x32.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x32.sum(dims), count]))
        mean, n = sums[:-1] / sums[-1], sums[-1]
        # Two passes (mean, then squared deviations), as E[x^2] - mean^2 cancels catastrophically
        # in float32 when the mean is large against the spread.
        centred = x32 - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), momentum)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module, device):
    """module with every BatchNorm layer (itself included) synchronised over the processes:
    torch's SyncBatchNorm on CUDA, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        bn = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        # Take over the layer's own parameters and buffers (device, dtype and values) and mode.
        bn._parameters, bn._buffers, bn.training = module._parameters, module._buffers, module.training
        return bn
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module
