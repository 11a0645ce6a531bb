"""BYOL (Grill et al., 2020) pretraining on semantic or augmented pairs.

    python byol.py --pairs semantic                  # embedded world, CPU-sized defaults
    python byol.py --pairs augmented --data IMAGENET/train --manifest pairs.csv   # paper settings

Each pair gives two views (view 1 of image_a, view 2 of image_b; for augmented pairs both come
from image_a). The online network (backbone, projector, predictor) predicts the target network's
projection of the other view; the target (backbone, projector) is an exponential moving average
of the online network and receives no gradient. The loss, 2 - 2 cos(prediction, target
projection), is symmetrised over the two views and is per sample, so nothing needs gathering
across processes. LARS, warm-up then cosine to 0; EMA momentum tau on a cosine schedule to 1.
backbone.pth holds the online backbone, the one BYOL evaluates.
"""
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from common import data, ema, optim, transforms, utils
from common.backbones import build_backbone
from common.monitor import embedding_std

# flag: (real data, as in the original publication; embedded world on 2 CPU cores).
# BYOL's presets exist for 100 and 300 epochs (lr 0.45 / 0.3, wd 1e-6, tau 0.99); the study's
# 200 epochs use the 300-epoch one.
DEFAULTS = {
    "optimizer": ("lars", "adamw"),  # LARS barely moves the world's small net in ~200 steps (see simclr.py)
    "lr": (0.3, 4e-3),  # scaled by batch / 256
    "weight_decay": (1e-6, 1e-6),
    "tau": (0.99, 0.99),  # base EMA momentum of the target
    "hidden_dim": (4096, 1024),  # projector and predictor hidden width
    "proj_dim": (256, 128),
}


def mlp(in_dim, hidden_dim, out_dim):
    """BYOL's projector and predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class BYOL(nn.Module):
    """The online network; `encoder` (backbone and projector) is the part the target copies."""

    def __init__(self, backbone, feat_dim, hidden_dim, proj_dim):
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(backbone=backbone, projector=mlp(feat_dim, hidden_dim, proj_dim)))
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim)

    def forward(self, x1, x2):
        # One pass per view, so BatchNorm normalises each view over its own batch, as in BYOL's code.
        return self.predictor(self.encoder(x1)), self.predictor(self.encoder(x2))


def regression_loss(prediction, target):
    """2 - 2 cos(prediction, target) per sample (the squared distance of the L2-normalised vectors), averaged."""
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=-1)).mean()


def byol_loss(model, target, x1, x2):
    """BYOL loss of a batch of pairs, and the first view's predictions (for the collapse monitor):
    each view's prediction regresses the target's projection of the other view. The loss is a
    mean over this process's samples; DDP's averaging of the gradients makes it the global mean."""
    p1, p2 = model(x1, x2)
    with torch.no_grad():  # the target runs in training mode too: BatchNorm uses batch statistics
        z1, z2 = target(x1), target(x2)
    return regression_loss(p1.float(), z2.float()) + regression_loss(p2.float(), z1.float()), p1


def parse_args(argv=None, real_data=None):
    """The flags, unset ones filled with the real-data or the world's defaults (utils.resolve_defaults)."""
    return utils.resolve_defaults(utils.base_parser("byol", DEFAULTS).parse_args(argv), real_data)


def build(args, run):
    """The online network, the target and the optimizer, on the run's device."""
    # zero_init_residual: BYOL's ResNet starts each residual block's last BN scale at 0 (RECIPES.md).
    backbone, feat_dim = build_backbone(args.arch, args.img_size, args.width, weights=args.init_backbone,
                                        zero_init_residual=True)
    online = BYOL(backbone, feat_dim, args.hidden_dim, args.proj_dim)
    target = copy.deepcopy(online.encoder)
    model, target = run.prepare(online), run.prepare(target)
    target.requires_grad_(False)  # after prepare: DDP wraps only modules with trainable parameters
    optimizer = optim.OPTIMIZERS[args.optimizer](optim.param_groups(model, args.weight_decay))
    return model, target, optimizer


def schedules(args, steps_per_epoch):
    """Per-step values of train_step's scheduled arguments."""
    return {"lr": optim.cosine_schedule(args.lr * args.batch_size / 256, 0.0, args.epochs, steps_per_epoch,
                                        args.warmup_epochs),
            "tau": ema.momentum_schedule(args.tau, args.epochs, steps_per_epoch)}


def train_step(model, target, optimizer, run, args, views, lr, tau):
    """One optimisation step on a batch of pairs (views: [view 1, view 2]) and the target's EMA
    update; returns the loss and the first view's predictions."""
    optim.set_lr(optimizer, lr)
    x1, x2 = views
    with run.autocast():
        loss, p1 = byol_loss(model, target, x1, x2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema.ema_update(run.unwrap(target), run.unwrap(model).encoder, tau)
    return loss, p1


def main():
    args = parse_args()
    run = utils.Run(args)
    pair_views = transforms.pair_views("byol", args.img_size, args.transforms, (args.min_crop_scale, 1.0))
    loader = run.loader(data.pretrain_dataset(args, pair_views))
    model, target, optimizer = build(args, run)
    schedule = schedules(args, len(loader))
    start_epoch = run.resume(model=model, target=target, optimizer=optimizer)

    for epoch in range(start_epoch, args.epochs):
        for step, (*views, _) in run.steps(loader, epoch):
            values = {name: values[step].item() for name, values in schedule.items()}
            loss, p1 = train_step(model, target, optimizer, run, args, views, **values)
            run.log(loss, **values, embedding_std=embedding_std(p1))
        run.end_epoch(epoch, run.unwrap(model).encoder.backbone)
    run.finish(run.unwrap(model).encoder.backbone)


if __name__ == "__main__":
    utils.run_main(main)
