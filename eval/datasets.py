"""Labelled evaluation data shared by the linear probe, kNN, fine-tuning and invariance scripts:
the downstream datasets (STL-10, CIFAR-10, CIFAR-100 through torchvision's readers, never
downloaded) and the embedded world's transfer splits, their evaluation views, the flags the
scripts share, and the backbone and run settings a checkpoint comes with.

Views
- centre: resize the short side to img_size, then centre-crop img_size (transforms.eval_transform
  with ratio 1): the whole image for the square downstream datasets and the world, as in the
  SimCLR/Kornblith transfer protocol (linusericsson/ssl-transfer, linear.py: Resize(224) and
  CenterCrop(224)). ImageNet's habit of resizing to 256/224 first would cut 1/16 of each side.
- random (the study's Table 4 "random crop test", test images only): a crop of RANDOM_CROP_SCALE
  of the image's area with aspect ratio in RANDOM_CROP_RATIO at a random position, resized to
  img_size: a fifth to a half of the image, so that usually only part of the object shows (the
  centre view keeps the whole image). Each image's crop depends on (--seed, its index) alone.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from common.backbones import infer_arch, load_backbone
from common import flags
from common.data import LabelledImages, image_folder, seeded, world_config, world_setting
from common.transforms import eval_transform, to_tensor
from eval.features import cached_features, file_digest

DATASETS = ("stl10", "cifar10", "cifar100", "embedded")
LAYOUTS = {
    "stl10": "ROOT/stl10_binary/{train_X.bin,train_y.bin,test_X.bin,test_y.bin,unlabeled_X.bin} "
             "(stl10_binary.tar.gz extracted into ROOT)",
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..data_batch_5,test_batch,batches.meta} "
               "(cifar-10-python.tar.gz extracted into ROOT)",
    "cifar100": "ROOT/cifar-100-python/{train,test,meta} (cifar-100-python.tar.gz extracted into ROOT)",
    "embedded": "ROOT/transfer/{seen,unseen}/{train,test}/<class>/<image>.png (a world written by common.world)",
}
FOLDERS = {"stl10": "stl10_binary", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
           "embedded": "transfer"}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
RANDOM_CROP_SCALE = (0.2, 0.5)
RANDOM_CROP_RATIO = (3 / 4, 4 / 3)


class DatasetNotFound(FileNotFoundError):
    """A downstream dataset missing (or failing its checksums); the message names the layout expected."""


def labelled_images(name, root, part, split="seen"):
    """(dataset of (PIL RGB image, label), class names) of `part` ("train" or "test").

    `split` picks the embedded world's transfer split: "seen" (new instances of the pretraining
    classes) or "unseen" (classes never used for pretraining).
    """
    root = Path(root)
    try:
        if name == "stl10":
            images = torchvision.datasets.STL10(root, split=part, download=False)
            return images, getattr(images, "classes", STL10_CLASSES)
        if name in ("cifar10", "cifar100"):
            reader = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            images = reader(root, train=part == "train", download=False)
            return images, images.classes
    except RuntimeError:  # torchvision's "Dataset not found or corrupted" (a missing file or a wrong MD5)
        raise DatasetNotFound(f"{name} not found under {root}, or its files fail torchvision's checksums; "
                              f"expected {LAYOUTS[name]}") from None
    if name == "embedded":
        folder = root / "transfer" / split
        if not (folder / "train").is_dir():
            raise DatasetNotFound(f"no transfer split {folder}; expected {LAYOUTS[name]}")
        classes = image_folder(folder / "train")[1]  # the test part is labelled with the train part's classes
        return LabelledImages(image_folder(folder / part, classes)[0], v2.Identity(), classes), classes
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


class Views(Dataset):
    """(transform(image), label) over a dataset of (PIL image, label).

    An integer key i draws the transform's randomness from (seed, i) alone, so a random view of
    an image is the same in every run; a key (i, s), as SeededBatchSampler yields, uses seed s.
    """

    def __init__(self, images, transform, seed=0):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, self.seed * 1_000_003 + key)
        image, label = self.images[index]
        with seeded(seed):
            return self.transform(image), label


CENTRE_RESIZE_RATIO = 1.0  # short side resized to img_size before the centre crop: keeps the whole image


def eval_view(img_size, crop="center"):
    """The evaluation view: the centre view, or the random partial crop of the Table 4 test."""
    if crop == "center":
        return eval_transform(img_size, CENTRE_RESIZE_RATIO)
    if crop == "random":
        return v2.Compose([v2.RandomResizedCrop(img_size, scale=RANDOM_CROP_SCALE, ratio=RANDOM_CROP_RATIO,
                                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                           to_tensor()])
    raise ValueError(f"unknown crop {crop!r}; choose center or random")


def view_protocol(img_size, crop, seed):
    """The view settings as written into result files."""
    out = {"img_size": img_size, "crop": crop, "resize_ratio": CENTRE_RESIZE_RATIO}
    if crop == "random":
        out.update(crop_scale=list(RANDOM_CROP_SCALE), crop_ratio=list(RANDOM_CROP_RATIO), crop_seed=seed)
    return out


# ------------------------------------------------------------------ shared command-line flags

def add_eval_args(parser, data=True):
    """The flags the evaluation scripts share; `data`: the dataset flags too (not for invariance,
    which renders its own images)."""
    parser.add_argument("--checkpoint", required=True, help="a backbone.pth (RUN/config.json is read when present)")
    if data:
        parser.add_argument("--dataset", choices=DATASETS, default="embedded")
        parser.add_argument("--data-root", help="dataset root (embedded: default the run's world)")
        parser.add_argument("--crop", choices=("center", "random"), default="center", help="test-image view")
    parser.add_argument("--split", choices=("seen", "unseen"), default="seen",
                        help="embedded world: new instances of the pretraining classes, or unseen classes")
    parser.add_argument("--world", nargs="*", type=world_setting, metavar="KEY=VALUE",
                        help="embedded-world settings (default: those the run was pretrained with)")
    parser.add_argument("--img-size", type=flags.bounded(int, 8),
                        help="input size (default: the run's, else 32 for the convnet, 224 otherwise)")
    parser.add_argument("--seed", type=flags.SEED, default=0, help="evaluation seed (validation split, random crops, ...)")
    parser.add_argument("--batch-size", type=flags.POSITIVE_INT, default=256, help="images per forward pass")
    parser.add_argument("--workers", type=flags.COUNT, help="data-loading processes (default: 8 on CUDA, 0 on CPU)")
    parser.add_argument("--device", type=flags.device, default=flags.default_device())
    parser.add_argument("--out",
                        help="result JSON (default: RUN/results/<eval>-<dataset>[-<split>][-<crop>]-s<seed>.json)")
    return parser


def run_config(checkpoint):
    """The config.json the training script wrote next to `checkpoint` ({} if none), with the world's
    seed and the run's collapse measure: the last epoch's mean embedding_std in its log.jsonl
    (None where the run logged none, e.g. the baselines)."""
    folder = Path(checkpoint).parent
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    config["world_seed"] = (config.get("world_config") or {}).get("seed")
    log = folder / "log.jsonl"
    epochs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    spreads = [r["embedding_std"] for r in epochs if "embedding_std" in r and "step" not in r]
    config["embedding_std"] = spreads[-1] if spreads else None
    return config


def load_for_eval(args):
    """Resolves the shared flags in place (args.run, args.arch, args.checkpoint_sha256,
    args.img_size, args.workers) and returns (backbone on args.device, feature dimension)."""
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    args.checkpoint_sha256 = file_digest(args.checkpoint)
    args.run = run_config(args.checkpoint)
    args.arch = infer_arch(torch.load(args.checkpoint, map_location="cpu", weights_only=True))[0]
    # A ViT's position embedding has the pretraining size; other input sizes are interpolated.
    backbone, dim = load_backbone(args.checkpoint, args.run.get("img_size") or 224)
    backbone.to(torch.device(args.device))
    args.img_size = args.img_size or args.run.get("img_size") or (32 if args.arch == "convnet" else 224)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if args.device.startswith("cuda") else 0
    return backbone, dim


def world_settings(args):
    """The --world list, else the one the run was pretrained with (None: the default world)."""
    return args.world if args.world is not None else args.run.get("world")


def data_root(args):
    """--data-root; for the embedded world by default the run's world, generated on first use."""
    if args.data_root is None:
        if args.dataset != "embedded":
            raise FileNotFoundError(f"--data-root is required for {args.dataset}; expected {LAYOUTS[args.dataset]}")
        from common.world import ensure_world

        args.data_root = str(ensure_world(world_config(world_settings(args))))
    return args.data_root


