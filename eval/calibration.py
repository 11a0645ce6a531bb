"""The world's calibration figures, from a study folder, without SP − AP.

    python -m eval.study --preset embedded-calibration --jobs 2 --out runs/calibration [--world ...]
    python -m eval.calibration runs/calibration

The world's defaults and the world-scale training defaults are chosen by criteria that never use
the size or sign of SP − AP (README, "Calibration"). This prints exactly what those criteria need,
and no semantic-pair accuracy, so that whoever calibrates cannot see the answer:
- the supervised ceiling and the random-init floor on each transfer split (linear probe, %);
- per method, the augmented-pairs probe accuracy and its ratio to random init on the seen split;
- per method and pair kind, the collapse measure (the last epoch's embedding spread,
  report.COLLAPSED_BELOW) and whether the run collapsed.
Values are means over the folder's runs (world seeds x pretraining seeds).
"""
import argparse
import sys
from collections import defaultdict

import numpy as np

from eval.report import COLLAPSED_BELOW, MixedWorlds, check_world_versions, load_results

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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a study folder (e.g. of the embedded-calibration preset)")
    args = parser.parse_args(argv)
    results = load_results([args.folder])
    try:
        check_world_versions(results)
    except MixedWorlds as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = figures(results)
    if not table:
        print(f"error: no linear-probe results on the embedded world under {args.folder}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines(table)))


if __name__ == "__main__":
    main()
