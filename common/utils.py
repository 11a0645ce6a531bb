"""Training utilities shared by simclr.py, vicreg.py, byol.py and dino.py: the common flags and
one `Run` object for device, processes (common/distributed.py), output folder, log, progress bar,
checkpoints and the kNN monitor. Optimizers and schedules are in common/optim.py."""
import dataclasses
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

from common import data, distributed, flags, transforms
from common.backbones import ARCHS, CONVNET_WIDTH
from common.features import extract_features, knn_accuracy
from common.optim import OPTIMIZERS
from common.pairs import ManifestError


# Shared controls, identical for every method: (real data as in the paper, embedded world on 2 CPU cores).
SHARED_DEFAULTS = {
    "arch": ("resnet50", "convnet"),
    "epochs": (200, 15),
    "batch_size": (256, 128),
    "img_size": (224, 32),
    "min_crop_scale": (0.08, 0.2),  # a crop of 8% of a 32-px image is a few pixels
    "workers": (8, 1),
    "warmup_epochs": (10, 2),
}


# Each method flag's allowed values and meaning (its defaults are in the scripts' DEFAULTS).
METHOD_FLAGS = {
    "optimizer": (None, "optimizer"),
    "lr": (flags.NON_NEGATIVE, "base learning rate, scaled by batch / 256 (0 keeps the weights where they start)"),
    "min_lr": (flags.NON_NEGATIVE, "learning rate at the end of the cosine decay"),
    "weight_decay": (flags.NON_NEGATIVE, "weight decay (not on biases and norm parameters)"),
    "weight_decay_end": (flags.NON_NEGATIVE, "weight decay at the end of its cosine schedule"),
    "temperature": (flags.POSITIVE, "NT-Xent temperature"),
    "proj_dim": (flags.POSITIVE_INT, "projection output width"),
    "proj_out_bn": (flags.boolean, "SimCLR v1's BatchNorm (scale, no shift) on the projection output"),
    "loss_scale": (flags.POSITIVE, "multiplies NT-Xent's mean over the 2N anchors (2: SimCLR v1's loss_a + loss_b)"),
    "expander": (flags.layer_widths, "expander widths, e.g. 8192-8192-8192"),
    "sim_coeff": (flags.NON_NEGATIVE, "invariance coefficient"),
    "std_coeff": (flags.NON_NEGATIVE, "variance coefficient"),
    "cov_coeff": (flags.NON_NEGATIVE, "covariance coefficient"),
    "tau": (flags.MOMENTUM, "base EMA momentum of the target, cosine to 1"),
    "hidden_dim": (flags.POSITIVE_INT, "projector and predictor hidden width"),
    "momentum_teacher": (flags.MOMENTUM, "base EMA momentum of the teacher, cosine to 1"),
    "out_dim": (flags.POSITIVE_INT, "DINO head output width"),
    "student_temp": (flags.POSITIVE, "student softmax temperature"),
    "teacher_temp": (flags.POSITIVE, "teacher softmax temperature after its warm-up from 0.04"),
    "teacher_temp_warmup_epochs": (flags.COUNT, "epochs of the teacher temperature's warm-up (0: none)"),
    "center_momentum": (flags.MOMENTUM, "EMA momentum of the centre"),
    "clip_grad": (flags.NON_NEGATIVE, "per-parameter gradient norm cap (0: no clipping)"),
    "freeze_last_layer": (flags.COUNT, "epochs with the head's last layer frozen (0: never)"),
    "local_crops": (flags.COUNT, "local crops per pair (0: the two global views only)"),
    "bn_in_head": (flags.boolean, "BatchNorm in the DINO head's MLP (DINO's --use_bn_in_head)"),
    "min_crop_scale": (flags.FRACTION, "smallest area fraction of the random resized crop"),
}


