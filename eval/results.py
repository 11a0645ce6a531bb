"""Reading result files (the schema of eval/report.py) into flat entries, one per measured value,
and the study's settings: what eval/report.py's tables and eval/claims.py's claims are built from."""
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from common.backbones import CONVNET_WIDTH

SCHEMA = "sempairs-eval/1"
RUN_FIELDS = ("method", "pairs", "seed", "epochs", "images_per_class", "transforms", "arch", "width", "batch_size",
              "world", "data", "world_version", "world_config", "world_seed", "embedding_std")
# A run whose embeddings end less spread than this has collapsed (common/monitor.py's embedding_std:
# 1 spread evenly, 0 one direction). Healthy runs on the world end above 0.3; the collapsed
# semantic-pair runs of BYOL and DINO on the first world ended at 0.06-0.17.
COLLAPSED_BELOW = 0.2
PAIRS = {"semantic": "SP", "augmented": "AP"}
AXES = {"epochs": "Table 1 layout: by pretraining epochs", "crop": "Table 4 layout: centre vs random crop test",
        "images_per_class": "Table 5 layout: by pairs per class", "transforms": "Figure 5 layout: by transformations",
        "world": "by world setting"}
ORDER = {"dataset": ["cifar10", "cifar100", "stl10", "embedded-seen", "embedded-unseen"],
         "crop": ["center", "random"], "transforms": ["full", "no_gray", "no_color", "only_crop"],
         "factor": ["background", "illumination", "occlusion", "pattern"],
         "method": ["simclr", "byol", "vicreg", "dino"], "baseline": ["supervised", "random"],
         "eval": ["linear", "knn", "finetune", "invariance-vs_instance", "invariance-vs_class"]}


def load_results(folders):
    """Every result file (schema above) under the folders, sorted by path."""
    results = []
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*.json") if p.is_file()):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
                continue
            if isinstance(record, dict) and record.get("schema") == SCHEMA:
                results.append(record)
    return results


class MixedResults(ValueError):
    """Results that cannot share a table: their numbers are not comparable."""


def check_comparable(results):
    """Refuses results of embedded worlds of different WORLD_VERSIONs (a result without one is
    from version 1, before runs recorded it), and linear probes that chose l2 differently (a
    table would average them as if they were one protocol)."""
    for what, of in (("world version", world_version), ("a linear probe with", probe_choice)):
        first = {}
        for r in results:
            if (key := of(r)) is not None:
                first.setdefault(key, r.get("checkpoint"))
        if len(first) > 1:
            (k1, a), (k2, b) = sorted(first.items())[:2]
            raise MixedResults(f"results of {what} {k1} ({a}) and {what} {k2} ({b}) cannot share a table: "
                               "report them from separate folders")


def world_version(r):
    """The embedded world's version of a result (1 where unrecorded), None on real data."""
    if r.get("data") is None and (r.get("world_version") or r.get("dataset") == "embedded"):
        return r.get("world_version") or 1
    return None


def probe_choice(r):
    """How a linear probe chose its l2 (eval/linear_probe.py's protocol record), None if unrecorded."""
    protocol = r.get("protocol") or {}
    if r.get("eval") != "linear" or "l2_grid" not in protocol:
        return None
    grid = protocol["l2_grid"]
    if len(grid) == 1:  # --l2
        return f"l2 fixed at {grid[0]:g}"
    return f"l2 searched over {len(grid)} values from {max(grid):g} to {min(grid):g}"


def entries(results):
    """One flat dict per measured value (accuracy, or one invariance score of one factor)."""
    for r in results:
        # The world's seed is a replicate, like the pretraining seed: a world setting is the rest.
        world = " ".join(w for w in r.get("world") or [] if not w.startswith("seed=")) or "default"
        dataset = r["dataset"] + (f"-{r['split']}" if r.get("split") else "")
        seed = r.get("seed") if r.get("world_seed") is None else (r["world_seed"], r.get("seed"))
        base = {k: r.get(k) for k in RUN_FIELDS} | {"dataset": dataset, "crop": r.get("crop", "center"),
                                                    "world": world, "seed": seed, "arch": arch_name(r)}
        if r["eval"] == "invariance":
            for factor, s in r["scores"].items():
                for score in ("vs_instance", "vs_class"):
                    yield base | {"eval": f"invariance-{score}", "factor": factor, "value": s[score]}
        elif "metrics" in r:
            for metric, value in r["metrics"].items():
                yield base | {"eval": r["eval"], "metric": metric, "value": value}
        else:
            yield base | {"eval": r["eval"], "value": r["accuracy"]}


def arch_name(r):
    """The architecture, with the convnet's width where it is not the default, so runs of two
    widths never share a row (runs from before --width recorded none: the default)."""
    width = r.get("width")
    if r.get("arch") == "convnet" and width not in (None, CONVNET_WIDTH):
        return f"convnet (width {width})"
    return r.get("arch")


def order_key(axis, value):
    """Known names in the study's order first, then numbers ascending, then the rest; None last."""
    known = ORDER.get(axis, [])
    return (value is None, value not in known, known.index(value) if value in known else 0,
            value if isinstance(value, (int, float)) else 0, str(value))


def ordered(axis, values):
    return sorted(set(values), key=lambda v: order_key(axis, v))


def main_setting(rows):
    """The setting of the Figure 4 layout: the paper's defaults where runs have them (centre crop,
    full transforms, all pairs, else the most per class), else the most common known value (ties:
    the first in order, e.g. the fewest epochs)."""
    preferred = {"crop": "center", "transforms": "full", "images_per_class": None}
    setting = {}
    for axis in AXES:
        counts = Counter(r[axis] for r in rows)
        known = [v for v in ordered(axis, counts) if v is not None] or [None]
        if axis in preferred and preferred[axis] in counts:
            setting[axis] = preferred[axis]
        elif axis == "images_per_class":
            setting[axis] = known[-1]
        else:
            setting[axis] = max(known, key=counts.get)
    return setting


def matches(row, setting, axes):
    """Whether a row is at `setting` on `axes`; an unknown epochs or transforms (a run without
    config.json) counts as matching."""
    return all(row[a] == setting[a] or (row[a] is None and a in ("epochs", "transforms")) for a in axes)


def seed_means(values):
    """{seed: mean over that seed's results}."""
    per_seed = defaultdict(list)
    for seed, value in values:
        per_seed[seed].append(value)
    return {seed: float(np.mean(v)) for seed, v in per_seed.items()}


def collapsed_run(r):
    return r.get("embedding_std") is not None and r["embedding_std"] < COLLAPSED_BELOW


def column_label(axis, value):
    if value is None:
        return "all" if axis == "images_per_class" else "unknown"
    return str(value)
