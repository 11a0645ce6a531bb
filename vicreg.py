"""VICReg (Bardes et al., 2022) pretraining on semantic or augmented pairs.

    python vicreg.py --pairs semantic                  # embedded world, CPU-sized defaults
    python vicreg.py --pairs augmented --data IMAGENET/train --manifest pairs.csv   # paper settings

Each pair gives two views (view 1 of image_a, view 2 of image_b; for augmented pairs both come
from image_a), embedded by one backbone and expander. The loss pulls the two embeddings together
(invariance), keeps each dimension's standard deviation over the batch above 1 (variance) and
decorrelates the dimensions (covariance); the embeddings are gathered from all processes first,
so variance and covariance are those of the global batch. LARS, warm-up, cosine to lr / 1000.
"""
from torch import nn

from common import data, distributed, losses, optim, transforms, utils
from common.backbones import build_backbone
from common.monitor import embedding_std

# flag: (real data, as in the original publication; embedded world on 2 CPU cores)
DEFAULTS = {
    "optimizer": ("lars", "adamw"),  # LARS barely moves the world's small net in ~200 steps (see simclr.py)
    "lr": (0.2, 4e-3),  # scaled by batch / 256
    "weight_decay": (1e-6, 1e-6),
    "expander": ("8192-8192-8192", "1024-1024-1024"),  # 8192 wide is 3x the CPU convnet's compute
    "sim_coeff": (25.0, 25.0),
    "std_coeff": (25.0, 25.0),
    "cov_coeff": (1.0, 1.0),
}


class VICReg(nn.Module):
    """Backbone plus expander: (Linear-BN-ReLU) for every hidden width, then a Linear without bias."""

    def __init__(self, backbone, feat_dim, expander):
        super().__init__()
        self.backbone = backbone
        dims = [feat_dim] + [int(d) for d in expander.split("-")]
        layers = []
        for d_in, d_out in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        self.expander = nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1], bias=False))

    def forward(self, x1, x2):
        # One pass per view, so BatchNorm normalises each view over its own batch, as VICReg's code does.
        return self.expander(self.backbone(x1)), self.expander(self.backbone(x2))


def vicreg_loss(model, x1, x2, sim_coeff, std_coeff, cov_coeff):
    """VICReg loss of a batch of pairs, and the first view's embeddings (for the collapse monitor).
    The embeddings are gathered with gradient: each process's loss is the global-batch loss, and
    after DDP's averaging the gradients are those of one process seeing the whole batch."""
    z1, z2 = model(x1, x2)
    loss = losses.vicreg_loss(distributed.gather(z1.float()), distributed.gather(z2.float()),
                              sim_coeff, std_coeff, cov_coeff)
    return loss, z1


def parse_args(argv=None, real_data=None):
    """The flags, unset ones filled with the real-data or the world's defaults (utils.resolve_defaults)."""
    return utils.resolve_defaults(utils.base_parser("vicreg", DEFAULTS).parse_args(argv), real_data)


def build(args, run):
    """The network and its optimizer, on the run's device."""
    # zero_init_residual: VICReg's ResNet starts each residual block's last BN scale at 0 (RECIPES.md).
    backbone, feat_dim = build_backbone(args.arch, args.img_size, args.width, weights=args.init_backbone,
                                        zero_init_residual=True)
    model = run.prepare(VICReg(backbone, feat_dim, args.expander))
    optimizer = optim.OPTIMIZERS[args.optimizer](optim.param_groups(model, args.weight_decay))
    return model, optimizer


def schedules(args, steps_per_epoch):
    """Per-step values of train_step's scheduled arguments."""
    base_lr = args.lr * args.batch_size / 256
    return {"lr": optim.cosine_schedule(base_lr, base_lr / 1000, args.epochs, steps_per_epoch, args.warmup_epochs)}


def train_step(model, optimizer, run, args, views, lr):
    """One optimisation step on a batch of pairs (views: [view 1, view 2]); returns the loss and the first view's embeddings."""
    optim.set_lr(optimizer, lr)
    x1, x2 = views
    with run.autocast():
        loss, z1 = vicreg_loss(model, x1, x2, args.sim_coeff, args.std_coeff, args.cov_coeff)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, z1


def main():
    args = parse_args()
    run = utils.Run(args)
    pair_views = transforms.pair_views("vicreg", args.img_size, args.transforms, (args.min_crop_scale, 1.0))
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
