"""Semantic-pair manifests: building them from ImageNet, checking them, the matched augmented
baseline and nested subsets.

A manifest is a CSV with header `class,image_a,image_b`; image paths are relative to the
image root (an ImageFolder tree whose first path component is the class folder). Extra
columns after those three are allowed (mined pairs carry their scores there).

    python -m common.pairs build --imagenet-root IMAGENET/train --classes paper --per-class 157 \\
        --strategy random --seed 0 --out pairs.csv
    python -m common.pairs build ... --strategy mined --features backbone.pth --out mined.csv
    python -m common.pairs check --root IMAGENET/train --pairs pairs.csv [--decode]
    python -m common.pairs subset --pairs pairs.csv --per-class 50 --out pairs50.csv
    python -m common.pairs baseline --pairs pairs.csv [--all-images] --out images.csv

--classes is `paper` (Appendix A.4, common/resources/paper_classes.csv), `all` (every class folder)
or a class-list file (see common/imagenet.py). No image is in two pairs; the pairs of a class
are written in a seeded random order, so the first N of each class (`subset`, the scripts'
--images-per-class) are nested random subsets: 50 in 100 in 157.
"""
import argparse
import csv
import itertools
import os
import pickle
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from common.images import ImageError, load_rgb, open_image

HEADER = ("class", "image_a", "image_b")
SCORE_COLUMNS = ("object_sim", "context_sim", "score")
# Side of the central square taken as the object when mining, as a fraction of the short side.
OBJECT_FRACTION = 0.6


@dataclass(frozen=True)
class Pair:
    line: int  # line number in the manifest file (the header is line 1); 0 for built pairs
    cls: str
    image_a: str
    image_b: str
    extra: tuple = ()  # (column, value) for columns after the first three


@dataclass(frozen=True)
class Problem:
    line: int  # 0 when the problem concerns the whole file
    message: str

    def __str__(self):
        return f"line {self.line}: {self.message}" if self.line else self.message


class ManifestError(Exception):
    def __init__(self, path, problems):
        self.path, self.problems = path, problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


# -- reading and checking ---------------------------------------------------------------------------

def read_manifest(path):
    """Parses a manifest into Pairs; returns (pairs, problems) with format problems only."""
    problems, pairs = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets add a BOM
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], [Problem(0, f"cannot read manifest: {e}")]
    if not rows or tuple(c.strip() for c in rows[0][:3]) != HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        return [], [Problem(1, f"header must start with {','.join(HEADER)}, found {found!r}")]
    extra_columns = [c.strip() for c in rows[0][3:]]
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < 3 or not all(c.strip() for c in row[:3]):
            problems.append(Problem(line, f"expected class,image_a,image_b, found {','.join(row)!r}"))
            continue
        extra = tuple(zip(extra_columns, (c.strip() for c in row[3:])))
        pairs.append(Pair(line, *(c.strip() for c in row[:3]), extra))
    return pairs, problems


def check_pairs(pairs, root, decode=False):
    """Checks pairs against an image tree: paths, classes, self/duplicate pairs, image reuse, and
    that every image opens as an image (its header; with decode, the whole file). Returns Problems."""
    root = Path(root)
    problems, first_seen, seen_pairs, checked = [], {}, {}, set()
    for p in pairs:
        for name in (p.image_a, p.image_b):
            # Judged on the text, not the resolved path: class folders are often symlinks.
            rel = os.path.normpath(name)
            if os.path.isabs(name) or rel == os.pardir or rel.startswith(os.pardir + os.sep):
                problems.append(Problem(p.line, f"path leaves the image root: {name}"))
            elif not (root / rel).is_file():
                problems.append(Problem(p.line, f"missing file: {name}"))
            elif rel not in checked:
                checked.add(rel)
                try:
                    if decode:
                        load_rgb(root / rel)
                    else:
                        open_image(root / rel).close()
                except ImageError as e:
                    problems.append(Problem(p.line, str(e)))
            if rel.split(os.sep)[0] != p.cls:
                problems.append(Problem(p.line, f"cross-class pair: {name} is not in class folder {p.cls}/"))
        if p.image_a == p.image_b:
            problems.append(Problem(p.line, f"self pair: {p.image_a} paired with itself"))
            continue
        key = frozenset((p.image_a, p.image_b))
        if key in seen_pairs:
            problems.append(Problem(p.line, f"duplicate pair (first on line {seen_pairs[key]})"))
            continue
        seen_pairs[key] = p.line
        for name in (p.image_a, p.image_b):
            if name in first_seen:
                problems.append(Problem(p.line, f"image reused across pairs: {name} "
                                                f"(first on line {first_seen[name]})"))
            else:
                first_seen[name] = p.line
    return problems


