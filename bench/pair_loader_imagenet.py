"""ImageNet-sized pair loading and manifest building, on generated stand-ins for ImageNet files.

    python bench/pair_loader_imagenet.py loader [--workers 1 2] [--images 200]
    python bench/pair_loader_imagenet.py builder [--classes 1000] [--files 60]

loader: pairs/s of the 224-px SimCLR views' worker stage (transforms.pair_views("simclr", 224)) over
ImageNet-like JPEGs (500x375, quality 90, a photograph-like mix of smooth regions, texture and
edges), for semantic pairs (two decodes per pair) and augmented pairs (one decode, two views),
through the training loader (data.make_loader); plus the cost of one decode, one view's worker
stage and its colour stage.
Medians over interleaved rounds.

builder: `python -m common.pairs build --strategy random` over a tree of `--classes` folders of
`--files` small JPEGs each: listing (os.scandir) and the header check of the chosen images;
and the pair selection of the mined strategy for one ImageNet-sized class (random features).
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from common import data, imagenet, pairs, transforms


def pairs_per_second(loader, batches):
    it = iter(loader)
    next(it)  # start-up (worker spawn, first batch) is not throughput
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)[-1])
    return n / (time.perf_counter() - start)


def per_call_ms(fn, items, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x in items:
            fn(x)
        times.append((time.perf_counter() - start) / len(items) * 1e3)
    return statistics.median(times)


def bench_loader(args, tmp):
    classes = imagenet.synsets_1k()[:10]
    per_class = args.images // len(classes)
    imagenet.synthetic_tree(tmp, classes, per_class, size=(500, 375), quality=90, oddities=False)
    manifest = pairs.random_pairs(tmp, classes, per_class // 2, seed=0)
    files = [tmp / p.image_a for p in manifest] + [tmp / p.image_b for p in manifest]
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    views = transforms.pair_views("simclr", 224)
    index = {c: i for i, c in enumerate(classes)}
    semantic = [(index[p.cls], p.image_a, p.image_b) for p in manifest]
    augmented = [(label, a, a) for label, a, _ in semantic]
    datasets = {"semantic pairs": data.PairDataset(tmp, semantic, views, classes),
                "augmented pairs": data.PairDataset(tmp, augmented, views, classes)}
    torch.set_num_threads(1)  # as in a DataLoader worker
    decoded = [data.load_rgb(f) for f in files[:40]]
    with data.seeded(0):
        view_ms = per_call_ms(views[0][0], decoded)
        pixels, params = (torch.stack(t) for t in zip(*map(views[0][0], decoded)))
    colour_ms = per_call_ms(lambda batch: transforms.colourise(*batch), [(pixels, params)]) / len(decoded)
    print(f"{len(files)} JPEGs 500x375 q90, {kb:.0f} KiB average; batch {args.batch_size}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    mining = pairs.MiningViews(tmp, [str(f.relative_to(tmp)) for f in files[:40]], 224)
    print(f"one process: decode {per_call_ms(data.load_rgb, files[:40]):.1f} ms/image, "
          f"one 224-px SimCLR view in a worker (crop, flip, colour parameters) {view_ms:.1f} ms, its colours "
          f"(transforms.colourise, batched on this CPU) {colour_ms:.1f} ms, mining views (decode, object and "
          f"context view) "
          f"{per_call_ms(mining.__getitem__, range(40)):.1f} ms/image")
    for workers in args.workers:
        built = {name: data.make_loader(ds, data.SeededBatchSampler(len(ds), args.batch_size, seed=0), workers,
                                        torch.device("cpu")) for name, ds in datasets.items()}
        batches = len(manifest) // args.batch_size - 1
        rates = {name: [] for name in built}
        for _ in range(args.rounds):  # interleaved, so load changes hit both alike
            for name, loader in built.items():
                rates[name].append(pairs_per_second(loader, batches))
        for name, r in rates.items():
            total = statistics.median(r)
            print(f"workers={workers}  {name:16s} {total:6.1f} pairs/s  ({total / max(workers, 1):.1f} per worker)")


def bench_builder(args, tmp):
    jpeg = tmp / "one.JPEG"
    Image.new("RGB", (16, 12), (90, 120, 30)).save(jpeg, quality=90)
    payload = jpeg.read_bytes()
    wnids = [f"n{i:08d}" for i in range(args.classes)]
    for wnid in wnids:
        (tmp / "train" / wnid).mkdir(parents=True)
        for i in range(args.files):
            (tmp / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(payload)
    root = tmp / "train"
    start = time.perf_counter()
    listed = sum(len(pairs.list_images(root, w)) for w in wnids)
    listing = time.perf_counter() - start
    start = time.perf_counter()
    built = pairs.random_pairs(root, wnids, args.per_class, seed=0)
    building = time.perf_counter() - start
    print(f"{args.classes} classes x {args.files} files: listing {listing:.2f} s "
          f"({listing / listed * 1e6:.1f} us/file); random build of {len(built)} pairs "
          f"(listing + header check of {2 * len(built)} images) {building:.2f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    x = torch.nn.functional.normalize(torch.randn(2, 1300, 2048), dim=2)
    start = time.perf_counter()
    pairs.mine_class("c", [str(i) for i in range(1300)], x[0], x[1], torch.ones(1300, dtype=torch.bool), 157, 1.0, 0)
    print(f"mining one 1300-image class (2048-d features, 157 pairs): {time.perf_counter() - start:.2f} s")
    print(f"extrapolated to ImageNet-1k train (1,281,167 files; 173 x 314 images checked for --classes paper): "
          f"listing {1_281_167 * listing / listed:.0f} s, header checks "
          f"{173 * 314 * (building - listing) / (2 * len(built)):.0f} s (page cache warm)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    loader = sub.add_parser("loader")
    loader.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    loader.add_argument("--images", type=int, default=200)
    loader.add_argument("--batch-size", type=int, default=16)
    loader.add_argument("--rounds", type=int, default=3)
    builder = sub.add_parser("builder")
    builder.add_argument("--classes", type=int, default=1000)
    builder.add_argument("--files", type=int, default=60)
    builder.add_argument("--per-class", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (bench_loader if args.what == "loader" else bench_builder)(args, Path(tmp))


if __name__ == "__main__":
    main()
