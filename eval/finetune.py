"""Full fine-tuning of a pretrained backbone with a new linear head: the study's Table 3 (DINO
ViT-S/8 fine-tuned on CIFAR-10, CIFAR-100 and STL-10). Works for every backbone of common.backbones.

    python -m eval.finetune --checkpoint RUN/backbone.pth --dataset cifar10 --data-root DATA
    python -m eval.finetune --checkpoint RUN/backbone.pth --dataset embedded --epochs 30 --batch-size 64

Recipe: MAE's ViT fine-tuning recipe (He et al. 2022, facebookresearch/mae FINETUNE.md and
main_finetune.py; layer-wise decay from BEiT), without its RandAugment, mixup, cutmix and random
erasing, so that only the pretraining differs between SP and AP runs:
- model: the backbone (all layers trained, BatchNorm in training mode) and a zero-initialised
  linear head on its pooled features; ViT drop path 0.1;
- AdamW (betas 0.9, 0.999), lr = 5e-4 * batch / 256, weight decay 0.05 on weights (none on biases,
  norms, the ViT's position embedding and class token); on ViTs layer-wise lr decay 0.65
  (block k of 12 gets 0.65^(13 - k) of the lr, the head and final norm all of it);
- 100 epochs, batch 256, linear warm-up for 5 epochs, then cosine to 1e-6, per iteration;
- cross-entropy with label smoothing 0.1; bf16 autocast on CUDA;
- training view: RandomResizedCrop(img_size, scale (0.08, 1), bicubic) + horizontal flip, seeded
  per image and epoch (common.data.SeededBatchSampler); test view: the probes' centre view
  (eval.datasets), one evaluation after the last epoch.
A checkpoint is written after every epoch (RUN/finetune/<dataset>[-<split>]-<crop>-s<seed>/
checkpoint.pth); --resume continues from it. The result file follows eval/report.py's schema (eval "finetune").
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from common import flags, optim, utils
from common.backbones import build_backbone
from common.data import ImageError, SeededBatchSampler, make_loader
from common.features import extract_features
from common.transforms import to_tensor
from eval import report
from eval.datasets import (Views, add_eval_args, data_root, eval_view, labelled_images, load_for_eval, result_path,
                           view_protocol)


class FineTuned(nn.Module):
    def __init__(self, backbone, dim, num_classes):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes)
        # A zero head starts from uniform predictions and leaves the pretrained features untouched
        # by the first step's gradients.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.backbone(x))


def param_groups(model, arch, weight_decay, layer_decay):
    """AdamW groups, each with an `lr_scale`. On ViTs, MAE's layer-wise decay: with depth L, the
    stem (patch embedding, position embedding, class token) is layer 0, block i layer i + 1, the
    rest (final norm, head) layer L + 1, and layer l gets layer_decay^(L + 1 - l) of the lr.
    No weight decay on biases, norms, and the ViT's position embedding and class token."""
    vit = arch.startswith("vit")
    depth = len(model.backbone.blocks) if vit else 0
    no_decay = set(model.backbone.no_weight_decay()) if vit else set()
    groups = {}
    for name, p in model.named_parameters():
        inner = name.removeprefix("backbone.")
        layer = depth + 1
        if vit and inner != name and inner.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif vit and inner != name and inner.startswith("blocks."):
            layer = int(inner.split(".")[1]) + 1
        decay = 0.0 if p.ndim <= 1 or inner in no_decay else weight_decay
        groups.setdefault((layer_decay ** (depth + 1 - layer), decay), []).append(p)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay} for (scale, decay), params in groups.items()]


def train_view(img_size):
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                            antialias=True),
                       v2.RandomHorizontalFlip(), to_tensor()])


