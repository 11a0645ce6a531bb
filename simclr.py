"""SimCLR (Chen et al., 2020) pretraining on semantic or augmented pairs.

    python simclr.py --pairs semantic                  # embedded world, CPU-sized defaults
    python simclr.py --pairs augmented --data IMAGENET/train --manifest pairs.csv   # paper settings

Each pair gives two views (view 1 of image_a, view 2 of image_b; for augmented pairs both come
from image_a). The NT-Xent loss treats each view's partner as its positive and the other
2N-2 views of the (global) batch as negatives. LARS, linear warm-up then cosine decay.
"""
import torch
from torch import nn

from common import data, distributed, losses, optim, transforms, utils
from common.backbones import build_backbone
from common.monitor import embedding_std

# flag: (real data, as in the original publication; embedded world on 2 CPU cores)
DEFAULTS = {
    # LARS at SimCLR's lr moves a small net too little in the world's ~450 steps (loss stays at
    # chance); AdamW trains it. Either way the setting is the same for semantic and augmented pairs.
    "optimizer": ("lars", "adamw"),
    "lr": (0.3, 4e-3),  # scaled by batch / 256
    "weight_decay": (1e-6, 1e-6),
    "temperature": (0.1, 0.2),
    "proj_dim": (128, 128),
    # SimCLR v1 ends its head with BatchNorm (a scale, no shift) on the 128-d output and sums the
    # two directions' losses (loss_a + loss_b: twice the mean over 2N anchors), which doubles the
    # step of the BatchNorm and bias parameters LARS does not adapt. The world has the output
    # BatchNorm too, for its better augmented-pair probe (criterion c, README); the loss stays a mean.
    "proj_out_bn": (True, True),
    "loss_scale": (2.0, 1.0),  # multiplies NT-Xent's mean over the 2N anchors
}


class SimCLR(nn.Module):
    """Backbone plus projection head, hidden width = feature width: Linear-BN-ReLU-Linear, and with
    out_bn SimCLR v1's BatchNorm on the output (the Linear before it without bias, the BatchNorm
    with a scale and no shift: model_util.py's linear_layer with center=False)."""

    def __init__(self, backbone, feat_dim, proj_dim, out_bn=False):
        super().__init__()
        self.backbone = backbone
        layers = [nn.Linear(feat_dim, feat_dim, bias=False), nn.BatchNorm1d(feat_dim), nn.ReLU(inplace=True),
                  nn.Linear(feat_dim, proj_dim, bias=not out_bn)]
        if out_bn:
            layers.append(nn.BatchNorm1d(proj_dim))
            layers[-1].bias.requires_grad_(False)  # stays 0: no shift
        self.projector = nn.Sequential(*layers)

    def forward(self, x):
        """(the embeddings, the same before the output BatchNorm). The collapse monitor reads the
        second: a BatchNorm's output spreads over every dimension by construction, collapsed or not."""
        before_bn = self.projector[:4](self.backbone(x))  # Linear-BN-ReLU-Linear
        return self.projector[4:](before_bn), before_bn  # then the output BatchNorm, if any


def simclr_loss(model, x1, x2, temperature, scale=1.0):
    """NT-Xent of a batch of pairs (times `scale`), and the first view's embeddings before any
    output BatchNorm (for the collapse monitor). Both views go through the network together
    (BatchNorm over the 2N views, as in SimCLR's code); the embeddings are gathered across
    processes, so every process's negatives are the whole global batch and the gradients those of
    one process."""
    z, before_bn = model(torch.cat([x1, x2]))
    z1, z2 = z.float().chunk(2)
    loss = scale * losses.nt_xent(distributed.gather(z1), distributed.gather(z2), temperature)
    return loss, before_bn[:len(x1)]


def parse_args(argv=None, real_data=None):
    """The flags, unset ones filled with the real-data or the world's defaults (utils.resolve_defaults)."""
    return utils.resolve_defaults(utils.base_parser("simclr", DEFAULTS).parse_args(argv), real_data)


def build(args, run):
    """The network and its optimizer, on the run's device."""
    # zero_init_residual: SimCLR's ResNet starts each residual block's last BN scale at 0 (RECIPES.md).
    backbone, feat_dim = build_backbone(args.arch, args.img_size, args.width, weights=args.init_backbone,
                                        zero_init_residual=True)
    model = run.prepare(SimCLR(backbone, feat_dim, args.proj_dim, args.proj_out_bn))
    optimizer = optim.OPTIMIZERS[args.optimizer](optim.param_groups(model, args.weight_decay))
    return model, optimizer


def schedules(args, steps_per_epoch):
    """Per-step values of train_step's scheduled arguments."""
    return {"lr": optim.cosine_schedule(args.lr * args.batch_size / 256, 0.0, args.epochs, steps_per_epoch,
                                        args.warmup_epochs)}


def train_step(model, optimizer, run, args, views, lr):
    """One optimisation step on a batch of pairs (views: [view 1, view 2]); returns the loss and the
    first view's embeddings before any output BatchNorm."""
    optim.set_lr(optimizer, lr)
    x1, x2 = views
    with run.autocast():
        loss, z1 = simclr_loss(model, x1, x2, args.temperature, args.loss_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, z1


def main():
    args = parse_args()
    run = utils.Run(args)
    pair_views = transforms.pair_views("simclr", args.img_size, args.transforms, (args.min_crop_scale, 1.0))
    loader = run.loader(data.pretrain_dataset(args, pair_views))
    model, optimizer = build(args, run)
    schedule = schedules(args, len(loader))
    start_epoch = run.resume(model=model, optimizer=optimizer)

    for epoch in range(start_epoch, args.epochs):
        for step, (*views, _) in run.steps(loader, epoch):
            values = {name: values[step].item() for name, values in schedule.items()}
            loss, z1 = train_step(model, optimizer, run, args, views, **values)
            run.log(loss, **values, embedding_std=embedding_std(z1))
        run.end_epoch(epoch, run.unwrap(model).backbone)
    run.finish(run.unwrap(model).backbone)


if __name__ == "__main__":
    utils.run_main(main)
