"""Reference points for the SSL runs: a supervised ceiling and a random-init floor.

    python -m eval.baselines supervised [flags]   # same backbone, images, views and budget, with labels
    python -m eval.baselines random [flags]       # untrained backbone

Both take the method scripts' flags and write the same outputs (config.json with pairs set to
"supervised" or "random", log.jsonl, backbone.pth), so probes and reports treat them alike.
The supervised run sees exactly what SimCLR on semantic pairs sees (both images of every
pair, through the same view pipeline, for the same epochs and batch size) and learns a linear
classifier on top with cross-entropy. The random backbone keeps its initial weights; only its
BatchNorm statistics are estimated on the pretraining images, since a frozen random network with
BN statistics of (0, 1) would give features of an arbitrary scale per layer.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from common import data, optim, transforms, utils
from common.backbones import build_backbone

# flag: (real data, embedded world); SGD with the usual supervised ResNet settings.
DEFAULTS = {
    "lr": (0.1, 0.1),  # scaled by batch / 256
    "weight_decay": (1e-4, 5e-4),
}


def supervised(args, run, dataset, loader, backbone, feat_dim):
    model = run.prepare(nn.Sequential(backbone, nn.Linear(feat_dim, len(dataset.classes))))
    optimizer = torch.optim.SGD(optim.param_groups(model, args.weight_decay), lr=0.0, momentum=0.9, nesterov=True)
    lr_schedule = optim.cosine_schedule(args.lr * args.batch_size / 256, 0.0, args.epochs, len(loader),
                                        args.warmup_epochs)
    start_epoch = run.resume(model=model, optimizer=optimizer)
    for epoch in range(start_epoch, args.epochs):
        for step, (x1, x2, y) in run.steps(loader, epoch):
            optim.set_lr(optimizer, lr_schedule[step])
            with run.autocast():
                logits = model(torch.cat([x1, x2])).float()
            loss = F.cross_entropy(logits, torch.cat([y, y]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(loss, lr=lr_schedule[step])
        run.end_epoch(epoch, run.unwrap(model)[0])


@torch.no_grad()
def estimate_bn_statistics(run, loader, backbone, batches=20):
    """Cumulative-average BN statistics over a few batches of pretraining views."""
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    backbone.train()
    for step, (x1, x2, _) in run.steps(loader, 0):
        backbone(torch.cat([x1, x2]))
        if step + 1 >= batches:
            break
    run.write_log(epoch=0, knn_top1=run.knn(backbone))


def main():
    kind = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ("supervised", "random") else None
    if kind is None:
        sys.exit("usage: python -m eval.baselines supervised|random [flags]")
    args = utils.base_parser(kind, DEFAULTS, prog=f"python -m eval.baselines {kind}").parse_args()
    args.pairs, args.out = kind, args.out or f"runs/{kind}-s{args.seed}"
    args = utils.resolve_defaults(args)
    run = utils.Run(args)
    # The images and views SimCLR sees on semantic pairs.
    views = transforms.pair_views("simclr", args.img_size, args.transforms, (args.min_crop_scale, 1.0))
    dataset = data.pretrain_dataset(args, views, mode="semantic")
    loader = run.loader(dataset)
    backbone, feat_dim = build_backbone(args.arch, args.img_size, args.width, weights=args.init_backbone)
    if kind == "supervised":
        supervised(args, run, dataset, loader, backbone, feat_dim)
    else:
        estimate_bn_statistics(run, loader, run.prepare(backbone, sync_bn=False))
    run.finish(backbone)


if __name__ == "__main__":
    utils.run_main(main)
