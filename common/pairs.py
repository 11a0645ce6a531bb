"""Semantic-pair manifests: reading, checking, the matched augmented baseline, nested subsets.

A manifest is a CSV with header `class,image_a,image_b`; image paths are relative to the
image root (an ImageFolder tree whose first path component is the class folder). Extra
columns after those three are allowed (mined pairs carry their scores there).

    python -m common.pairs check --root DIR --pairs FILE [--decode]
"""
import argparse
import csv
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

HEADER = ("class", "image_a", "image_b")


@dataclass(frozen=True)
class Pair:
    line: int  # line number in the manifest file (the header is line 1)
    cls: str
    image_a: str
    image_b: str


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


def read_manifest(path):
    """Parses a manifest into Pairs; returns (pairs, problems) with format problems only."""
    problems, pairs = [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], [Problem(0, f"cannot read manifest: {e}")]
    if not rows or tuple(c.strip() for c in rows[0][:3]) != HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        return [], [Problem(1, f"header must start with {','.join(HEADER)}, found {found!r}")]
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < 3 or not all(c.strip() for c in row[:3]):
            problems.append(Problem(line, f"expected class,image_a,image_b, found {','.join(row)!r}"))
            continue
        pairs.append(Pair(line, *(c.strip() for c in row[:3])))
    return pairs, problems


def check_pairs(pairs, root, decode=False):
    """Checks pairs against an image tree: paths, classes, self/duplicate pairs, image reuse, and
    that every image opens as an image (its header; with decode, the whole file). Returns Problems."""
    from common.data import ImageError, load_rgb, open_image  # data imports this module

    root = Path(root).resolve()
    problems, first_seen, seen_pairs, checked = [], {}, {}, set()
    for p in pairs:
        for name in (p.image_a, p.image_b):
            full = (root / name).resolve()
            if os.path.isabs(name) or not full.is_relative_to(root):
                problems.append(Problem(p.line, f"path leaves the image root: {name}"))
            elif not full.is_file():
                problems.append(Problem(p.line, f"missing file: {name}"))
            elif name not in checked:
                checked.add(name)
                try:
                    load_rgb(full) if decode else open_image(full)
                except ImageError as e:
                    problems.append(Problem(p.line, str(e)))
            folder = Path(name).parts[0] if Path(name).parts else ""
            if folder != p.cls:
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
                problems.append(Problem(p.line, f"image reused across pairs: {name} (first on line {first_seen[name]})"))
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


def cmd_check(args):
    pairs, problems = read_manifest(args.pairs)
    if Path(args.root).is_dir():
        problems += check_pairs(pairs, args.root, args.decode)
    else:
        problems.append(Problem(0, f"image root not found: {args.root}"))
    for p in problems:
        print(f"{args.pairs}: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 2
    print(f"{args.pairs}: ok: {summary(pairs)}")
    for cls, n in sorted(per_class_counts(pairs).items()):
        print(f"  {cls}: {n}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a manifest against an image tree")
    check.add_argument("--root", required=True, help="image root (ImageFolder layout)")
    check.add_argument("--pairs", required=True, help="manifest CSV")
    check.add_argument("--decode", action="store_true", help="also decode every image")
    check.set_defaults(run=cmd_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
