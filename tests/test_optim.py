"""LARS with foreach ops against the per-parameter loop it replaced (the loop is kept here as the reference)."""
import copy

import pytest
import torch
from torch import nn

from common import optim


class LoopLARS(torch.optim.Optimizer):
    """The former per-parameter LARS, one tensor at a time."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                    update.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
                          nn.Linear(10, 4, bias=False))
    nn.init.zeros_(model[4].weight)  # a zero-norm weight: trust ratio 1
    model[1].weight.requires_grad_(False)  # a parameter without gradient is left alone
    return model


def train(optimizer_class, device, steps=5):
    model = net().to(device)
    optimizer = optimizer_class(optim.param_groups(model, weight_decay=1e-4), lr=0.5)
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, device=device)
        loss = model(x).square().mean() + model(x).sum() * 1e-3
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, optimizer


def test_foreach_lars_updates_are_identical_to_the_per_parameter_loop_on_cpu():
    ours, ours_opt = train(optim.LARS, "cpu")
    loop, loop_opt = train(LoopLARS, "cpu")
    for a, b in zip(ours.parameters(), loop.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(ours[1].weight, net()[1].weight)  # no gradient: unchanged
    buffers = lambda opt: [s["momentum_buffer"] for s in opt.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(buffers(ours_opt), buffers(loop_opt)))
    # the checkpoint format is unchanged: the loop's state dict loads into the foreach optimizer
    copy.deepcopy(ours_opt).load_state_dict(loop_opt.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_foreach_lars_matches_the_loop_on_cuda_within_rounding():
    # CUDA's multi-tensor norm sums in another order than Tensor.norm: equal to float32 rounding.
    ours, _ = train(optim.LARS, "cuda")
    loop, _ = train(LoopLARS, "cuda")
    for a, b in zip(ours.parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
