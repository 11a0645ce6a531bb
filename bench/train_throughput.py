"""Training throughput (images/s, two views per pair) of each method's step, on CUDA if present,
else the CPU: on synthetic tensors already on the device (the step alone), through the real loader
alone (decoding, the method's views, transfer to the device) and through both (the training path).

    python bench/train_throughput.py --arch resnet50 --batch-size 256 --img-size 224 --steps 20 [--compile]
    python bench/train_throughput.py --arch convnet --batch-size 128 --img-size 32 --steps 10
    python bench/train_throughput.py --arch convnet ... --precision fp32 bf16     # their ratio, one run
    python bench/train_throughput.py ... --data IMAGENET/train --manifest pairs.csv --workers 16
    python bench/train_throughput.py ... --fake-imagenet     # generated ImageNet-like JPEGs

Each step is the method script's own: its build() (networks, optimizer) and train_step(), the
function its training loop calls, with the training utilities the scripts use (Run.prepare:
channels_last on CUDA and under bf16, --compile; Run.autocast: bf16 where --precision resolves to
it; Run.loader and Run.steps: pinned memory, persistent workers, non-blocking copies). Heads are the publications' sizes, except on the nets made for the
embedded world (the convnet, and DINO's small ViT), which get the world's. Without --data the loader reads the embedded world (generated once).
Loader workers default to the scripts' (8 on real data). Augmented pairs are read from every
image of the manifest's pairs (--ap-images all): the views' cost is the same, and epochs are longer.

Each worker makes whole batches and all of them start together, so batches arrive in waves of
`workers`: timings through the loader skip two waves (start-up, then a burst of batches already
made) and time the next six, within one epoch (a new epoch starts with a wave of waiting).
"""
import argparse
import importlib
import itertools
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method scripts are top-level modules

from common import data, imagenet, pairs, transforms, utils  # noqa: E402
from common.backbones import ARCHS  # noqa: E402

WORLD_ARCHS = ("convnet", "vit_tiny6_patch8")  # trained with the world's defaults

METHODS = ("simclr", "vicreg", "byol", "dino")


def method_args(method, opts, out, precision):
    """The method script's arguments for this benchmark, with its own defaults for the rest."""
    script = importlib.import_module(method)
    argv = ["--pairs", "augmented", "--ap-images", "all", "--arch", opts.arch, "--batch-size", str(opts.batch_size),
            "--img-size", str(opts.img_size), "--workers", str(opts.workers), "--out", out, "--device", opts.device,
            "--precision", precision]
    argv += ["--data", opts.data] if opts.data else ["--world", *opts.world]
    argv += ["--manifest", opts.manifest] if opts.manifest else []
    argv += ["--compile"] if opts.compile else []
    return script, script.parse_args(argv, real_data=opts.arch not in WORLD_ARCHS)