def result_path(args, eval_kind, crop=None):
    """--out, else RUN/results/<eval>-<dataset>[-<split>][-<crop>]-s<seed>.json."""
    if args.out:
        return Path(args.out)
    split = f"-{args.split}" if args.dataset == "embedded" else ""
    crop = f"-{crop}" if crop else ""
    return Path(args.checkpoint).parent / "results" / f"{eval_kind}-{args.dataset}{split}{crop}-s{args.seed}.json"


def data_fingerprint(name, root, split="seen"):
    """A digest of the names, sizes and modification times of a dataset's files: data replaced
    under the same root gets new cached features."""
    folder = Path(root) / FOLDERS[name] / (split if name == "embedded" else "")
    stats = sorted(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                   for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(stats).encode()).hexdigest()[:16]


def dataset_features(args, backbone, part, crop="center"):
    """(features, labels, class names) of `part` of the flags' dataset in the `crop` view, cached
    under RUN/features/ and keyed by the checkpoint's digest, the data and the view."""
    images, classes = labelled_images(args.dataset, data_root(args), part, args.split)
    split = f"-{args.split}" if args.dataset == "embedded" else ""
    seed = f"-s{args.seed}" if crop == "random" else ""
    path = Path(args.checkpoint).parent / "features" / f"{args.dataset}{split}-{part}-{crop}{seed}-{args.img_size}.pt"
    key = {"checkpoint_sha256": args.checkpoint_sha256, "data_root": str(Path(args.data_root).resolve()),
           "data": data_fingerprint(args.dataset, args.data_root, args.split), "part": part,
           **view_protocol(args.img_size, crop, args.seed)}
    dataset = Views(images, eval_view(args.img_size, crop), args.seed)
    feats, labels = cached_features(backbone, dataset, torch.device(args.device), path, key, args.batch_size,
                                    args.workers)
    return feats, labels, classes