def load_pairs(path, root, decode=False):
    """Reads and checks a manifest; raises ManifestError listing every problem found."""
    if not Path(root).is_dir():
        raise ManifestError(path, [Problem(0, f"image root not found: {root}")])
    pairs, problems = read_manifest(path)
    problems += check_pairs(pairs, root, decode)
    if problems:
        raise ManifestError(path, problems)
    return pairs


def per_class_counts(pairs):
    return Counter(p.cls for p in pairs)


def first_per_class(pairs, n):
    """The first n pairs of each class in file order, so that subsets nest (50 ⊂ 100 ⊂ 157)."""
    taken, out = Counter(), []
    for p in pairs:
        if taken[p.cls] < n:
            taken[p.cls] += 1
            out.append(p)
    short = sorted(c for c, k in per_class_counts(pairs).items() if k < n)
    if short:
        raise ValueError(f"{len(short)} classes have fewer than {n} pairs (e.g. {short[0]})")
    return out


def augmented_images(pairs, all_images=False):
    """The matched augmented-pair baseline: (class, image) for image_a of every pair (same
    classes, same pairs per class), or every unique image of the manifest."""
    if not all_images:
        return [(p.cls, p.image_a) for p in pairs]
    return [(p.cls, name) for p in pairs for name in (p.image_a, p.image_b)]


def summary(pairs):
    counts = per_class_counts(pairs)
    images = {n for p in pairs for n in (p.image_a, p.image_b)}
    per = sorted(counts.values())
    spread = f"{per[0]}" if per and per[0] == per[-1] else f"{per[0]}-{per[-1]}" if per else "0"
    return f"{len(pairs)} pairs, {len(counts)} classes, {spread} pairs per class, {len(images)} unique images"


def write_manifest(path, pairs):
    """Writes pairs as a manifest, with their extra columns (those of the first pair)."""
    extra = [name for name, _ in pairs[0].extra] if pairs else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER + tuple(extra))
        w.writerows((p.cls, p.image_a, p.image_b, *(v for _, v in p.extra)) for p in pairs)


# -- building ---------------------------------------------------------------------------------------

def list_images(root, cls):
    """Sorted `cls/<file>` paths of the image files in a class folder (no decoding, one scandir)."""
    with os.scandir(Path(root) / cls) as entries:
        names = [e.name for e in entries if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file()]
    return [f"{cls}/{name}" for name in sorted(names)]


def class_rng(seed, cls):
    """A generator for one class: its draws depend on the seed and the class alone."""
    return np.random.default_rng([seed, zlib.crc32(cls.encode())])


def build_classes(root, spec):
    """Class folders to build from: `all` (every folder of root), `paper` or a class-list file.
    Every listed class must have a folder, except the paper's two ImageNet-21k-only classes,
    which are used only where present."""
    from common.imagenet import WNID, read_class_list

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root}")
    with os.scandir(root) as entries:
        folders = sorted(e.name for e in entries if e.is_dir())
    if (root / "train").is_dir() and not any(WNID.fullmatch(f) for f in folders):
        raise FileNotFoundError(f"{root} holds no class folders but a train/ folder: "
                                f"did you mean --imagenet-root {root / 'train'}?")
    if not folders:
        raise FileNotFoundError(f"no class folders in {root}")
    if spec == "all":
        return folders
    classes, present = read_class_list(spec), set(folders)
    missing = [c for c in classes if c.wnid not in present and (spec != "paper" or c.in_1k)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} classes of {spec} have no folder in {root}: "
                                + ", ".join(f"{c.wnid} ({c.name})" for c in missing[:10]))
    for c in classes:
        if c.wnid not in present:
            print(f"note: {c.name} ({c.wnid}) is not an ImageNet-1k class and has no folder: left out",
                  file=sys.stderr)
    return [c.wnid for c in classes if c.wnid in present]