def base_parser(method, defaults, prog=None):
    """The flags every method script shares, plus `defaults`: {flag: (real data, embedded world)}
    for the method's own flags (their allowed values in METHOD_FLAGS), or overriding a shared
    flag's (a None default is filled in by `resolve_defaults`, which also checks the flags that
    depend on each other)."""
    table = {**SHARED_DEFAULTS, **defaults}

    def default(flag):
        real, world = table[flag]
        return f"default {real} on real data, {world} on the embedded world"

    p = flags.Parser(prog or f"{method}.py", description=f"{method} pretraining on semantic or augmented pairs")
    p.add_argument("--pairs", choices=("semantic", "augmented"), required=prog is None,
                   help="semantic: views of two same-class images; augmented: two views of one image")
    p.add_argument("--data", help="image root in ImageFolder layout (default: the embedded nuisance world)")
    p.add_argument("--manifest", help="semantic-pairs CSV, paths relative to --data (default: DATA/pairs.csv)")
    p.add_argument("--world", nargs="*", type=data.world_setting, metavar="KEY=VALUE",
                   help="embedded-world settings, e.g. background_strength=0.8")
    p.add_argument("--epochs", type=flags.POSITIVE_INT, help=default("epochs"))
    p.add_argument("--batch-size", type=flags.POSITIVE_INT,
                   help="global batch size (pairs), split over processes, at least 2 per process; " + default("batch_size"))
    p.add_argument("--arch", choices=ARCHS, help=default("arch"))
    p.add_argument("--width", type=flags.POSITIVE_INT,
                   help=f"the convnet's first-layer channels, 8 x width features (--arch convnet only); "
                        f"default {CONVNET_WIDTH}")
    p.add_argument("--img-size", type=flags.bounded(int, 8), help="at least 8 (a multiple of 8 for the ViTs); " + default("img_size"))
    p.add_argument("--transforms", choices=transforms.ABLATIONS, default="full",
                   help="the paper's augmentation ablations")
    p.add_argument("--min-crop-scale", type=flags.FRACTION,
                   help="smallest area fraction of the random resized crop, in (0, 1]; " + default("min_crop_scale"))
    p.add_argument("--images-per-class", type=flags.POSITIVE_INT,
                   help="nested subset: the first N pairs of each class (default: all)")
    p.add_argument("--ap-images", choices=("image_a", "all"), default="image_a",
                   help="augmented pairs from image_a of each pair (matched count) or every unique image")
    p.add_argument("--warmup-epochs", type=flags.COUNT, help="linear warm-up epochs (0: none); " + default("warmup_epochs"))
    p.add_argument("--seed", type=flags.SEED, default=0)
    p.add_argument("--workers", type=flags.COUNT, help="data-loading processes (0: in the training process); " + default("workers"))
    p.add_argument("--out", help="output folder (default: runs/<method>-<pairs>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth if it exists")
    p.add_argument("--init-backbone", metavar="BACKBONE.pth",
                   help="start from this backbone (of --arch) instead of random init; heads start new")
    p.add_argument("--checkpoint-every", type=flags.COUNT, default=0, metavar="N",
                   help="also checkpoint every N steps within an epoch (default 0: at epoch ends only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training precision: auto = bf16 autocast (and channels_last) on CUDA and on CPUs with "
                        "native bf16, float32 elsewhere; weights and checkpoints stay float32")
    p.add_argument("--device", type=flags.device, default=flags.default_device())
    p.add_argument("--eval-every", type=flags.COUNT, default=10,
                   help="kNN monitor every N epochs and at the end (0: at the end only)")
    p.add_argument("--log-every", type=flags.POSITIVE_INT, default=10, help="log a JSON line every N steps")
    for flag, (real, _) in defaults.items():
        if flag in SHARED_DEFAULTS:
            continue
        kind, meaning = METHOD_FLAGS[flag]
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=None,
                       choices=list(OPTIMIZERS) if flag == "optimizer" else None,
                       help=f"{meaning}; {default(flag)}")
    p.set_defaults(method=method, method_defaults=defaults)
    return p


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device):
    """Whether `device` computes in bf16 natively: CUDA's own check, else the CPU's flags (x86
    AVX512-BF16 or AMX-BF16, Arm's BF16). Without them autocast would emulate bf16, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no way to tell, so stay in float32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision, device):
    """'bf16' or 'fp32' for the --precision flag on `device`."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def resolve_defaults(args, real_data=None):
    """Fills unset flags with the real-data default (by default when --data is given) or the
    embedded-world one."""
    real_data = bool(args.data) if real_data is None else real_data
    table = {**SHARED_DEFAULTS, **args.method_defaults}  # a method's own value overrides the shared one
    given = {flag for flag in table if getattr(args, flag) is not None}
    for flag, (real, world) in table.items():
        if getattr(args, flag) is None:
            setattr(args, flag, real if real_data else world)
    del args.method_defaults
    args.out = args.out or f"runs/{args.method}-{args.pairs}-s{args.seed}"
    check_flags(args, given)
    if args.arch == "convnet":  # config.json records a width only where there is one
        args.width = args.width or CONVNET_WIDTH
    if not args.data:  # config.json records the world, so results of different worlds are never mixed
        from common.world import WORLD_VERSION

        args.world_version, args.world_config = WORLD_VERSION, dataclasses.asdict(data.world_config(args.world))
    return args


