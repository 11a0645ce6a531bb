"""The paper's claims, tested on a study's results: CLAIMS.md and CLAIMS.csv (eval/report.py writes
them next to report.md).

Each claim is measured as a paired difference d, computed once per replicate (a pretraining seed,
and on the embedded world a (world seed, pretraining seed) pair: the runs a difference compares
share it) and oriented so that the paper's claim reads d > 0. Over the n replicates: the mean of d
and its 95% t-interval, mean ± t(0.975, n - 1) * std(d) / sqrt(n). The verdict:
  agrees             the interval lies above 0 (the paper's side)
  contradicts        the interval lies below 0
  unresolved         the interval contains 0, or n = 1 (no interval)
  not testable here  the results cannot measure it: a run it needs collapsed (eval/results.py's
                     COLLAPSED_BELOW), or a cell it needs is missing; the note says which
The claims (the paper's figure or table; "paper" is the paper's value of the same difference on
STL-10 where its text gives one, shown beside every dataset's row for comparison):
  C1 (Fig. 4)   SP > AP, per method and transfer dataset
  C2 (Fig. 4)   SimCLR's Δ is the largest: Δ_SimCLR - the largest other Δ (collapsed methods left out)
  C3 (Table 1)  SimCLR SP > AP at each training length, and at every one (the smallest Δ of a replicate)
  C4 (Table 2)  detection AP50, AP, AP75: SP > AP
  C5 (Table 3)  DINO with a ViT, fine-tuned: SP > AP
  C6 (Table 4)  the random-crop test costs AP more than SP: (AP_centre - AP_random) - (SP_centre - SP_random)
  C7 (Table 5)  SP > AP at each size; the gap is larger at the smallest size than at the largest
                (Δ_smallest - Δ_largest); SP at the smallest size is at least AP at the largest
  C8 (Fig. 5)   removing transforms costs AP more than SP: (AP_full - AP_t) - (SP_full - SP_t) per
                setting t, and most at only_crop (its cost gap minus the largest of the others)
  C9 (§1)       SP features are more invariant than AP features to each nuisance factor
                (eval/invariance.py's score vs instance, SimCLR)
C3 to C8 are SimCLR's, as in the paper. Every claim is measured at the study's main setting
(eval/results.py's main_setting and the most common backbone) except along the axis it varies.
"""
import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from eval.results import (AXES, COLLAPSED_BELOW, ORDER, PAIRS, collapsed_run, column_label, entries, main_setting,
                          matches, ordered, seed_means)

VERDICTS = ("agrees", "contradicts", "unresolved", "not testable here")
HEADER = ("Each row is a paired difference d per replicate (world seed, pretraining seed), oriented so that "
          "the paper's claim reads d > 0; mean and 95% t-interval over the n replicates "
          "(mean ± t(0.975, n−1)·s/√n). Verdict: **agrees** if the interval lies above 0, **contradicts** if "
          "below 0, **unresolved** if it contains 0 or n = 1, **not testable here** if a run it needs collapsed "
          "or a cell it needs is missing (the note says which). Paper: the paper's value of the same "
          "difference on STL-10, where its text gives one.")


