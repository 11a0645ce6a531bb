"""Optimizers and per-iteration schedules shared by the training scripts and the evaluations:
the weight-decay groups, LARS, the `--optimizer` choices and the cosine schedule."""
import functools

import numpy as np
import torch


def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Per-iteration values: linear warm-up from warmup_start to base, then cosine to final."""
    warmup_epochs = min(warmup_epochs, epochs)
    warmup = np.linspace(warmup_start, base, warmup_epochs * steps_per_epoch, endpoint=False)
    steps = np.arange(epochs * steps_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def param_groups(model, weight_decay):
    """Weights get weight decay and LARS adaptation; biases and norm parameters get neither."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "lars": True},
            {"params": rest, "weight_decay": 0.0, "lars": False}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017), as in SimCLR, BYOL and
    VICReg: the update of each weight tensor is rescaled by eta * ||w|| / ||g + wd * w||.

    Each group is updated with torch._foreach ops, a few kernels per group instead of several per
    parameter. timm's Lars is not used: its trust ratio divides by ||g|| + wd * ||w|| + eps (an
    upper bound of ||g + wd * w||; timm/optim/lars.py, _lars_trust_ratio), so its updates differ."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = torch._foreach_add([p.grad for p in params], params, alpha=group["weight_decay"])
            if group["lars"]:
                w_norms = torch.stack(torch._foreach_norm(params))
                u_norms = torch.stack(torch._foreach_norm(updates))
                trust = torch.where((w_norms > 0) & (u_norms > 0), group["eta"] * w_norms / u_norms, 1.0)
                torch._foreach_mul_(updates, list(trust.unbind()))
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


# Per-method `--optimizer` choices; each script's DEFAULTS names its publication's and the world's.
OPTIMIZERS = {"lars": LARS, "adamw": torch.optim.AdamW, "sgd": functools.partial(torch.optim.SGD, momentum=0.9)}


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = float(lr)  # a numpy scalar would not load with weights_only=True
