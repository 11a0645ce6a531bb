"""The world's calibration figures, from study folders, without SP − AP.

    python -m eval.study --preset embedded-calibration --jobs 2 --out runs/calibration [--world ...]
    python -m eval.calibration runs/calibration [more study folders, pooled]

The world's defaults and the world-scale training defaults are chosen by criteria that never use
the size or sign of SP − AP (README, "Calibration"). This prints exactly what those criteria need,
and no semantic-pair accuracy, so that whoever calibrates cannot see the answer:
- the supervised ceiling and the random-init floor on each transfer split (linear probe, %);
- per method, the augmented-pairs probe accuracy and its ratio to random init on the seen split;
- per method and pair kind, the collapse measure (the last epoch's embedding spread,
  report.COLLAPSED_BELOW) and whether the run collapsed;
- per method, the std of the per-seed SP − AP on the seen split (criterion e), with its 95%
  interval, without its mean; and the std of each pair kind's accuracy alone and their
  correlation, which together make it.
Values are means over the folders' runs (world seeds x pretraining seeds).

    python -m eval.calibration --colour-histogram [--world KEY=VALUE ...]

is the shape criterion's reference: the linear probe (eval.linear_probe's protocol) on each
transfer image's colour histogram (4 x 4 x 4 RGB bins) instead of a backbone's features.
"""
import argparse
import math
import sys
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from common.data import image_folder, world_config
from eval.linear_probe import accuracy, train_probe
from eval.report import COLLAPSED_BELOW, MixedResults, check_comparable, load_results

SPLITS = ("seen", "unseen")


def figures(results):
    """{(method, pairs): {"seen": acc, "unseen": acc, "spread": [per run]}} from linear-probe results;
    accuracies only for the augmented pairs and the baselines."""
    accuracy, spread = defaultdict(list), defaultdict(dict)
    for r in results:
        if r["eval"] != "linear" or r["dataset"] != "embedded":
            continue
        key = (r["method"], r["pairs"])
        spread[key][r["checkpoint"]] = r.get("embedding_std")
        if r["pairs"] != "semantic":
            accuracy[key, r["split"]].append(r["accuracy"])
    table = {}
    for key, runs in spread.items():
        table[key] = {split: float(np.mean(accuracy[key, split])) if accuracy[key, split] else None for split in SPLITS}
        table[key]["spread"] = [s for s in runs.values() if s is not None]
    return table


def lines(table):
    def acc(value):
        return "" if value is None else f"{value:.1f}"

    floor = table.get(("random", "random"), {}).get("seen")
    out = ["| run | seen | unseen | seen / random init | final spread | collapsed |", "|---|---|---|---|---|---|"]
    for (method, pairs), row in sorted(table.items()):
        spreads = row["spread"]
        collapsed = [s < COLLAPSED_BELOW for s in spreads]
        shown = pairs == "augmented" or pairs == method
        ratio = f"{row['seen'] / floor:.1f}x" if shown and floor and pairs == "augmented" else ""
        out.append(f"| {method} {pairs if pairs != method else ''}".rstrip() + " | "
                   + (f"{acc(row['seen'])} | {acc(row['unseen'])}" if shown else "(not shown) | (not shown)")
                   + f" | {ratio} | {', '.join(f'{s:.2f}' for s in spreads)} | "
                   + (f"{sum(collapsed)} of {len(collapsed)}" if spreads else "") + " |")
    return out


class DuplicateRuns(ValueError):
    """Pooled folders hold two runs of one cell (e.g. two settings of the same seed)."""


class Spread(NamedTuple):
    """Criterion e's figure and where it comes from, over the runs of one method."""
    std: float          # of the per-seed SP − AP
    runs: int
    dof: int
    sp_std: float       # of each pair kind's accuracy alone
    ap_std: float
    correlation: float  # of SP with AP over seeds: what a seed does to both cancels in Δ


