"""Data-loader throughput (pairs/s): semantic pairs, augmented pairs, and a plain two-view
torchvision ImageFolder loader over the same images (the embedded world's pretraining pool).

    python bench/pair_loader.py [--workers 0 1] [--rounds 5] [--no-cache]

The three loaders are timed in interleaved rounds in one process and medians reported, so the
ratios hold on a noisy machine. Each uses SimCLR's view pipeline and batch size 256.
"""
import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from common import data, transforms
from common.world import WorldConfig, ensure_world


class TwoViews:
    def __init__(self, views):
        self.views = views

    def __call__(self, img):
        return self.views[0][0](img), self.views[1][0](img)


def pairs_per_second(loader, batches):
    it = iter(loader)
    next(it)  # start-up (worker spawn, first batch) is not throughput
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        n += len(batch[-1])
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-cache", action="store_true", help="decode every image every time, as the plain loader does")
    args = parser.parse_args()
    cfg = WorldConfig()
    root = ensure_world(cfg)
    views = transforms.pair_views("simclr", cfg.img_size, crop_scale=(0.2, 1.0))  # the world runs' views
    ns = argparse.Namespace(data=None, manifest=None, world=None, images_per_class=None, ap_images="image_a")
    datasets = {
        "semantic pairs": data.pretrain_dataset(argparse.Namespace(**vars(ns), pairs="semantic"), views),
        "augmented pairs": data.pretrain_dataset(argparse.Namespace(**vars(ns), pairs="augmented"), views),
    }
    if args.no_cache:
        for ds in datasets.values():
            ds.cache_bytes = 0
    print(f"world {root.name}: {cfg.img_size} px, {len(datasets['semantic pairs'])} pairs, "
          f"torch threads {torch.get_num_threads()}, decoded images {'not ' if args.no_cache else ''}kept")
    for workers in args.workers:
        def loaders():
            for name, ds in datasets.items():
                sampler = data.SeededBatchSampler(len(ds), args.batch_size, seed=0)
                yield name, data.make_loader(ds, sampler, workers, torch.device("cpu"))
            plain = ImageFolder(root / "train", transform=TwoViews(views))
            yield "plain two-view ImageFolder", DataLoader(plain, args.batch_size, shuffle=True, drop_last=True,
                                                           num_workers=workers, persistent_workers=workers > 0)
        built = dict(loaders())
        rates = {name: [] for name in built}
        for _ in range(args.rounds):
            for name, loader in built.items():
                rates[name].append(pairs_per_second(loader, args.batches))
        plain = statistics.median(rates["plain two-view ImageFolder"])
        for name, r in rates.items():
            print(f"workers={workers}  {name:28s} {statistics.median(r):8.0f} pairs/s  "
                  f"({statistics.median(r) / plain:.2f}x plain)")


if __name__ == "__main__":
    main()