def build_step(script, args, run):
    """step(x1, x2): one training step of the method script, its own build() and train_step(), at
    the scheduled values of mid-training (past warm-up and DINO's frozen last layer)."""
    nets = script.build(args, run)
    values = {name: values[len(values) // 2].item() for name, values in script.schedules(args, 1).items()}

    def step(x1, x2):
        loss = script.train_step(*nets, run, args, [x1, x2], **values)
        loss = loss[0] if isinstance(loss, tuple) else loss  # (loss, what the collapse monitor reads)
        loss.item()  # Run.log reads every step's loss (the non-finite check): one sync per step, as in training

    return step


def images_per_s(batches, work, warmup, steps, batch_size):
    """Times `steps` calls of work(*batch) after `warmup` untimed ones (compilation, cuDNN autotuning,
    workers). Returns images/s and the share of the time spent in next(batches): waiting for the
    workers, then the copy to the device and queueing the colour operations."""
    for _ in range(warmup):
        work(*next(batches))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fetching = 0.0
    for _ in range(steps):
        tick = time.perf_counter()
        batch = next(batches)
        fetching += time.perf_counter() - tick
        work(*batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return 2 * batch_size * steps / elapsed, fetching / elapsed


def loader_batches(run, loader):
    """(x1, x2) on the device from the real loader, epoch after epoch, as the scripts receive them."""
    for epoch in itertools.count():
        for _, (x1, x2, _) in run.steps(loader, epoch):
            yield x1, x2


def write_fake_imagenet(root, images, per_class=100, unique_classes=16):
    """ImageNet-like class folders of 500x375 JPEGs (quality 90, about ImageNet's file size) and a
    pairs.csv, at least `images` of them. The first classes are generated (one per process), the
    rest hard-link their files: the loader's cost is decoding and views, not the content. Classes
    get more than `per_class` images where 1,000 would hold fewer than `images`."""
    wnids = imagenet.synsets_1k()
    wnids = wnids[:min(len(wnids), max(1, math.ceil(images / per_class)))]
    per_class = max(per_class, math.ceil(images / len(wnids)))
    jobs = [(root, [wnid], per_class, (500, 375), seed, 90, False) for seed, wnid in enumerate(wnids[:unique_classes])]
    with multiprocessing.Pool() as pool:
        trees = pool.starmap(imagenet.synthetic_tree, jobs)
    for i, wnid in enumerate(wnids[unique_classes:]):
        (root / wnid).mkdir()
        for j, name in enumerate(next(iter(trees[i % len(trees)].values()))):
            os.link(root / name, root / wnid / f"{wnid}_{j}.JPEG")
    pairs.write_manifest(root / "pairs.csv", pairs.random_pairs(root, wnids, per_class // 2, seed=0))
    return str(root)


def loader_steps(opts, workers):
    """(warm-up, timed) batches through the loader: two waves, then six."""
    wave = max(1, workers)
    return max(opts.warmup, 2 * wave), max(opts.steps, 6 * wave)


def bench(opts):
    device = torch.device(opts.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; {opts.arch}, batch {opts.batch_size} pairs, {opts.img_size} px, "
          f"{opts.steps} steps after {opts.warmup}{', compiled' if opts.compile else ''}, {opts.workers} workers")
    # images/s; "in loader": the share of loader+step's time spent getting batches
    print(f"{'method':8s} {'precision':>9s} {'step alone':>12s} {'loader alone':>13s} {'loader+step':>12s} {'in loader':>10s}")
    for method, precision in itertools.product(opts.methods, opts.precision):
        with tempfile.TemporaryDirectory() as out:
            script, args = method_args(method, opts, out, precision)
            run = utils.Run(args)
            step = build_step(script, args, run)
            shape = (opts.batch_size, 3, opts.img_size, opts.img_size)
            synthetic = [torch.randn(shape, device=device).contiguous(memory_format=run.memory_format) for _ in range(2)]
            rates = [images_per_s(itertools.repeat(synthetic), step, opts.warmup, opts.steps, opts.batch_size)[0]]
            if not opts.no_loader:
                views = transforms.pair_views(method, args.img_size, "full", (args.min_crop_scale, 1.0))
                loader = run.loader(data.pretrain_dataset(args, views))
                warmup, steps = loader_steps(opts, opts.workers)
                if 2 * (warmup + steps) > len(loader):
                    sys.exit(f"timing through the loader takes {2 * (warmup + steps)} batches in one epoch; "
                             f"the data has {len(loader)}")
                batches = loader_batches(run, loader)
                rates.append(images_per_s(batches, lambda x1, x2: None, warmup, steps, opts.batch_size)[0])
                rate, in_loader = images_per_s(batches, step, warmup, steps, opts.batch_size)
                rates.append(rate)
                batches.close()  # ends the epoch's progress bar
            tqdm.write(f"{method:8s} {args.precision:>9s} " + " ".join(f"{r:>12.0f}" for r in rates) +
                       ("" if opts.no_loader else f" {in_loader:>10.0%}"))
            del step, run
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--arch", default="resnet50", choices=ARCHS)
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per step")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precision", nargs="+", choices=utils.PRECISIONS, default=["auto"],
                        help="one row per method and precision (e.g. fp32 bf16 for their ratio in one run)")
    parser.add_argument("--no-loader", action="store_true", help="synthetic tensors only")
    parser.add_argument("--data", help="image root with pairs.csv (default: the embedded world)")
    parser.add_argument("--manifest")
    parser.add_argument("--fake-imagenet", action="store_true",
                        help="read generated ImageNet-like JPEGs (500x375), as many as needed, not --data")
    parser.add_argument("--world", nargs="*", default=[], metavar="KEY=VALUE", help="embedded-world settings")
    parser.add_argument("--workers", type=int, help="loader processes (default: the scripts')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    if opts.workers is None:
        opts.workers = utils.SHARED_DEFAULTS["workers"][1 if opts.arch in WORLD_ARCHS else 0]
    with tempfile.TemporaryDirectory() as fake:
        if opts.fake_imagenet:  # one item per image (--ap-images all), enough for both loader timings
            images = 2 * sum(loader_steps(opts, opts.workers)) * opts.batch_size
            opts.data, opts.manifest = write_fake_imagenet(Path(fake), images), None
        bench(opts)


if __name__ == "__main__":
    main()
