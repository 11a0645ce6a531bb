"""Training utilities shared by simclr.py, vicreg.py, byol.py and dino.py: the common flags,
one `Run` object for device, output folder, log, progress bar, checkpoints and the kNN
monitor, distributed helpers, LARS and per-iteration schedules."""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import data, distributed
from common.pairs import ManifestError
from common.transforms import ABLATIONS

# Shared controls, identical for every method: (real data as in the paper, embedded world on 2 CPU cores).
SHARED_DEFAULTS = {
    "arch": ("resnet50", "convnet"),
    "epochs": (200, 30),
    "batch_size": (256, 128),
    "img_size": (224, 32),
    "min_crop_scale": (0.08, 0.2),  # a crop of 8% of a 32-px image is a few pixels
    "workers": (8, 1),
    "warmup_epochs": (10, 3),
}


def base_parser(method, defaults, prog=None):
    """The flags every method script shares, plus `defaults`: {flag: (real data, embedded world)}
    for the method's own flags (a None default is filled in by `resolve_defaults`)."""
    p = argparse.ArgumentParser(prog or f"{method}.py", description=f"{method} pretraining on semantic or augmented pairs")
    p.add_argument("--pairs", choices=("semantic", "augmented"), required=prog is None,
                   help="semantic: views of two same-class images; augmented: two views of one image")
    p.add_argument("--data", help="image root in ImageFolder layout (default: the embedded nuisance world)")
    p.add_argument("--manifest", help="semantic-pairs CSV, paths relative to --data (default: DATA/pairs.csv)")
    p.add_argument("--world", nargs="*", metavar="KEY=VALUE", help="embedded-world settings, e.g. background_strength=0.8")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (pairs), split over processes")
    p.add_argument("--arch", choices=("resnet50", "resnet18", "convnet", "vit_small_patch8"))
    p.add_argument("--img-size", type=int)
    p.add_argument("--transforms", choices=ABLATIONS, default="full", help="the paper's augmentation ablations")
    p.add_argument("--min-crop-scale", type=float, help="smallest area fraction of the random resized crop")
    p.add_argument("--images-per-class", type=int, help="nested subset: the first N pairs of each class")
    p.add_argument("--ap-images", choices=("image_a", "all"), default="image_a",
                   help="augmented pairs from image_a of each pair (matched count) or every unique image")
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--out", help="output folder (default: runs/<method>-<pairs>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth if it exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-every", type=int, default=10, help="kNN monitor every N epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="log a JSON line every N steps")
    for flag, (real, _) in defaults.items():
        p.add_argument("--" + flag.replace("_", "-"), type=type(real), default=None,
                       help=f"default {real} on real data, {defaults[flag][1]} on the embedded world")
    p.set_defaults(method=method, method_defaults=defaults)
    return p