def random_pairs(root, classes, per_class, seed, decode=False):
    """Pairs each class's images at random: a seeded shuffle of the class folder, skipping files
    that do not open as images (with decode: that do not decode), paired consecutively."""
    root, pairs, short = Path(root), [], []
    for cls in classes:
        names = list_images(root, cls)
        chosen = []
        for i in class_rng(seed, cls).permutation(len(names)):
            if len(chosen) == 2 * per_class:
                break
            try:
                load_rgb(root / names[i]) if decode else open_image(root / names[i]).close()
                chosen.append(names[i])
            except ImageError as e:
                print(f"skipped: {e}", file=sys.stderr)
        if len(chosen) < 2 * per_class:
            short.append(f"{cls} ({len(chosen)})")
        pairs += [Pair(0, cls, a, b) for a, b in zip(chosen[0::2], chosen[1::2])]
    if short:
        raise ValueError(f"{len(short)} classes have fewer than the {2 * per_class} readable images "
                         f"needed for {per_class} pairs: {', '.join(short[:10])}")
    return pairs


def load_feature_extractor(path):
    """A backbone from one of our backbone.pth files or a torchvision-format state dict of the
    same architectures (its classifier `fc` dropped; `module.` prefixes and a {'state_dict': ...}
    or {'model': ...} wrapper undone). Returns (model, feature dimension)."""
    from common.backbones import build_backbone, infer_arch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        arch, width = infer_arch(state)
        model, dim = build_backbone(arch, width=width or 32)
        model.load_state_dict(state)
    except (OSError, RuntimeError, ValueError, AttributeError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot load a feature extractor from {path}: {str(e).splitlines()[0]}") from None
    return model, dim


class MiningViews(Dataset):
    """(object view, context view, error) of images for mining. The object view is the central
    square of side OBJECT_FRACTION x the short side; the context view is the centre crop with that
    square blanked to the mean colour, so it sees the surroundings alone. Both are size x size.
    An image that cannot be decoded gives zero views and its error message."""

    def __init__(self, root, names, size):
        from common.transforms import eval_transform

        self.root, self.names = Path(root), names
        self.object_view = eval_transform(size, resize_ratio=1 / OBJECT_FRACTION)
        self.context_view = eval_transform(size, resize_ratio=1.0)
        side = round(size * OBJECT_FRACTION)
        self.hole = slice((size - side) // 2, (size - side) // 2 + side)
        self.size = size

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        try:
            img = load_rgb(self.root / self.names[index])
        except ImageError as e:
            blank = torch.zeros(3, self.size, self.size)
            return blank, blank, str(e)
        context = self.context_view(img)
        context[:, self.hole, self.hole] = 0  # 0 after normalisation = the mean colour
        return self.object_view(img), context, ""


def match_pairs(score, k):
    """Greedy maximum-score matching stopped at k pairs: repeatedly pair the two still unpaired
    images of highest score. Done in rounds: every pair of mutually best partners among the
    unpaired images is one the one-at-a-time greedy takes, so each round takes them all with a
    few n x n tensor operations. Returns (i, j, score) tensors of at most k pairs, best first."""
    empty = torch.zeros(0, dtype=torch.long)
    if len(score) < 2:
        return empty, empty, torch.zeros(0)
    s = score.detach().float()
    s = (s + s.T) / 2  # exactly symmetric: matrix products may differ in the last bit across the diagonal
    s.fill_diagonal_(float("-inf"))
    index = torch.arange(len(s))
    found_i, found_j, found_s = [], [], []
    while True:
        best_score, best = s.max(dim=1)  # ties go to the lowest index, so a round always finds a pair
        mutual = (best[best] == index) & (index < best) & torch.isfinite(best_score)
        if not mutual.any():
            break
        i, j = index[mutual], best[mutual]
        found_i.append(i)
        found_j.append(j)
        found_s.append(best_score[mutual])
        taken = torch.cat([i, j])
        s[taken] = float("-inf")
        s[:, taken] = float("-inf")
        scores = torch.cat(found_s)
        # Stop once no remaining pair could enter the best k.
        if len(scores) >= k and scores.topk(k).values[-1] >= s.max():
            break
    if not found_s:
        return empty, empty, torch.zeros(0)
    i, j, scores = torch.cat(found_i), torch.cat(found_j), torch.cat(found_s)
    order = scores.argsort(descending=True, stable=True)[:k]
    return i[order], j[order], scores[order]


def mine_class(cls, names, objects, contexts, usable, per_class, lam, seed):
    """The mined pairs of one class from its L2-normalised object and context features (on any
    device; the matching runs on the CPU, where ties break the same way everywhere)."""
    object_sim, context_sim = (objects @ objects.T).cpu(), (contexts @ contexts.T).cpu()
    score = object_sim - lam * context_sim
    score[~usable] = float("-inf")
    score[:, ~usable] = float("-inf")
    i, j, _ = match_pairs(score, per_class)
    order = torch.as_tensor(class_rng(seed, cls).permutation(len(i)))  # random file order: subsets nest at random
    i, j = i[order], j[order]
    columns = zip(object_sim[i, j].tolist(), context_sim[i, j].tolist(), score[i, j].tolist())
    return [Pair(0, cls, names[a], names[b], tuple(zip(SCORE_COLUMNS, (f"{v:.4f}" for v in values))))
            for a, b, values in zip(i.tolist(), j.tolist(), columns)]


def class_features(model, dim, loader, sizes, device):
    """Yields (features (2, n, dim): object and context, L2-normalised, on the device; decoding
    errors) for each class in turn, as soon as the loader has delivered its n = sizes[c] images."""
    held, errors, c = torch.zeros(2, 0, dim, device=device), [], 0
    for objects, contexts, error in itertools.chain(loader, [(None, None, [])]):
        if objects is not None:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                f = model(torch.cat([objects, contexts]).to(device, non_blocking=True))
            f = F.normalize(f.float(), dim=1)
            held = torch.cat([held, torch.stack(f.split(len(objects)))], dim=1)
            errors += error
        while c < len(sizes) and len(errors) >= sizes[c]:
            yield held[:, :sizes[c]], errors[:sizes[c]]
            held, errors, c = held[:, sizes[c]:], errors[sizes[c]:], c + 1


def mined_pairs(root, classes, per_class, seed, features, lam=1.0, size=224, batch_size=128, workers=0,
                device="cpu", candidates=None):
    """Semantic pairs chosen by a feature extractor: within each class, images whose objects look
    alike while their surroundings differ.

    Rule: every candidate image gets two L2-normalised features from one backbone, of its object
    view (the central square) and of its context view (the rest; see MiningViews). Within a class,
    score(i, j) = cos(object_i, object_j) - lam * cos(context_i, context_j); the pairs are the
    first per_class taken by greedy maximum-score matching (match_pairs), so no image is in two
    pairs. Candidates are every image of the class folder, or a seeded sample of `candidates` of
    them. Features are computed once, in batches, class after class; each class's scores are two
    matrix products. The seed fixes the candidate sample and the order pairs are written in."""
    from tqdm import tqdm

    root, device = Path(root), torch.device(device)
    model, dim = load_feature_extractor(features)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    names = []
    for cls in classes:
        found = list_images(root, cls)
        if candidates and len(found) > candidates:
            found = sorted(class_rng(seed, cls).choice(found, candidates, replace=False).tolist())
        names.append(found)
    loader = DataLoader(MiningViews(root, [n for found in names for n in found], size), batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    loader = tqdm(loader, desc="mining features", unit="batch", file=sys.stderr)
    pairs, short = [], []
    with torch.inference_mode():
        for c, (feats, errors) in enumerate(class_features(model, dim, loader, [len(n) for n in names], device)):
            for message in filter(None, errors):
                print(f"skipped: {message}", file=sys.stderr)
            usable = torch.tensor([not m for m in errors], dtype=torch.bool)
            found = mine_class(classes[c], names[c], feats[0], feats[1], usable, per_class, lam, seed)
            if len(found) < per_class:
                short.append(f"{classes[c]} ({len(found)})")
            pairs += found
    if short:
        raise ValueError(f"{len(short)} classes have too few readable images for {per_class} pairs "
                         f"(pairs found): {', '.join(short[:10])}")
    return pairs


# -- command line -----------------------------------------------------------------------------------

def cmd_build(args):
    if args.strategy == "mined" and not args.features:
        raise ValueError("--strategy mined needs a trained feature extractor: pass --features with one of our "
                         "backbone.pth files or a torchvision-format ResNet state dict (nothing can be "
                         "downloaded, and a randomly initialised network gives meaningless pairs)")
    started = time.perf_counter()
    classes = build_classes(args.imagenet_root, args.classes)
    if args.strategy == "random":
        pairs = random_pairs(args.imagenet_root, classes, args.per_class, args.seed, args.decode)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pairs = mined_pairs(args.imagenet_root, classes, args.per_class, args.seed, args.features, args.lam,
                            args.size, args.batch_size, args.workers, device, args.candidates)
    write_manifest(args.out, pairs)
    print(f"{args.out}: {args.strategy} pairs, {summary(pairs)} ({time.perf_counter() - started:.1f} s)")
    return 0


def cmd_check(args):
    pairs, problems = read_manifest(args.pairs)
    if Path(args.root).is_dir():
        problems += check_pairs(pairs, args.root, args.decode)
    else:
        problems.append(Problem(0, f"image root not found: {args.root}"))
    counts = per_class_counts(pairs)
    if args.per_class:
        problems += [Problem(0, f"class {c} has {n} pairs, fewer than {args.per_class}")
                     for c, n in sorted(counts.items()) if n < args.per_class]
    for p in problems:
        print(f"{args.pairs}: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 2
    print(f"{args.pairs}: ok: {summary(pairs)}")
    for cls, n in sorted(counts.items()):
        print(f"  {cls}: {n}")
    return 0


def read_or_fail(path):
    pairs, problems = read_manifest(path)
    if problems:
        raise ManifestError(path, problems)
    return pairs


def cmd_subset(args):
    pairs = first_per_class(read_or_fail(args.pairs), args.per_class)
    write_manifest(args.out, pairs)
    print(f"{args.out}: {summary(pairs)}")
    return 0


def cmd_baseline(args):
    pairs = read_or_fail(args.pairs)
    if args.per_class:
        pairs = first_per_class(pairs, args.per_class)
    images = augmented_images(pairs, args.all_images)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("class", "image"))
        w.writerows(images)
    print(f"{args.out}: {len(images)} images of {len(per_class_counts(pairs))} classes "
          f"(augmented pairs matched to {args.pairs})")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build a semantic-pairs manifest from an ImageNet train folder")
    build.add_argument("--imagenet-root", required=True, help="folder holding the <wnid>/ class folders")
    build.add_argument("--classes", default="paper", help="paper, all, or a class-list file (default paper)")
    build.add_argument("--per-class", type=int, default=157, help="pairs per class (default 157)")
    build.add_argument("--strategy", choices=("random", "mined"), default="random")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", required=True, help="manifest CSV to write")
    build.add_argument("--decode", action="store_true",
                       help="random: decode the chosen images, not just their headers (skips truncated files)")
    mining = build.add_argument_group("mined strategy")
    mining.add_argument("--features", help="feature extractor: a backbone.pth or torchvision-format state dict")
    mining.add_argument("--lambda", dest="lam", type=float, default=1.0,
                        help="weight of context similarity in the score (default 1)")
    mining.add_argument("--size", type=int, default=224, help="side of the object and context views (default 224)")
    mining.add_argument("--candidates", type=int, help="mine among this many seeded images per class (default all)")
    mining.add_argument("--batch-size", type=int, default=128)
    mining.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="decoding processes")
    mining.add_argument("--device", help="default cuda when available")
    build.set_defaults(run=cmd_build)

    check = sub.add_parser("check", help="validate a manifest against an image tree")
    check.add_argument("--root", required=True, help="image root (ImageFolder layout)")
    check.add_argument("--pairs", required=True, help="manifest CSV")
    check.add_argument("--decode", action="store_true", help="also decode every image")
    check.add_argument("--per-class", type=int, help="require at least this many pairs in every class")
    check.set_defaults(run=cmd_check)

    subset = sub.add_parser("subset", help="write the first N pairs of each class (nested subsets)")
    subset.add_argument("--pairs", required=True)
    subset.add_argument("--per-class", type=int, required=True)
    subset.add_argument("--out", required=True)
    subset.set_defaults(run=cmd_subset)

    baseline = sub.add_parser("baseline", help="write the matched augmented-pair images of a manifest")
    baseline.add_argument("--pairs", required=True)
    baseline.add_argument("--all-images", action="store_true", help="every unique image, not image_a alone")
    baseline.add_argument("--per-class", type=int, help="of the first N pairs of each class")
    baseline.add_argument("--out", required=True, help="CSV with header class,image")
    baseline.set_defaults(run=cmd_baseline)

    args = parser.parse_args(argv)
    from common.imagenet import ClassListError

    try:
        return args.run(args)
    except (ManifestError, ClassListError, ValueError, FileNotFoundError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