def main(argv=None):
    parser = flags.Parser(prog="python -m eval.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    parser.add_argument("--epochs", type=flags.POSITIVE_INT, default=100)
    parser.add_argument("--lr", type=flags.POSITIVE, default=5e-4, help="base lr, scaled by batch / 256")
    parser.add_argument("--min-lr", type=flags.NON_NEGATIVE, default=1e-6)
    parser.add_argument("--warmup-epochs", type=flags.COUNT, default=5, help="0: none")
    parser.add_argument("--weight-decay", type=flags.NON_NEGATIVE, default=0.05)
    parser.add_argument("--layer-decay", type=flags.FRACTION, default=0.65, help="ViT only, in (0, 1]; 1 turns it off")
    parser.add_argument("--drop-path", type=flags.bounded(float, 0, 1, high_open=True), default=0.1,
                        help="ViT only, in [0, 1)")
    parser.add_argument("--label-smoothing", type=flags.bounded(float, 0, 1, high_open=True), default=0.1,
                        help="in [0, 1)")
    parser.add_argument("--resume", action="store_true", help="continue from the fine-tuning checkpoint")
    args = parser.parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    backbone, dim = load_for_eval(args)
    if args.arch.startswith("vit") and args.drop_path > 0:
        backbone_with_drop_path = build_backbone(args.arch, args.run.get("img_size") or 224,
                                                 drop_path_rate=args.drop_path)[0]
        backbone_with_drop_path.load_state_dict(backbone.state_dict())
        backbone = backbone_with_drop_path
    images, classes = labelled_images(args.dataset, data_root(args), "train", args.split)
    train = Views(images, train_view(args.img_size), args.seed)
    if len(train) < args.batch_size:
        raise ImageError(f"{len(train)} training images, fewer than one batch of {args.batch_size}")
    sampler = SeededBatchSampler(len(train), args.batch_size, args.seed)
    loader = make_loader(train, sampler, args.workers, device)

    model = FineTuned(backbone, dim, len(classes)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.arch, args.weight_decay, args.layer_decay), lr=0.0)
    lr_schedule = optim.cosine_schedule(args.lr * args.batch_size / 256, args.min_lr, args.epochs, len(loader),
                                        args.warmup_epochs)
    out = result_path(args, "finetune", args.crop)
    split = f"-{args.split}" if args.dataset == "embedded" else ""
    checkpoint = (Path(args.checkpoint).parent / "finetune" / f"{args.dataset}{split}-{args.crop}-s{args.seed}"
                  / "checkpoint.pth")
    first_epoch = 0
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        first_epoch = state["epoch"]
        print(f"resumed from {checkpoint} at epoch {first_epoch}", file=sys.stderr)

    for epoch in range(first_epoch, args.epochs):
        model.train()
        sampler.set_epoch(epoch)
        losses = []
        for i, (x, y) in enumerate(loader):
            step = epoch * len(loader) + i
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step]) * group["lr_scale"]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), y.to(device), label_smoothing=args.label_smoothing)
            if not math.isfinite(loss.item()):
                raise utils.NonFiniteLoss(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        utils.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                           "rng": torch.get_rng_state()}, checkpoint)
        print(json.dumps({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "lr": float(lr_schedule[step])}),
              file=sys.stderr)

    test_images, _ = labelled_images(args.dataset, args.data_root, "test", args.split)
    test = Views(test_images, eval_view(args.img_size, args.crop), args.seed)
    logits, labels = extract_features(model, test, device, args.batch_size, args.workers)
    acc = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    protocol = {"name": "full-finetune (MAE recipe without RandAugment/mixup/cutmix/erasing)",
                "finetune_epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "AdamW(0.9, 0.999)",
                "base_lr": args.lr, "lr": args.lr * args.batch_size / 256, "min_lr": args.min_lr,
                "warmup_epochs": args.warmup_epochs, "weight_decay": args.weight_decay,
                "layer_decay": args.layer_decay if args.arch.startswith("vit") else None,
                "drop_path": args.drop_path if args.arch.startswith("vit") else None,
                "label_smoothing": args.label_smoothing,
                "train_view": {"img_size": args.img_size, "crop": "RandomResizedCrop(0.08, 1) + flip"},
                "test_view": view_protocol(args.img_size, args.crop, args.seed)}
    record = report.result_record(args, "finetune", accuracy=acc, num_classes=len(classes), num_train=len(train),
                                  num_test=len(test), protocol=protocol, time_s=time.time() - start)
    path = report.write_result(record, out)
    print(json.dumps({k: record[k] for k in ("eval", "dataset", "split", "crop", "accuracy")} | {"out": str(path)}))


if __name__ == "__main__":
    utils.run_main(main)