def delta_spread(results):
    """{method: Spread}: the std of the per-seed SP − AP (centre-crop probe, seen split), pooled
    within worlds (each world's own mean removed), or across worlds when each has one seed; and
    the std of each pair kind alone and their correlation, pooled alike. Only spreads are
    computed, so Δ's size and sign stay hidden."""
    seen = {}  # (method, pairs, world, seed) -> its result
    for r in results:
        if (r["eval"], r["dataset"], r.get("split"), r.get("crop", "center")) == ("linear", "embedded", "seen", "center"):
            key = r["method"], r["pairs"], r.get("world_seed"), r.get("seed")
            if key in seen and seen[key]["checkpoint"] != r["checkpoint"]:
                raise DuplicateRuns("two runs of {} {} in world {}, seed {}: {} and {}".format(
                    *key, seen[key]["checkpoint"], r["checkpoint"]))
            seen[key] = r
    paired = defaultdict(lambda: defaultdict(list))   # method -> world -> per-seed (SP, AP)
    for (method, pairs, world, seed), sp in seen.items():
        if pairs == "semantic" and (method, "augmented", world, seed) in seen:
            paired[method][world].append((sp["accuracy"], seen[method, "augmented", world, seed]["accuracy"]))
    spread = {}
    for method, worlds in paired.items():
        groups = [np.array(g) for g in worlds.values()]
        if max(map(len, groups)) == 1:  # one seed per world: the worlds are the replicates
            groups = [np.concatenate(groups)]
        runs = sum(map(len, groups))
        dof = runs - len(groups)
        if dof > 0:
            centred = np.concatenate([g - g.mean(0) for g in groups])
            (sp_var, covariance), (_, ap_var) = centred.T @ centred / dof
            correlation = covariance / math.sqrt(sp_var * ap_var) if sp_var * ap_var > 0 else math.nan
            spread[method] = Spread(math.sqrt(max(sp_var + ap_var - 2 * covariance, 0.0)), runs, dof,
                                    math.sqrt(sp_var), math.sqrt(ap_var), correlation)
    return spread


def std_interval(std, dof, level=0.95):
    """The `level` confidence interval of the std of a normal population from a sample std with
    `dof` degrees of freedom (chi-square): a std of 2.5 from 6 runs is [1.6, 6.1], so few runs
    can tell only large differences of spread apart."""
    from scipy.stats import chi2

    tail = (1 - level) / 2
    return std * math.sqrt(dof / chi2.ppf(1 - tail, dof)), std * math.sqrt(dof / chi2.ppf(tail, dof))


def spread_lines(spread):
    out = ["| method | std of the per-seed Δ, seen (criterion e; its mean is not shown) | 95% interval "
           "| std of SP alone | std of AP alone | SP-AP correlation | runs |", "|---|---|---|---|---|---|---|"]
    for method, s in sorted(spread.items()):
        low, high = std_interval(s.std, s.dof)
        correlation = "" if math.isnan(s.correlation) else f"{s.correlation:+.2f}"
        out.append(f"| {method} | {s.std:.1f} | [{low:.1f}, {high:.1f}] | {s.sp_std:.1f} | {s.ap_std:.1f} "
                   f"| {correlation} | {s.runs} |")
    return out


def colour_histograms(samples, bins=4):
    """(N x bins^3 histograms, normalised to sum 1; N labels) of the images of `samples`."""
    features, labels = [], []
    for path, label in samples:
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3) // (256 // bins)
        codes = (pixels[:, 0] * bins + pixels[:, 1]) * bins + pixels[:, 2]
        features.append(np.bincount(codes, minlength=bins ** 3) / len(codes))
        labels.append(label)
    return torch.tensor(np.array(features), dtype=torch.float32), torch.tensor(labels)


def colour_histogram_probe(root, split):
    """Test accuracy (%) of the linear probe on colour histograms of a world's transfer split."""
    train, classes = image_folder(root / "transfer" / split / "train")
    test, _ = image_folder(root / "transfer" / split / "test", classes)
    (x, y), (x_test, y_test) = colour_histograms(train), colour_histograms(test)
    classifier, _ = train_probe(x, y, len(classes))
    return accuracy(classifier, x_test, y_test)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", metavar="folder",
                        help="study folders (e.g. of the embedded-calibration preset), their runs pooled")
    parser.add_argument("--colour-histogram", action="store_true",
                        help="instead: the probe on colour histograms of the world given by --world")
    parser.add_argument("--world", nargs="*", metavar="KEY=VALUE", help="embedded-world settings")
    args = parser.parse_args(argv)
    if args.colour_histogram:
        from common.world import ensure_world

        root = ensure_world(world_config(args.world))
        print(" ".join(f"{split} {colour_histogram_probe(root, split):.1f}%" for split in SPLITS))
        return
    if not args.folders:
        parser.error("give a study folder, or --colour-histogram")
    results = load_results(args.folders)
    try:
        check_comparable(results)
        spread = delta_spread(results)
    except (MixedResults, DuplicateRuns) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = figures(results)
    if not table:
        print(f"error: no linear-probe results on the embedded world under {' '.join(args.folders)}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines(table)))
    if spread:
        print("\n" + "\n".join(spread_lines(spread)))


if __name__ == "__main__":
    main()
