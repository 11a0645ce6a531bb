"""Datasets and loaders: semantic/augmented pair datasets, labelled image lists, and a seeded
sampler that makes every epoch reproducible and resumable. Images are read by common/images.py.

Pretraining data is an image root in ImageFolder layout plus a pairs manifest
(common/pairs.py). Without `--data`, the embedded nuisance world (common/world.py) is
generated once into a cache folder and used instead.
"""
import argparse
import contextlib
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from common import pairs as manifest
from common.images import ImageError, load_rgb, open_image  # noqa: F401 (data.ImageError etc. for callers)


@contextlib.contextmanager
def seeded(seed):
    """Runs the block with torch's (CPU) and Python's global RNGs seeded, restoring them afterwards.
    Seeds the generator itself: torch.manual_seed, through its compile and CUDA wrappers, cost
    more than a 32-px view's whole pipeline."""
    state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
        torch.set_rng_state(torch_state)


class SeededBatchSampler(Sampler):
    """Yields batches of (index, sample seed) pairs.

    Each epoch's order and every sample's augmentation seed come from (seed, epoch) alone, so
    a run is reproducible whatever the number of workers, and resumes exactly mid-epoch
    (`set_epoch(epoch, start_batch)`). `batch_size` is global: under distributed training each
    rank takes its slice of every global batch, so the global batch is the same for any
    number of processes.
    """

    def __init__(self, num_items, batch_size, seed=0, shuffle=True, drop_last=True, rank=0, world_size=1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g) if self.shuffle else torch.arange(self.num_items)
        seeds = torch.randint(2**62, (self.num_items,), generator=g)
        per_rank = self.batch_size // self.world_size
        for b in range(self.start_batch, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world_size > 1 else batch
            yield [(int(i), int(seeds[i])) for i in mine]


class PairDataset(Dataset):
    """Views of pairs: items are (label, path_a, path_b); `views` is a list of (transform,
    source) with source 0 for image_a and 1 for image_b, e.g. [(view1, 0), (view2, 1)].
    Returns (*views, label).

    Semantic pairs have two different images; augmented pairs have path_a == path_b, and the
    image is decoded once and viewed twice. Keys are (index, seed) from SeededBatchSampler.
    """

    # Decoded images are kept (per loader worker) when all of them fit in this many bytes, as the
    # embedded world's do: a 32-px image costs about half as much to decode as to view.
    cache_bytes = 256 * 2**20

    def __init__(self, root, items, views, classes):
        self.root, self.items, self.views, self.classes = Path(root), items, views, classes
        self.num_images = len({name for _, a, b in items for name in (a, b)})
        self._cache = None  # decided on the first image: a dict, or False

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key
        label, a, b = self.items[index]
        img_a = self._image(a)
        images = (img_a, img_a if b == a else self._image(b))
        with seeded(seed):
            return (*(transform(images[source]) for transform, source in self.views), label)

    def _image(self, name):
        img = self._cache.get(name) if self._cache else None
        if img is None:
            img = load_rgb(self.root / name)
            if self._cache is None:
                self._cache = {} if self.num_images * img.width * img.height * 3 <= self.cache_bytes else False
            if self._cache is not False:
                self._cache[name] = img
        return img


class LabelledImages(Dataset):
    """(transform(image), label) over a list of (path, label); keys are indices or (index, seed)."""

    def __init__(self, samples, transform, classes):
        self.samples, self.transform, self.classes = samples, transform, classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        path, label = self.samples[index]
        img = load_rgb(path)
        with seeded(seed):
            return self.transform(img), label


def image_folder(root, classes=None):
    """(samples, classes) of an ImageFolder tree, optionally restricted to given class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected {root}/<class>/<image>)")
    names = classes if classes is not None else find_classes(root)[0]
    samples = make_dataset(root, {c: i for i, c in enumerate(names)}, IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"no images under {root} (expected {root}/<class>/<image>)")
    return samples, list(names)


def world_config(overrides):
    """A WorldConfig from `key=value` strings (the scripts' --world flag)."""
    from common.world import WorldConfig

    fields = WorldConfig.__dataclass_fields__
    kwargs = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"unknown world setting {key!r}; known: {', '.join(fields)}")
        kind = type(getattr(WorldConfig(), key))
        try:
            kwargs[key] = kind(value)
        except ValueError:
            raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    return WorldConfig(**kwargs)


def world_setting(text):
    """An argparse type for --world's KEY=VALUE items: a known setting and a value of its type."""
    try:
        world_config([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def resolve_data(args):
    """(image root, manifest path, world root or None) for the scripts' data flags."""
    if args.data is None:
        from common.world import ensure_world

        world = ensure_world(world_config(args.world))
        return world / "train", world / "pairs.csv", world
    root = Path(args.data)
    return root, Path(args.manifest) if args.manifest else root / "pairs.csv", None


def pretrain_dataset(args, views, mode=None):
    """The pretraining PairDataset for `mode` (default --pairs): semantic or augmented pairs,
    checked before training.
    `views`: [(transform, source)] as PairDataset takes.

    Raises ManifestError naming every problem (with line numbers) before any image is decoded.
    """
    root, manifest_path, _ = resolve_data(args)
    pairs = manifest.load_pairs(manifest_path, root)
    if args.images_per_class:
        pairs = manifest.first_per_class(pairs, args.images_per_class)
    classes = sorted({p.cls for p in pairs})
    index = {c: i for i, c in enumerate(classes)}
    if (mode or args.pairs) == "semantic":
        items = [(index[p.cls], p.image_a, p.image_b) for p in pairs]
    else:
        items = [(index[c], name, name) for c, name in manifest.augmented_images(pairs, args.ap_images == "all")]
    return PairDataset(root, items, views, classes)


def monitor_split(args, pretrain):
    """Labelled (bank, queries) sample lists for the kNN monitor, or None.

    On the embedded world: its seen-class transfer split (train as bank, test as queries). On
    real data: the manifest's images as bank and up to 10 unused images per class from the same
    class folders as queries (ImageNet folders hold far more images than a manifest uses).
    """
    root, _, world = resolve_data(args)
    if world is not None:
        bank, classes = image_folder(world / "transfer" / "seen" / "train")
        return bank, image_folder(world / "transfer" / "seen" / "test", classes)[0], classes
    used = {name for _, a, b in pretrain.items for name in (a, b)}
    bank = sorted({(str(root / name), label) for label, a, b in pretrain.items for name in (a, b)})
    queries, taken = [], {}
    for path, label in image_folder(root, pretrain.classes)[0]:
        if Path(path).relative_to(root).as_posix() not in used and taken.get(label, 0) < 10:
            taken[label] = taken.get(label, 0) + 1
            queries.append((path, label))
    return (bank, queries, pretrain.classes) if queries else None


def make_loader(dataset, batch_sampler, workers, device):
    """A DataLoader over a SeededBatchSampler with the GPU-friendly settings: pinned memory on
    CUDA, workers kept across epochs, four batches prefetched per worker. It has its own random
    generator (samples are seeded by the sampler), so starting an epoch draws nothing from the
    global one and a resumed run's random stream matches an uninterrupted run's."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator())
