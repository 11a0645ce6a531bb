"""Result files, and the study's tables and figures built from many of them.

    python -m eval.report runs/study [more folders] [--out runs/study/report]

Result files. Every evaluation script (eval.linear_probe, eval.knn, eval.finetune, eval.invariance)
writes one JSON object, by default to RUN/results/<eval>-<dataset>[-<split>][-<crop>]-s<seed>.json
(RUN: the checkpoint's folder; --out overrides). Schema "sempairs-eval/1":
  schema             "sempairs-eval/1"
  eval               "linear" | "knn" | "finetune" | "invariance"
  accuracy           top-1 test accuracy in percent, 0-100 (linear, knn, finetune)
  scores             invariance only: {factor: {"vs_instance", "vs_class", "d_factor", "d_instance",
                     "d_class", "n"}} (eval/invariance.py defines them)
  metrics            other evaluations instead of accuracy: {name: number}, e.g. detection's
                     {"AP50": .., "AP": .., "AP75": ..} (x100)
  dataset            "stl10" | "cifar10" | "cifar100" | "embedded" (others, e.g. "voc07", pass through)
  split              "seen" | "unseen" on the embedded world, else null
  crop               "center" | "random": the view of the test images
  img_size, eval_seed (the evaluation's --seed), checkpoint, checkpoint_sha256, num_classes,
  num_train, num_test, protocol (the evaluation's settings), time_s
  from RUN/config.json next to the checkpoint (null when absent): method, pairs ("semantic" |
  "augmented" | "supervised" | "random"), seed (the pretraining seed), epochs, images_per_class
  (null: all pairs), transforms ("full" | "no_gray" | "no_color" | "only_crop"), arch, width (the
  convnet's; rows name a width other than the default, "convnet (width 32)"), batch_size,
  world (the --world KEY=VALUE list, null: default world), data (null: the embedded world),
  world_version, world_config (every world setting) and world_seed (null on real data), and
  embedding_std (the run's final embedding spread, its collapse measure; null if it logged none)

The report reads every file with that schema under the given folders (others are skipped) and
writes report.md, results.csv, one PNG per table, and the paper's claims tested on the results,
CLAIMS.md and CLAIMS.csv (eval/claims.py). Per eval kind:
- the Figure 4 layout: rows = method (with the arch when several), columns = dataset x
  {SP, AP, delta = SP - AP}, over the runs at the main setting, as grouped bars with delta on them;
- the ablation layouts, per dataset, for every setting the runs vary while the others stay at the
  main setting: Table 1 (epochs), Table 4 (crop), Table 5 (images_per_class), Figure 5
  (transforms), and world settings;
- for invariance: columns = nuisance factor, one table per score (vs_instance, vs_class) and split;
  for results with metrics (Table 2 layout for detection): columns = metric, one table per dataset.
Main setting: crop center, transforms full, all pairs (else the most per class), and the most
common epochs and world (ties: the fewest epochs); a result without epochs or transforms (no
config.json next to its checkpoint) counts as at the main setting. Titles state the setting.
Each cell is mean +- std (ddof 1) over pretraining seeds and n, the number of seeds; results of
one seed at several evaluation seeds are averaged first. Delta is the difference of the means;
its +- is the std over seeds of the per-seed differences when SP and AP have the same seeds, else
sqrt(std_SP^2 + std_AP^2). Supervised and random-init runs are baseline rows (dashed lines in the
figures). results.csv is long: table, row, column, pairs (SP | AP | delta | baseline), mean, std, n.
"""
import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import flags
from eval.claims import write_claims
from eval.results import (AXES, COLLAPSED_BELOW, PAIRS, RUN_FIELDS, SCHEMA, MixedResults, check_comparable,
                          collapsed_run, column_label, entries, load_results, main_setting, matches, order_key,
                          ordered, seed_means)

# ------------------------------------------------------------------ writing results

def result_record(args, eval_kind, **fields):
    """A result in the schema above, from an evaluation script's resolved flags (eval.datasets)."""
    record = {"schema": SCHEMA, "eval": eval_kind, **{k: args.run.get(k) for k in RUN_FIELDS},
              "dataset": args.dataset, "split": args.split if args.dataset == "embedded" else None,
              "crop": getattr(args, "crop", "center"), "img_size": args.img_size, "eval_seed": args.seed,
              "checkpoint": str(args.checkpoint), "checkpoint_sha256": args.checkpoint_sha256}
    record.update(fields)
    return record