def check_flags(args, given):
    """The checks that involve several flags, the processes or files, once the defaults are in:
    each failure ends the command with one line (flags.fail) before any work starts. `given`: the
    flags set on the command line (a default warm-up longer than a short run is cut to its length)."""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size < 2 * processes or args.batch_size % processes:
        flags.fail(f"--batch-size must be a multiple of the {processes} process(es) with at least 2 pairs each "
                   f"(BatchNorm and the losses need two), got {args.batch_size}")
    if args.width is not None and args.arch != "convnet":
        flags.fail(f"--width sets the convnet's width; {args.arch} has its own, so drop --width or use --arch convnet")
    if args.arch.startswith("vit") and args.img_size % 8:
        flags.fail(f"--img-size must be a multiple of 8 for {args.arch} (its patch size), got {args.img_size}")
    for flag in ("warmup_epochs", "teacher_temp_warmup_epochs", "freeze_last_layer"):
        if flag in given and getattr(args, flag) > args.epochs:
            flags.fail(f"--{flag.replace('_', '-')} must be at most --epochs ({args.epochs}), got {getattr(args, flag)}")
    if args.init_backbone is not None and not Path(args.init_backbone).is_file():  # (--data: common/data.py)
        flags.fail(f"--init-backbone: no such file: {args.init_backbone}")


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


def all_finite(state):
    """Whether every floating-point tensor in a (nested) state dict is finite."""
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)

    flags = {}  # per device (an optimizer's step counts live on the CPU): one sync for each
    for t in tensors(state):
        if t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def rng_state(device):
    """The global random states (torch, CUDA, Python, NumPy) in types torch.load(weights_only=True) reads."""
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"],
                         "state": {"key": numpy["key"].cpu().numpy().astype(np.uint32), "pos": numpy["pos"]}})
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def refuse_maps_smaller_than_the_stride(model):
    """Ends a bf16 CPU run whose strided convolution (kernel > 1) gets an input map smaller than its
    stride, such as a ResNet's layer4 on views of 16 px or less: for those PyTorch's oneDNN bf16
    kernels return gradients read from uninitialised memory (torch 2.14.1; float32 is exact), so
    the run would train on garbage or stop at a NaN loss a few steps later."""
    def check(name):
        def hook(conv, inputs):
            if any(size < stride for size, stride in zip(inputs[0].shape[-2:], conv.stride)):
                flags.fail(f"--precision bf16 on the CPU: {name} (stride {conv.stride[0]}) gets "
                           f"{'x'.join(map(str, inputs[0].shape[-2:]))} maps, for which PyTorch's bf16 CPU "
                           "kernels give wrong gradients; use larger views (--img-size) or --precision fp32")
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and max(module.kernel_size) > 1 and max(module.stride) > 1:
            module.register_forward_pre_hook(check(name))