@dataclass
class Claim:
    id: str
    figure: str          # the paper's figure or table
    statement: str       # the claim, in words
    measure: str         # what d is
    dataset: str
    diffs: dict = field(default_factory=dict)   # replicate -> d
    paper: float = None
    note: str = ""       # exclusions; or, with no diffs, why not testable

    def summary(self):
        """(mean, low, high, n, verdict)."""
        if not self.diffs:
            return None, None, None, 0, "not testable here"
        d = np.array(list(self.diffs.values()), dtype=float)
        mean = float(d.mean())
        if len(d) < 2:
            return mean, None, None, 1, "unresolved"
        half = t_quantile(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
        low, high = mean - half, mean + half
        return mean, low, high, len(d), "agrees" if low > 0 else "contradicts" if high < 0 else "unresolved"


def t_quantile(df, q=0.975):
    from scipy.stats import t  # here: every evaluation script imports the report, few need scipy

    return float(t.ppf(q, df))


class Missing(Exception):
    """A run the claim needs collapsed, or (NoResults) a cell it needs has no results: the message
    says which."""


class NoResults(Missing):
    pass


class Results:
    """The study's flat entries (eval/results.py's `entries`) and lookups of per-replicate values."""

    def __init__(self, results):
        self.rows = list(entries(results))
        linear = [r for r in self.rows if r["eval"] == "linear" and r["pairs"] in PAIRS]
        self.main = main_setting(linear) if linear else {}
        archs = [r["arch"] for r in linear]
        self.arch = max(set(archs), key=archs.count) if archs else None

    def values(self, what, **where):
        """{replicate: mean value} of the rows matching `where`, at the main setting on every axis
        `where` does not name; Missing when there are none or one of their runs collapsed."""
        where = {"eval": "linear", "crop": "center", **where}
        axes = [a for a in AXES if a not in where]
        if where["eval"] == "linear" and "arch" not in where:
            where["arch"] = self.arch
        rows = [r for r in self.rows if all(r.get(k) == v for k, v in where.items())
                and matches(r, self.main, axes)] if self.main else []
        if not rows:
            raise NoResults(f"no results for {what}")
        collapsed = sorted({replicate(r["seed"]) for r in rows if collapsed_run(r)})
        if collapsed:
            raise Missing(f"{what} collapsed ({', '.join(collapsed)}: final spread below {COLLAPSED_BELOW})")
        return seed_means([(r["seed"], r["value"]) for r in rows])

    def pairs(self, what, **where):
        """(SP, AP) values of one setting."""
        return (self.values(f"{what} semantic", pairs="semantic", **where),
                self.values(f"{what} augmented", pairs="augmented", **where))

    def datasets(self, eval_kind="linear", **where):
        return ordered("dataset", [r["dataset"] for r in self.rows if r["eval"] == eval_kind
                                   and all(r.get(k) == v for k, v in where.items())])

    def axis_values(self, axis, **where):
        """The values of `axis` that SP runs matching `where` were run at."""
        return ordered(axis, [r[axis] for r in self.rows if r["pairs"] == "semantic"
                              and all(r.get(k) == v for k, v in where.items())])


def replicate(seed):
    """'world 1 seed 0' for a (world seed, pretraining seed) replicate, 'seed 0' on real data."""
    return f"world {seed[0]} seed {seed[1]}" if isinstance(seed, tuple) else f"seed {seed}"


def combine(fn, *maps):
    """{replicate: fn(values)} over the replicates every map has."""
    common = set.intersection(*(set(m) for m in maps))
    return {k: fn(*(m[k] for m in maps)) for k in sorted(common, key=str)}


def difference(sp, ap):
    return combine(lambda a, b: a - b, sp, ap)


# The world preset that runs the cells of each claim.
PRESETS = {"C1": "world-figure4", "C2": "world-figure4", "C3": "world-table1", "C4": "world-table2",
           "C5": "world-table3", "C6": "world-table4", "C7": "world-table5", "C8": "world-figure5",
           "C9": "world-figure4"}


def measured(claim, compute):
    """The claim with its differences from compute(), or its note: which cell is missing (and the
    world preset that runs it), or which run collapsed."""
    try:
        claim.diffs = compute()
        if not claim.diffs:
            claim.note = "no replicate has every run it needs"
    except NoResults as e:
        claim.note = f"{e} (preset {PRESETS[claim.id]})"
    except Missing as e:
        claim.note = str(e)
    return claim


def along(values, axis, claim, compute):
    """A claim comparing runs along an axis: not testable with runs at one value of it."""
    if len(values) < 2:
        claim.note = f"runs at one {axis} only (preset {PRESETS[claim.id]})"
        return claim
    return measured(claim, compute)


def figure4_claims(res):
    out = []
    for dataset in res.datasets(pairs="semantic"):
        deltas, left_out = {}, []
        for method in ORDER["method"]:
            claim = measured(Claim("C1", "Fig. 4", f"SP > AP: {method}", "SP − AP, linear probe (%)", dataset,
                                   paper={"simclr": 3.83, "vicreg": 1.5}.get(method)),
                             lambda: difference(*res.pairs(method, method=method, dataset=dataset)))
            out.append(claim)
            if claim.diffs:
                deltas[method] = claim.diffs
            elif method != "simclr" and not claim.note.startswith("no results"):
                left_out.append(f"{method} left out: {claim.note}")

        def simclr_lead():
            others = [d for method, d in deltas.items() if method != "simclr"]
            if "simclr" not in deltas or not others:
                raise NoResults("no results for SimCLR and another testable method")
            return combine(lambda simclr, *rest: simclr - max(rest), deltas["simclr"], *others)

        claim = measured(Claim("C2", "Fig. 4", "SimCLR's Δ is the largest of the methods",
                               "Δ SimCLR − the largest other Δ (points)", dataset, paper=3.83 - 1.5), simclr_lead)
        claim.note = "; ".join(filter(None, [claim.note, *left_out]))
        out.append(claim)
    return out


def simclr_claims(res):
    out = []
    for dataset in res.datasets(method="simclr", pairs="semantic"):
        at = dict(method="simclr", dataset=dataset)

        def gap(**where):
            name = "simclr " + " ".join(f"{k} {column_label(k, v)}" for k, v in where.items())
            return difference(*res.pairs(name, **at, **where))

        # C3: training length. The paper's lengths are x1, x2 and x4 of 200 epochs, as the world preset's
        # are of its default.
        lengths = res.axis_values("epochs", eval="linear", crop="center", **at)
        for epochs in lengths:
            paper = [3.83, 4.27, 3.75][lengths.index(epochs)] if len(lengths) == 3 else None
            out.append(measured(Claim("C3", "Table 1", f"SimCLR SP > AP at {epochs} epochs", "SP − AP (points)",
                                      dataset, paper=paper), lambda: gap(epochs=epochs)))
        out.append(along(lengths, "training length", Claim(
            "C3", "Table 1", "SimCLR SP > AP at every training length",
            f"smallest SP − AP over the {len(lengths)} lengths (points)", dataset, paper=3.75),
            lambda: combine(lambda *gaps: min(gaps), *[gap(epochs=e) for e in lengths])))
        # C6: the random-crop test: (AP_centre - AP_random) - (SP_centre - SP_random) = gap_random - gap_centre.
        out.append(measured(Claim("C6", "Table 4", "the random-crop test costs AP more than SP",
                                  "(AP centre − AP random) − (SP centre − SP random)", dataset, paper=7.5 - 6.3),
                            lambda: combine(lambda random, centre: random - centre, gap(crop="random"),
                                            gap(crop="center"))))
        # C7: pretraining set size, the paper's 50, 100 and 157 (all: None) pairs per class.
        sizes = [n for n in res.axis_values("images_per_class", eval="linear", crop="center", **at)
                 if n is not None] + [None]
        for n in sizes:
            paper = [4.20, 4.04, 3.83][sizes.index(n)] if len(sizes) == 3 else None
            out.append(measured(Claim("C7", "Table 5", f"SimCLR SP > AP at {column_label('images_per_class', n)}"
                                      " pairs per class", "SP − AP (points)", dataset, paper=paper),
                                lambda: gap(images_per_class=n)))
        small, large = sizes[0], sizes[-1]
        out.append(along(sizes, "pretraining set size", Claim(
            "C7", "Table 5", "the gap is larger at the smallest size than at the largest",
            "Δ smallest − Δ largest (points)", dataset, paper=4.20 - 3.83),
            lambda: combine(lambda a, b: a - b, gap(images_per_class=small), gap(images_per_class=large))))
        out.append(along(sizes, "pretraining set size", Claim(
            "C7", "Table 5", "SP at the smallest size is at least AP at the largest",
            "SP smallest − AP largest (points)", dataset, paper=81.68 - 81.76),
            lambda: difference(res.values("simclr semantic at the smallest size", pairs="semantic",
                                          images_per_class=small, **at),
                               res.values("simclr augmented at the largest size", pairs="augmented",
                                          images_per_class=large, **at))))
        # C8: transforms removed: cost(t) = (AP_full - AP_t) - (SP_full - SP_t) = gap_t - gap_full.
        removed = ORDER["transforms"][1:]

        def cost(t):
            return combine(lambda gap_t, gap_full: gap_t - gap_full, gap(transforms=t), gap(transforms="full"))

        for t in removed:
            out.append(measured(Claim("C8", "Fig. 5", f"removing transforms ({t}) costs AP more than SP",
                                      f"(AP full − AP {t}) − (SP full − SP {t})", dataset,
                                      paper=(81.76 - 24.25) - (85.59 - 64.23) if t == "only_crop" else None),
                                lambda: cost(t)))
        out.append(measured(Claim("C8", "Fig. 5", "the cost gap is largest at only_crop",
                                  "cost gap at only_crop − the largest other (points)", dataset),
                            lambda: combine(lambda last, *rest: last - max(rest), cost(removed[-1]),
                                            *[cost(t) for t in removed[:-1]])))
    return out


def detection_claims(res):
    out = []
    for dataset in res.datasets("detection", method="simclr") or [""]:
        for metric in ("AP50", "AP", "AP75"):
            out.append(measured(Claim("C4", "Table 2", f"detection {metric}: SP > AP", f"SP − AP ({metric})", dataset,
                                      paper={"AP50": 75.02 - 73.82, "AP": 50.30 - 48.9, "AP75": 55.22 - 53.72}[metric]),
                                lambda: difference(*res.pairs(f"simclr detection {metric}", method="simclr",
                                                              eval="detection", metric=metric, dataset=dataset))))
    return out


def finetune_claims(res):
    return [measured(Claim("C5", "Table 3", "DINO with a ViT, fine-tuned: SP > AP", "SP − AP, fine-tuned (%)", dataset,
                           paper=82.1 - 79.2),
                     lambda: difference(*res.pairs("dino fine-tuned", method="dino", eval="finetune", dataset=dataset)))
            for dataset in res.datasets("finetune", method="dino") or [""]]


def invariance_claims(res):
    kind = "invariance-vs_instance"
    return [measured(Claim("C9", "§1", f"SP features are more invariant to {factor}", "score SP − AP (vs instance)",
                           dataset),
                     lambda: difference(*res.pairs(f"simclr invariance {factor}", method="simclr", eval=kind,
                                                   factor=factor, dataset=dataset)))
            for dataset in res.datasets(kind, method="simclr") or [""] for factor in ORDER["factor"]]


def claims(results):
    """Every claim, measured on the results (schema of eval/report.py), in the order of the claims
    and, within one, of the datasets."""
    res = Results(results)
    found = figure4_claims(res) + simclr_claims(res) + detection_claims(res) + finetune_claims(res) + \
        invariance_claims(res)
    return sorted(found, key=lambda c: c.id)


def number(x, decimals=2, sign=True):
    return "" if x is None else f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def markdown(measured_claims):
    lines = ["# The paper's claims on these results", "", HEADER, "",
             "| claim | paper | statement | d | dataset | paper's d | mean d | 95% interval | n | verdict | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in measured_claims:
        mean, low, high, n, verdict = c.summary()
        interval = f"[{number(low)}, {number(high)}]" if low is not None else ""
        lines.append(f"| {c.id} | {c.figure} | {c.statement} | {c.measure} | {c.dataset} | {number(c.paper)} | "
                     f"{number(mean)} | {interval} | {n} | **{verdict}** | {c.note} |")
    counts = defaultdict(int)
    for c in measured_claims:
        counts[c.summary()[4]] += 1
    lines += ["", "Verdicts: " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS)]
    return "\n".join(lines) + "\n"


def write_claims(results, out):
    """CLAIMS.md and CLAIMS.csv in `out`; returns the claims."""
    measured_claims = claims(results)
    (out / "CLAIMS.md").write_text(markdown(measured_claims))
    with open(out / "CLAIMS.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["claim", "paper", "statement", "measure", "dataset", "paper_d", "mean", "ci_low", "ci_high",
                         "n", "verdict", "note"])
        for c in measured_claims:
            mean, low, high, n, verdict = c.summary()
            writer.writerow([c.id, c.figure, c.statement, c.measure, c.dataset, c.paper, mean, low, high, n, verdict,
                             c.note])
    return measured_claims
