"""DINO (Caron et al., 2021) pretraining on semantic or augmented pairs, ResNet-50 or ViT-S/8.

    python dino.py --pairs semantic                  # embedded world, CPU-sized defaults
    python dino.py --pairs augmented --data IMAGENET/train --manifest pairs.csv   # ResNet-50, SGD
    python dino.py --pairs semantic --data IMAGENET/train --arch vit_small_patch8 --epochs 300   # the paper's 5.2

Each pair gives two global views (view 1 of image_a, view 2 of image_b; for augmented pairs both
come from image_a) and, with --local-crops N, N small crops taken alternately from image_a and
image_b. The teacher, an exponential moving average of the student, sees the global views; the
student sees every view. Both end in the DINO head (MLP, L2-normalised bottleneck, weight-normalised
layer to out_dim logits). The loss is the cross-entropy between the teacher's centred, sharpened
softmax and the student's softmax over every (teacher view, other student view) pair; the centre is
a running mean of the teacher's outputs over the global batch. backbone.pth holds the teacher's
backbone, the one DINO's own evaluations use.

Optimisation follows DINO's code for each backbone: ResNets (and the CPU convnet) use SGD with
constant weight decay; ViT-S/8 uses AdamW with a cosine weight-decay schedule, drop path 0.1, a
teacher-temperature warm-up and an unfrozen weight-norm scale in the last layer. Both clip each
parameter's gradient norm and keep the last layer frozen during the first epoch.
"""
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from common import data, distributed, ema, optim, transforms, utils
from common.backbones import build_backbone
from common.monitor import embedding_std

# flag: (real data, as in the original publication; embedded world on 2 CPU cores); the ResNet
# recipe (DINO's README command for ResNet-50). VIT_RECIPE replaces it for unset flags on ViT-S/8.
DEFAULTS = {
    "optimizer": ("sgd", "adamw"),  # SGD barely moves the world's small net in ~200 steps (see simclr.py)
    "lr": (0.03, 4e-3),  # scaled by batch / 256
    "min_lr": (1e-6, 1e-6),
    "weight_decay": (1e-4, 1e-4),
    "weight_decay_end": (1e-4, 1e-4),
    # Teacher EMA. DINO's default is 0.996 at batch 1024; its --momentum_teacher help recommends
    # 0.9995 at batch 256, the study's. The world's runs are ~200 steps: at 0.996 the teacher
    # would end them still two-thirds its random initialisation.
    "momentum_teacher": (0.9995, 0.99),
    # Global crop scale (the shared --min-crop-scale, overridden): DINO recommends (0.14, 1) when
    # local crops are off, as in the study (its default (0.4, 1) is for multi-crop, used with --local-crops).
    "min_crop_scale": (0.14, 0.2),
    # The shared --warmup-epochs, overridden on the world: 5 instead of 2 steadies DINO's runs
    # (criterion e, README); DINO's own 10 is kept on real data.
    "warmup_epochs": (10, 5),
    "out_dim": (65536, 4096),  # 65536 logits would cost more than the CPU convnet itself
    "student_temp": (0.1, 0.1),
    "teacher_temp": (0.04, 0.04),
    "teacher_temp_warmup_epochs": (30, 3),  # linear from 0.04 to --teacher-temp
    "center_momentum": (0.9, 0.9),
    "clip_grad": (3.0, 3.0),  # per-parameter gradient norm; 0 turns clipping off
    "freeze_last_layer": (1, 1),  # epochs
    "local_crops": (0, 0),  # the study uses the two global views only
    # DINO's --use_bn_in_head. The world's small convnet gives every image nearly the same
    # features at first (mean cosine 0.86): without BatchNorm the head's outputs differ too
    # little across images for the teacher's sharpening to beat centring, and both go uniform.
    "bn_in_head": (False, True),
}
VIT_RECIPE = {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "teacher_temp": 0.07}