def resolve_defaults(args):
    """Fills unset flags with the real-data or embedded-world default."""
    table = {**SHARED_DEFAULTS, **args.method_defaults}
    for flag, (real, world) in table.items():
        if getattr(args, flag) is None:
            setattr(args, flag, real if args.data else world)
    del args.method_defaults
    args.out = args.out or f"runs/{args.method}-{args.pairs}-s{args.seed}"
    return args


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
    VICReg: the update of each weight tensor is rescaled by eta * ||w|| / ||g + wd * w||."""

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


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = float(lr)  # a numpy scalar would not load with weights_only=True


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    tmp = Path(f"{path}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class NonFiniteLoss(RuntimeError):
    pass


class Run:
    """One training run: device, processes, output folder, JSON-lines log, progress bar,
    checkpoints, the kNN monitor and the final backbone.pth."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world_size, self.device = distributed.init(torch.device(args.device))
        self.main = self.rank == 0
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / "checkpoint.pth"
        self.step, self.epoch = 0, 0
        self._monitor = None
        if self.main:
            config = {k: v for k, v in vars(args).items()}
            config.update(git_commit=git_commit(), torch=torch.__version__, world_size=self.world_size)
            (self.out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")

    # -- data -------------------------------------------------------------------------------
    def loader(self, dataset):
        """A seeded, resumable loader over the pretraining dataset (kept for the kNN monitor)."""
        self.dataset = dataset
        if len(dataset) < self.args.batch_size:
            raise data.ImageError(f"{len(dataset)} training items, fewer than one batch of {self.args.batch_size}")
        self.sampler = data.SeededBatchSampler(len(dataset), self.args.batch_size, self.args.seed,
                                               rank=self.rank, world_size=self.world_size)
        return data.make_loader(dataset, self.sampler, self.args.workers, self.device)

    def prepare(self, model, sync_bn=True):
        """Moves the model to the device (channels_last on CUDA); under distributed training
        converts BatchNorm to SyncBatchNorm (the recipes' global BN) and wraps it in DDP."""
        if self.world_size > 1 and sync_bn:
            model = distributed.convert_sync_batchnorm(model, self.device)
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if self.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    @staticmethod
    def unwrap(model):
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda")

    def steps(self, loader, epoch):
        """Yields (global step, batch on the device) for one epoch, with progress and throughput."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.args.epochs}", disable=not self.main,
                   leave=False, dynamic_ncols=True)
        self._tick, self._images, self._losses = time.perf_counter(), 0, []
        for i, batch in enumerate(bar):
            self.step = epoch * len(loader) + i
            batch = [b.to(self.device, non_blocking=True) for b in batch]
            self._images += 2 * len(batch[0]) * self.world_size
            yield self.step, batch
            if self._losses:
                bar.set_postfix(loss=f"{self._losses[-1]:.4f}", img_s=f"{self.images_per_s():.0f}")

    def images_per_s(self):
        return self._images / max(time.perf_counter() - self._tick, 1e-9)

    def log(self, loss, **metrics):
        """Records a step's loss (stopping the run if it is not finite) and logs every few steps."""
        loss = loss.item()
        if not math.isfinite(loss):
            last = self.checkpoint_path if self.checkpoint_path.exists() else "none written yet"
            raise NonFiniteLoss(f"loss is {loss} at epoch {self.epoch + 1}, step {self.step}; "
                                f"last good checkpoint: {last}")
        self._losses.append(loss)
        if self.step % self.args.log_every == 0:
            self.write_log(epoch=self.epoch, step=self.step, loss=loss, images_per_s=self.images_per_s(), **metrics)

    def write_log(self, **record):
        if self.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v)
                                    for k, v in record.items()}) + "\n")

    # -- checkpoints ------------------------------------------------------------------------
    def resume(self, **objects):
        """With --resume, loads OUT/checkpoint.pth into the given objects (anything with
        load_state_dict, or a tensor copied in place); returns the epoch to start from."""
        if not (self.args.resume and self.checkpoint_path.exists()):
            return 0
        ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        for name, obj in objects.items():
            if isinstance(obj, torch.Tensor):
                obj.copy_(ckpt[name])
            else:
                self.unwrap(obj).load_state_dict(ckpt[name])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        random.setstate(ckpt["rng"]["python"])
        if self.main:
            print(f"resumed from {self.checkpoint_path} at epoch {ckpt['epoch']}", file=sys.stderr)
        return ckpt["epoch"]

    def end_epoch(self, epoch, backbone, **objects):
        """Logs the epoch, checkpoints atomically, and runs the kNN monitor when it is due."""
        record = dict(epoch=epoch + 1, loss=float(np.mean(self._losses)), images_per_s=self.images_per_s())
        if (epoch + 1) % self.args.eval_every == 0 or epoch + 1 == self.args.epochs:
            record["knn_top1"] = self.knn(backbone)
        if self.main:
            state = {name: obj if isinstance(obj, torch.Tensor) else self.unwrap(obj).state_dict()
                     for name, obj in objects.items()}
            state.update(epoch=epoch + 1, args=vars(self.args),
                         rng={"torch": torch.get_rng_state(), "python": random.getstate()})
            save_atomic(state, self.checkpoint_path)
            self.write_log(**record)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def knn(self, backbone):
        """kNN top-1 (k=20, T=0.07) of the backbone on the monitor split, or None if there is none."""
        from common.transforms import eval_transform
        from eval.features import extract_features
        from eval.knn import knn_accuracy

        if not self.main:
            return None
        if self._monitor is None:
            split = data.monitor_split(self.args, self.dataset)
            if split is None:
                self._monitor = False
            else:
                bank, queries, classes = split
                tf = eval_transform(self.args.img_size, 1.0 if self.args.data is None else 256 / 224)
                self._monitor = (data.LabelledImages(bank, tf, classes), data.LabelledImages(queries, tf, classes))
        if not self._monitor:
            return None
        bank, bank_labels = extract_features(backbone, self._monitor[0], self.device)
        queries, labels = extract_features(backbone, self._monitor[1], self.device)
        return knn_accuracy(bank, bank_labels, queries, labels, len(self._monitor[0].classes))

    def finish(self, backbone):
        """Writes backbone.pth: a plain state dict of the backbone (no projector, no classifier)."""
        if self.main:
            save_atomic({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, self.out / "backbone.pth")
            print(f"wrote {self.out / 'backbone.pth'}", file=sys.stderr)
        if dist.is_initialized():
            dist.barrier()


def run_main(main):
    """Runs a script's main(); bad input ends with one line naming the problem and exit code 2."""
    try:
        main()
    except ManifestError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except (data.ImageError, FileNotFoundError) as e:
        # An error raised in a DataLoader worker arrives wrapped with the worker's traceback:
        # keep only its last line, the original message.
        message = str(e).strip().splitlines()[-1].split("ImageError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