def write_result(record, path):
    """Writes a result file atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ tables

def describe(setting, skip=None):
    """The setting in words, e.g. "center crop, full transforms, all pairs, 200 epochs, world default"."""
    words = {"crop": f"{setting['crop']} crop", "transforms": f"{setting['transforms']} transforms",
             "images_per_class": f"{column_label('images_per_class', setting['images_per_class'])} pairs",
             "epochs": f"{setting['epochs']} epochs", "world": f"world {setting['world']}"}
    return ", ".join(text for axis, text in words.items() if axis != skip)


@dataclass
class Stats:
    mean: float
    std: float | None
    n: int


def stats(per_seed):
    v = np.array(list(per_seed.values()))
    return Stats(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v))


def delta(sp, ap):
    """SP - AP from two {seed: value} maps (see the module docstring for the +-)."""
    a, b = stats(sp), stats(ap)
    if set(sp) == set(ap) and len(sp) > 1:
        std = float(np.std([sp[s] - ap[s] for s in sp], ddof=1))
    else:
        std = math.hypot(a.std, b.std) if a.std is not None and b.std is not None else None
    return Stats(a.mean - b.mean, std, min(a.n, b.n))


@dataclass
class Table:
    name: str           # file stem
    title: str
    axis: str           # what the columns are
    columns: list
    rows: list          # SSL methods, each with SP/AP/delta cells
    cells: dict         # (row, column, "SP" | "AP" | "delta") -> Stats
    baselines: dict = field(default_factory=dict)   # (label, column) -> Stats
    decimals: int = 2
    unit: str = "accuracy (%)"
    collapsed: set = field(default_factory=set)     # (row, column) where a run collapsed: no delta


def build_table(rows, axis, name, title, decimals=2, unit="accuracy (%)"):
    """A Table over flat entries, columns = values of `axis`."""
    archs = {r["arch"] for r in rows}

    def label(r):
        method = r["method"] if r["pairs"] in PAIRS or r["method"] == r["pairs"] else f"{r['method']} ({r['pairs']})"
        return f"{method} / {r['arch']}" if len(archs) > 1 else str(method)

    values, collapsed = defaultdict(list), set()
    for r in rows:
        values[label(r), r[axis], PAIRS.get(r["pairs"], r["pairs"])].append((r["seed"], r["value"]))
        if r["pairs"] in PAIRS and collapsed_run(r):
            collapsed.add((label(r), r[axis]))
    cells, baselines, methods = {}, {}, []
    for (row, column, pairs), vals in values.items():
        if pairs in ("SP", "AP"):
            cells[row, column, pairs] = seed_means(vals)
            methods.append(row)
        else:
            baselines[row, column] = stats(seed_means(vals))
    for (row, column, pairs) in list(cells):
        if pairs == "SP" and (row, column, "AP") in cells and (row, column) not in collapsed:
            cells[row, column, "delta"] = delta(cells[row, column, "SP"], cells[row, column, "AP"])
    cells = {k: v if isinstance(v, Stats) else stats(v) for k, v in cells.items()}
    methods = sorted(set(methods), key=lambda m: (order_key("method", m.split(" ")[0]), m))
    columns = ordered(axis, [r[axis] for r in rows])
    return Table(name, title, axis, columns, methods, cells, baselines, decimals, unit, collapsed)


def tables(results):
    """Every table the results support (see the module docstring)."""
    rows = list(entries(results))
    out = []
    for kind in ordered("eval", [r["eval"] for r in rows]):
        of_kind = [r for r in rows if r["eval"] == kind]
        setting = main_setting(of_kind)
        at_main = [r for r in of_kind if matches(r, setting, AXES)]
        if kind.startswith("invariance") or "metric" in of_kind[0]:
            axis = "factor" if kind.startswith("invariance") else "metric"
            for dataset in ordered("dataset", [r["dataset"] for r in at_main]):
                picked = [r for r in at_main if r["dataset"] == dataset]
                if axis == "factor":
                    out.append(build_table(picked, axis, f"{kind}-{dataset}", f"Invariance score {kind.split('-')[1]}"
                                           f" on {dataset} (1 = invariant; {describe(setting)})", 3, "score"))
                else:
                    out.append(build_table(picked, axis, f"{kind}-{dataset}",
                                           f"{kind} on {dataset} ({describe(setting)})", 2, kind))
            continue
        if at_main:
            out.append(build_table(at_main, "dataset", f"figure4-{kind}",
                                   f"Figure 4 layout: {kind} accuracy (%), SP vs AP ({describe(setting)})"))
        for axis, title in AXES.items():
            others = [r for r in of_kind if matches(r, setting, [a for a in AXES if a != axis])]
            for dataset in ordered("dataset", [r["dataset"] for r in others]):
                spread = defaultdict(set)
                for r in others:
                    if r["dataset"] == dataset and r["pairs"] in PAIRS:
                        spread[r["method"], r["arch"]].add(r[axis])
                varied = {m for m, values in spread.items() if len(values) > 1}
                picked = [r for r in others if r["dataset"] == dataset
                          and (r["pairs"] not in PAIRS or (r["method"], r["arch"]) in varied)]
                if varied:  # the methods run at several values of the axis, and the baselines
                    out.append(build_table(picked, axis, f"{axis}-{kind}-{dataset}", f"{title}: {kind} accuracy (%) "
                                           f"on {dataset} ({describe(setting, skip=axis)})"))
    return out


def fmt(s, decimals, sign=False):
    if s is None:
        return ""
    text = f"{s.mean:+.{decimals}f}" if sign else f"{s.mean:.{decimals}f}"
    return text + (f" ± {s.std:.{decimals}f}" if s.std is not None else "") + f" (n={s.n})"


def markdown(table):
    head = ["method"] + [f"{column_label(table.axis, c)} {p}" for c in table.columns for p in ("SP", "AP", "Δ")]
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        cells = ["not testable here (collapsed)" if p == "delta" and (row, c) in table.collapsed
                 else fmt(table.cells.get((row, c, p)), table.decimals, p == "delta")
                 for c in table.columns for p in ("SP", "AP", "delta")]
        lines.append("| " + " | ".join([row] + cells) + " |")
    if table.baselines:
        labels = ordered("baseline", [label for label, _ in table.baselines])
        header = " | ".join(column_label(table.axis, c) for c in table.columns)
        lines += ["", "Baselines:", "", f"| run | {header} |", "|" + "---|" * (len(table.columns) + 1)]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(fmt(table.baselines.get((label, c)), table.decimals)
                                                     for c in table.columns) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(table):
    for (row, column, pairs), s in sorted(table.cells.items(), key=str):
        yield [table.name, row, column_label(table.axis, column), pairs, s.mean, s.std, s.n]
    for (label, column), s in sorted(table.baselines.items(), key=str):
        yield [table.name, label, column_label(table.axis, column), "baseline", s.mean, s.std, s.n]


def plot(table, path):
    """Grouped bars: per column a bar pair (AP solid, SP hatched) per method with std error bars,
    delta written above each pair, baselines as dashed lines across the group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    n_bars = max(2 * len(table.rows), 1)
    width = 0.8 / n_bars
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n_bars * len(table.columns) + 3.5), 4.2))
    labelled = set()

    def label(text):  # each legend entry once
        first = text not in labelled
        labelled.add(text)
        return text if first else None

    for ci, column in enumerate(table.columns):
        for ri, row in enumerate(table.rows):
            tops = []
            for k, pairs in enumerate(("AP", "SP")):
                s = table.cells.get((row, column, pairs))
                if s is None:
                    continue
                x = ci + (2 * ri + k + 0.5 - n_bars / 2) * width
                ax.bar(x, s.mean, width, yerr=s.std, color=colours[ri % 10], hatch="//" if pairs == "SP" else None,
                       edgecolor="black", linewidth=0.5, capsize=2, label=label(f"{row} ({pairs})"))
                tops.append(max(s.mean + (s.std or 0), 0))
            d = table.cells.get((row, column, "delta"))
            if d is not None:
                ax.text(ci + (2 * ri + 1 - n_bars / 2) * width, max(tops), f"Δ{d.mean:+.{table.decimals}f}",
                        ha="center", va="bottom", fontsize=7, rotation=90 if n_bars > 4 else 0)
        for bi, baseline in enumerate(ordered("baseline", [b for b, _ in table.baselines])):
            s = table.baselines.get((baseline, column))
            if s is not None:
                ax.hlines(s.mean, ci - 0.45, ci + 0.45, colors="grey", linestyles=["--", ":", "-."][bi % 3],
                          label=label(baseline))
    ax.set_xticks(range(len(table.columns)), [column_label(table.axis, c) for c in table.columns])
    ax.set_xlabel(table.axis)
    ax.set_ylabel(table.unit)
    ax.set_title(table.title, fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def runs_table(results):
    """Every pretraining run with its collapse measure, as Markdown; a run is named by its folder
    (a study's cell name)."""
    runs = {r.get("checkpoint"): r for r in results if r.get("pairs") in PAIRS}
    lines = ["### Runs: the collapse measure", "",
             f"Final embedding spread (1 even, 0 one direction; collapsed below {COLLAPSED_BELOW}).", "",
             "| run | method | pairs | world seed | seed | spread | collapsed |", "|---|---|---|---|---|---|---|"]
    for path, r in sorted(runs.items(), key=lambda item: str(item[0])):
        spread = r.get("embedding_std")
        lines.append(f"| {Path(str(path)).parent.name} | {r['method']} | {r['pairs']} | {r.get('world_seed', '')} | "
                     f"{r.get('seed', '')} | {'' if spread is None else f'{spread:.2f}'} | "
                     f"{'yes' if collapsed_run(r) else 'no'} |")
    return "\n".join(lines) + "\n"


def provenance(results):
    """Which worlds and pretraining seeds the results come from, e.g. ": embedded world version 2,
    world seeds 1, 2, 3; pretraining seeds 0, 1, 2"."""
    def listed(values):
        return ", ".join(map(str, sorted(set(v for v in values if v is not None))))

    worlds = [r for r in results if r.get("world_seed") is not None]
    parts = [f"embedded world version {listed(r.get('world_version') or 1 for r in worlds)}, world seeds "
             f"{listed(r['world_seed'] for r in worlds)}"] if worlds else []
    if any(r.get("seed") is not None for r in results):
        parts.append(f"pretraining seeds {listed(r.get('seed') for r in results)}")
    return ": " + "; ".join(parts) if parts else ""


def write_report(results, out):
    """report.md, results.csv and a PNG per table in `out`; returns the tables."""
    check_comparable(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built = tables(results)
    parts = [f"# Results\n\n{len(results)} result files{provenance(results)}. SP = semantic pairs, AP = augmented "
             "pairs, Δ = SP − AP; mean ± std over pretraining seeds and worlds (n runs of each). Where a run of a "
             f"method collapsed (its final embedding spread below {COLLAPSED_BELOW}, table at the end), its Δ is "
             "not testable here.\n"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["table", "row", "column", "pairs", "mean", "std", "n"])
        for table in built:
            writer.writerows(csv_rows(table))
            plot(table, out / f"{table.name}.png")
            parts.append(markdown(table) + f"\n![{table.name}]({table.name}.png)\n")
    parts.append(runs_table(results))
    (out / "report.md").write_text("\n".join(parts))
    write_claims(results, out)
    return built


def main(argv=None):
    parser = flags.Parser(prog="python -m eval.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders searched recursively for result files")
    parser.add_argument("--out", help="output folder (default: FIRST_FOLDER/report)")
    args = parser.parse_args(argv)
    results = load_results(args.folders)
    if not results:
        sys.exit(f"error: no result files (schema {SCHEMA}) under {', '.join(args.folders)}")
    out = Path(args.out or Path(args.folders[0]) / "report")
    try:
        built = write_report(results, out)
    except MixedResults as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(results)} results, {len(built)} tables -> {out / 'report.md'}, claims -> {out / 'CLAIMS.md'}")


if __name__ == "__main__":
    main()