class DINOHead(nn.Module):
    """Three-layer MLP (hidden 2048, GELU; BatchNorm before each GELU with bn) to a 256-d
    bottleneck, L2-normalised, then a weight-normalised linear layer to out_dim; its norm stays 1
    when norm_last_layer."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True, hidden_dim=2048, bottleneck_dim=256, bn=False):
        super().__init__()
        norm = nn.BatchNorm1d if bn else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), norm(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0
        scale.data.fill_(1.0)
        scale.requires_grad = not norm_last_layer

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINO(nn.Module):
    def __init__(self, backbone, feat_dim, out_dim, norm_last_layer, bn_in_head=False):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(feat_dim, out_dim, norm_last_layer, bn=bn_in_head)

    def forward(self, crops):
        """Logits of a list of view batches, stacked view by view. Views of one size go through the
        backbone together (BatchNorm statistics over both global views, as in DINO's code)."""
        groups = itertools.groupby(crops, key=lambda crop: crop.shape[-1])
        feats = [self.backbone(torch.cat(list(same_size))) for _, same_size in groups]
        return self.head(torch.cat(feats))


def teacher_targets(teacher_out, center, teacher_temp):
    """The teacher's centred and sharpened softmax: centring keeps one dimension from dominating,
    a low temperature keeps the output from going uniform (DINO's two guards against collapse)."""
    return F.softmax((teacher_out - center) / teacher_temp, dim=-1)


def dino_loss(student_out, targets, student_temp):
    """Mean over pairs (teacher view i, student view v != i) of the cross-entropy H(target_i, student_v).
    student_out: (V * B, K) logits of all V views; targets: (2 * B, K) teacher targets of the global views."""
    targets = targets.detach().chunk(2)
    student_logp = F.log_softmax(student_out / student_temp, dim=-1).chunk(len(student_out) // len(targets[0]))
    terms = [-(q * logp).sum(-1).mean() for i, q in enumerate(targets)
             for v, logp in enumerate(student_logp) if v != i]
    return sum(terms) / len(terms)


@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """center <- momentum * center + (1 - momentum) * the teacher's mean logits over the global batch."""
    center.mul_(momentum).add_(distributed.global_mean(teacher_out.mean(0)), alpha=1 - momentum)


def dino_step_loss(student, teacher, crops, center, teacher_temp, student_temp, center_momentum):
    """DINO loss of a batch of crops (the first two global), and the teacher targets (for the
    collapse monitor); moves the centre, after the targets have used it, as DINO's loss does.
    The loss is a mean over this process's samples (DDP's averaging of the gradients makes it the
    global mean); the teacher's BatchNorm and the centre use the global batch."""
    with torch.no_grad():
        teacher_out = teacher(crops[:2]).float()
    student_out = student(crops).float()
    targets = teacher_targets(teacher_out, center, teacher_temp)
    update_center(center, teacher_out, center_momentum)
    return dino_loss(student_out, targets, student_temp), targets


@torch.no_grad()
def clip_gradients(model, max_norm):
    """Scales each parameter's gradient down to norm max_norm (DINO clips per parameter, not globally)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


def views(args):
    """Two global views and args.local_crops local ones, as [(transform, source image)]."""
    # Without local crops the global views use --min-crop-scale; with them, DINO's code crops
    # global views from (0.4, 1) and leaves small scales to the locals.
    global_views = transforms.pair_views("dino", args.img_size, args.transforms,
                                         (0.4, 1.0) if args.local_crops else (args.min_crop_scale, 1.0))
    # Local crops are 96 px at 224, kept a multiple of 8 at other sizes (ViT-S/8's patch).
    local_size = max(8, 8 * round(args.img_size * 96 / 224 / 8))
    local = transforms.View(local_size, transforms.RECIPES["dino"][0], blur_p=0.5, ablation=args.transforms,
                            crop_scale=(0.05, 0.4))
    # On semantic pairs the local crops come from both images of the pair.
    return global_views + [(local, i % 2) for i in range(args.local_crops)]


def parse_args(argv=None, real_data=None):
    """The flags, with DINO's recipe for the backbone filled in where unset, then the real-data or
    the world's defaults (utils.resolve_defaults)."""
    args = utils.base_parser("dino", DEFAULTS).parse_args(argv)
    vit = args.arch is not None and args.arch.startswith("vit")
    if vit and (bool(args.data) if real_data is None else real_data):
        for flag, value in VIT_RECIPE.items():
            if getattr(args, flag) is None:
                setattr(args, flag, value)
        if args.precision == "auto":
            # DINO trained ViT-S/8 without mixed precision (--use_fp16 false; its help advises
            # against it for small patches): float32 unless --precision bf16 asks.
            args.precision = "fp32"
    # On the world a ViT keeps the world's optimisation defaults, as the convnet does: the ImageNet
    # recipe's learning rate is sized for 300 epochs of ImageNet, not the world's ~225 steps.
    args = utils.resolve_defaults(args, real_data)
    # DINO's ViT-S settings (README's better-performance command): drop path and a learnt scale
    # of the last layer. ResNets: no drop path, last layer normalised.
    args.drop_path_rate, args.norm_last_layer = (0.1, False) if vit else (0.0, True)
    return args


def build(args, run):
    """Student, teacher, centre and the student's optimizer, on the run's device."""
    backbone, feat_dim = build_backbone(args.arch, args.img_size, args.width, drop_path_rate=args.drop_path_rate,
                                        weights=args.init_backbone)
    student = DINO(backbone, feat_dim, args.out_dim, args.norm_last_layer, args.bn_in_head)
    teacher = DINO(*build_backbone(args.arch, args.img_size, args.width), args.out_dim, args.norm_last_layer,
                   args.bn_in_head)  # no drop path
    teacher.load_state_dict(student.state_dict())
    student, teacher = run.prepare(student), run.prepare(teacher)
    teacher.requires_grad_(False)  # after prepare: DDP wraps only modules with trainable parameters
    center = torch.zeros(args.out_dim, device=run.device)
    groups = optim.param_groups(student, args.weight_decay)  # no weight decay on biases and norms
    optimizer = optim.OPTIMIZERS[args.optimizer](groups)
    return student, teacher, center, optimizer


def schedules(args, steps_per_epoch):
    """Per-step values of train_step's scheduled arguments."""
    warmup = min(args.teacher_temp_warmup_epochs, args.epochs)
    teacher_temps = np.concatenate([np.linspace(0.04, args.teacher_temp, warmup),
                                    np.full(args.epochs - warmup, args.teacher_temp)])  # per epoch
    epochs = np.arange(args.epochs).repeat(steps_per_epoch)
    return {"lr": optim.cosine_schedule(args.lr * args.batch_size / 256, args.min_lr, args.epochs, steps_per_epoch,
                                        args.warmup_epochs),
            "wd": optim.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch),
            "momentum": ema.momentum_schedule(args.momentum_teacher, args.epochs, steps_per_epoch),
            "teacher_temp": teacher_temps[epochs],
            "freeze_last_layer": epochs < args.freeze_last_layer}


def train_step(student, teacher, center, optimizer, run, args, views, lr, wd, momentum, teacher_temp,
               freeze_last_layer):
    """One optimisation step on a batch of crops (views: the two global ones first) and the
    teacher's EMA update; returns the loss and the teacher targets."""
    optim.set_lr(optimizer, lr)
    optimizer.param_groups[0]["weight_decay"] = wd  # the group with decay
    with run.autocast():
        loss, targets = dino_step_loss(student, teacher, views, center, teacher_temp, args.student_temp,
                                       args.center_momentum)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip_grad:
        clip_gradients(student, args.clip_grad)
    if freeze_last_layer:  # the step leaves parameters without gradient unchanged
        for p in run.unwrap(student).head.last_layer.parameters():
            p.grad = None
    optimizer.step()
    ema.ema_update(run.unwrap(teacher), run.unwrap(student), momentum)
    return loss, targets


def main():
    args = parse_args()
    run = utils.Run(args)
    loader = run.loader(data.pretrain_dataset(args, views(args)))
    student, teacher, center, optimizer = build(args, run)
    schedule = schedules(args, len(loader))
    start_epoch = run.resume(student=student, teacher=teacher, optimizer=optimizer, center=center)

    for epoch in range(start_epoch, args.epochs):
        for step, (*crops, _) in run.steps(loader, epoch):
            values = {name: values[step].item() for name, values in schedule.items()}
            loss, targets = train_step(student, teacher, center, optimizer, run, args, crops, **values)
            run.log(loss, **values, embedding_std=embedding_std(targets))
        run.end_epoch(epoch, run.unwrap(teacher).backbone)
    run.finish(run.unwrap(teacher).backbone)


if __name__ == "__main__":
    utils.run_main(main)