class Run:
    """One training run: device, processes, output folder, JSON-lines log, progress bar,
    checkpoints, the kNN monitor and the final backbone.pth."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world_size, self.device = distributed.init(torch.device(args.device))
        self.main = self.rank == 0
        args.precision = resolve_precision(args.precision, self.device)  # config.json records the one used
        self.bf16 = args.precision == "bf16"
        # channels_last is what the bf16 convolution kernels are fastest in, on CPU and CUDA alike.
        self.memory_format = torch.channels_last if self.bf16 or self.device.type == "cuda" else torch.contiguous_format
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / "checkpoint.pth"
        self.step, self.epoch = 0, 0
        self._objects = {}  # what checkpoints hold: the objects given to resume()
        self._resume_at = (0, 0)  # (epoch, batches of it already done)
        self._last_checkpoint = "none written yet"
        self._losses = []
        self._spreads = []  # the epoch's embedding_std values (the collapse measure, common/monitor.py)
        self._monitor = None
        if self.main:
            config = {k: v for k, v in vars(args).items()}
            config.update(git_commit=git_commit(), torch=torch.__version__, world_size=self.world_size)
            (self.out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
            print(f"training in {'bf16 autocast' if self.bf16 else 'float32'} on {self.device}", file=sys.stderr)

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
        """Moves the model to the device (channels_last on CUDA and under bf16); under distributed training
        converts BatchNorm to SyncBatchNorm (the recipes' global BN) and wraps it in DDP; with
        --compile, compiles it (`unwrap` gives back the plain module, for state dicts)."""
        if self.world_size > 1 and sync_bn:
            model = distributed.convert_sync_batchnorm(model, self.device)
        model = model.to(self.device, memory_format=self.memory_format)
        if self.bf16 and self.device.type == "cpu":
            refuse_maps_smaller_than_the_stride(model)
        if self.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if getattr(self.args, "compile", False):  # (eval/detection.py's parser has no --compile)
            model = torch.compile(model)
        return model

    @staticmethod
    def unwrap(model):
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def steps(self, loader, epoch):
        """Yields (global step, batch on the device) for one epoch, with progress and throughput;
        after a mid-epoch resume, from the batch after the checkpoint's."""
        start = self._resume_at[1] if epoch == self._resume_at[0] else 0
        self.epoch, self.steps_per_epoch = epoch, len(loader)
        self.sampler.set_epoch(epoch, start)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.args.epochs}", disable=not self.main,
                   initial=start, total=len(loader), leave=False, dynamic_ncols=True)
        self._tick, self._images = time.perf_counter(), 0
        if start == 0:
            self._losses, self._spreads = [], []  # else: the epoch's values before the checkpoint, from resume()
        for i, batch in enumerate(bar, start):
            self.step, self._batches_done = epoch * len(loader) + i, i + 1
            batch = [self._to_device(b) for b in batch]
            self._images += 2 * len(batch[0]) * self.world_size
            yield self.step, batch
            if self._losses:
                bar.set_postfix(loss=f"{self._losses[-1]:.4f}", img_s=f"{self.images_per_s():.0f}")

    def _to_device(self, item):
        """One collated item of a batch on the device: a view (uint8 pixels and colour parameters,
        transforms.View) is coloured there, in the model's memory format."""
        if not isinstance(item, (list, tuple)):
            return item.to(self.device, non_blocking=True)
        pixels, params = item
        views = transforms.colourise(pixels.to(self.device, non_blocking=True), params)
        return views.contiguous(memory_format=self.memory_format)

    def images_per_s(self):
        return self._images / max(time.perf_counter() - self._tick, 1e-9)

    def log(self, loss, **metrics):
        """Records a step's loss (stopping the run if it is not finite), checkpoints every
        --checkpoint-every steps (the epoch's last step is left to end_epoch) and logs every few steps.
        Call it once the step is complete (after the optimizer and any EMA update)."""
        loss = loss.item()
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at epoch {self.epoch + 1}, step {self.step}; "
                                f"last good checkpoint: {self._last_checkpoint}")
        self._losses.append(loss)
        if "embedding_std" in metrics:
            self._spreads.append(float(metrics["embedding_std"]))
        every = self.args.checkpoint_every
        if every and (self.step + 1) % every == 0 and self._batches_done < self.steps_per_epoch:
            self.checkpoint(self.epoch, self._batches_done)
        if self.step % self.args.log_every == 0:
            self.write_log(epoch=self.epoch, step=self.step, loss=loss, images_per_s=self.images_per_s(), **metrics)

    def write_log(self, **record):
        if self.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v)
                                    for k, v in record.items()}) + "\n")

    # -- checkpoints ------------------------------------------------------------------------
    def resume(self, **objects):
        """Remembers the objects every checkpoint holds (anything with state_dict, or a tensor)
        and, with --resume, loads OUT/checkpoint.pth into them, with the random states and the
        position in the data; returns the epoch to start from (run.steps starts it mid-way if
        the checkpoint was written mid-epoch)."""
        self._objects = objects
        if not (self.args.resume and self.checkpoint_path.exists()):
            return 0
        ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        for name, obj in objects.items():
            if isinstance(obj, torch.Tensor):
                obj.copy_(ckpt[name])
            else:
                self.unwrap(obj).load_state_dict(ckpt[name])
        set_rng_state(ckpt["rng"], self.device)
        self._resume_at, self._losses = (ckpt["epoch"], ckpt["batch"]), ckpt["epoch_losses"]
        self._spreads = ckpt["epoch_spreads"]
        self._last_checkpoint = self.describe_checkpoint(ckpt)
        if self.main:
            print(f"resumed from {self._last_checkpoint}", file=sys.stderr)
        return ckpt["epoch"]

    def checkpoint(self, epoch, batch):
        """Saves the objects given to resume(), the random states and the position (epoch, batches
        of it done; the global step follows) atomically, from the main process. Refuses
        (NonFiniteLoss) if any value is not finite: a step with a finite loss can still overflow
        the weights."""
        if not self._objects:
            raise RuntimeError("a checkpoint needs the objects to save: pass them to run.resume() first")
        state = {name: obj if isinstance(obj, torch.Tensor) else self.unwrap(obj).state_dict()
                 for name, obj in self._objects.items()}
        if not all_finite(state):  # checked on every process: all stop together
            raise NonFiniteLoss(f"non-finite weights after epoch {self.epoch + 1}, step {self.step}; "
                                f"last good checkpoint: {self._last_checkpoint}")
        state.update(epoch=epoch, batch=batch, step=self.step, epoch_losses=list(self._losses),
                     epoch_spreads=list(self._spreads),
                     args=vars(self.args), rng=rng_state(self.device))
        if self.main:
            save_atomic(state, self.checkpoint_path)
        self._last_checkpoint = self.describe_checkpoint(state)

    def describe_checkpoint(self, ckpt):
        return f"{self.checkpoint_path} (written after step {ckpt['step']}, epoch {ckpt['epoch'] + (ckpt['batch'] > 0)})"

    def end_epoch(self, epoch, backbone):
        """Logs the epoch, checkpoints atomically, and runs the kNN monitor when it is due."""
        record = dict(epoch=epoch + 1, loss=float(np.mean(self._losses)), images_per_s=self.images_per_s())
        if self._spreads:
            record["embedding_std"] = float(np.mean(self._spreads))
        every = self.args.eval_every  # 0: at the end only
        if (every and (epoch + 1) % every == 0) or epoch + 1 == self.args.epochs:
            record["knn_top1"] = self.knn(backbone)
        self.checkpoint(epoch + 1, 0)
        if self.main:
            self.write_log(**record)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def knn(self, backbone):
        """kNN top-1 (k=20, T=0.07) of the backbone on the monitor split, or None if there is none."""
        if not self.main:
            return None
        if self._monitor is None:
            split = data.monitor_split(self.args, self.dataset)
            if split is None:
                self._monitor = False
            else:
                bank, queries, classes = split
                tf = transforms.eval_transform(self.args.img_size, 1.0 if self.args.data is None else 256 / 224)
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
