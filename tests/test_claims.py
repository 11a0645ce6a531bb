"""The claims table (eval/claims.py) on made-up result files: the verdict rule (agrees,
contradicts, unresolved, one seed), the t-interval, the orientation of the ablation claims, and a
clear note instead of a number where a cell is missing or a run collapsed."""
import csv
import json

import pytest

from eval import claims, report
from eval.results import COLLAPSED_BELOW


def result(folder, world_seed, pairs, accuracy, method="simclr", split="seen", crop="center", epochs=15,
           transforms="full", images_per_class=None, spread=0.5, **fields):
    """A world result file of one (world seed, pretraining seed 0) replicate."""
    record = {"schema": report.SCHEMA, "eval": "linear", "method": method, "pairs": pairs, "seed": 0,
              "world_seed": world_seed, "world": [f"seed={world_seed}"], "world_version": 2, "data": None,
              "epochs": epochs, "images_per_class": images_per_class, "transforms": transforms, "arch": "convnet",
              "dataset": "embedded", "split": split, "crop": crop, "embedding_std": spread, "eval_seed": 0,
              "accuracy": accuracy, **fields}
    (folder / f"{len(list(folder.iterdir()))}.json").write_text(json.dumps(record))


def pairs(folder, gaps, base=40.0, **setting):
    """SP and AP results whose per-world difference is gaps[world seed - 1]."""
    for world_seed, gap in enumerate(gaps, start=1):
        result(folder, world_seed, "augmented", base + world_seed, **setting)
        result(folder, world_seed, "semantic", base + world_seed + gap, **setting)


def measured(folder):
    return claims.claims(report.load_results([folder]))


def find(found, claim_id, statement, dataset="embedded-seen"):
    [claim] = [c for c in found if c.id == claim_id and c.statement == statement and c.dataset == dataset]
    return claim


def test_the_verdict_follows_the_interval(tmp_path):
    pairs(tmp_path, [5.0, 6.0, 7.0], method="simclr")       # mean 6, clearly above 0
    pairs(tmp_path, [-4.0, -5.0, -6.0], method="vicreg")    # clearly below 0
    pairs(tmp_path, [3.0, -2.0, 1.0], method="dino")        # straddles 0
    found = measured(tmp_path)
    mean, low, high, n, verdict = find(found, "C1", "SP > AP: simclr").summary()
    assert (mean, n, verdict) == (pytest.approx(6.0), 3, "agrees")
    # t(0.975, 2) = 4.303 (a t table); s = 1, so the half-width is 4.303 / sqrt(3) = 2.484.
    assert (low, high) == (pytest.approx(6 - 2.484, abs=1e-3), pytest.approx(6 + 2.484, abs=1e-3))
    assert find(found, "C1", "SP > AP: vicreg").summary()[4] == "contradicts"
    assert find(found, "C1", "SP > AP: dino").summary()[4] == "unresolved"
    # C2: SimCLR's gap minus the largest other (DINO's 3, -2, 1): 2, 8, 6.
    assert find(found, "C2", "SimCLR's Δ is the largest of the methods").diffs == pytest.approx(
        {(1, 0): 2.0, (2, 0): 8.0, (3, 0): 6.0})


def test_one_seed_is_unresolved_and_a_missing_cell_is_a_note(tmp_path):
    pairs(tmp_path, [9.0], method="simclr")
    found = measured(tmp_path)
    mean, low, high, n, verdict = find(found, "C1", "SP > AP: simclr").summary()
    assert (mean, low, high, n, verdict) == (pytest.approx(9.0), None, None, 1, "unresolved")
    byol = find(found, "C1", "SP > AP: byol")
    assert byol.summary() == (None, None, None, 0, "not testable here")
    assert byol.note == "no results for byol semantic (preset world-figure4)"
    table = claims.markdown(found)
    assert "| not testable here | no results for byol semantic (preset world-figure4) |" in table.replace("**", "")
    crop = find(found, "C6", "the random-crop test costs AP more than SP")
    assert (crop.diffs, crop.note) == ({}, "no results for simclr crop random semantic (preset world-table4)")


def test_a_collapsed_run_is_not_testable_and_left_out_of_the_comparison(tmp_path):
    pairs(tmp_path, [5.0, 6.0, 7.0], method="simclr")
    pairs(tmp_path, [1.0, 1.0, 2.0], method="vicreg")
    pairs(tmp_path, [20.0, 20.0, 20.0], method="byol")
    result(tmp_path, 2, "semantic", 10.0, method="byol", split="unseen")  # another split: not this row's
    for path in tmp_path.iterdir():  # BYOL's semantic-pair run of world 2 collapsed
        record = json.loads(path.read_text())
        if record["method"] == "byol" and record["pairs"] == "semantic" and record["world_seed"] == 2:
            path.write_text(json.dumps({**record, "embedding_std": COLLAPSED_BELOW / 2}))
    found = measured(tmp_path)
    byol = find(found, "C1", "SP > AP: byol")
    assert byol.summary()[4] == "not testable here"
    assert "collapsed" in byol.note and "world 2 seed 0" in byol.note
    lead = find(found, "C2", "SimCLR's Δ is the largest of the methods")
    assert lead.diffs == pytest.approx({(1, 0): 4.0, (2, 0): 5.0, (3, 0): 5.0})  # against VICReg alone
    assert "byol left out" in lead.note


def test_ablation_claims_are_oriented_to_the_papers_side(tmp_path):
    """Made-up results in which every ablation goes the paper's way by known amounts."""
    pairs(tmp_path, [4.0, 5.0, 6.0])                                    # main setting: gap 4, 5, 6
    pairs(tmp_path, [3.0, 3.5, 4.0], base=50.0, epochs=30)              # Table 1
    pairs(tmp_path, [1.0, 2.0, 3.0], base=50.0, epochs=60)
    pairs(tmp_path, [6.0, 7.0, 9.0], base=30.0, crop="random")          # Table 4: AP loses more
    pairs(tmp_path, [8.0, 9.0, 10.0], base=20.0, images_per_class=6)    # Table 5
    for t, gap in (("no_gray", 5.0), ("no_color", 7.0), ("only_crop", 20.0)):  # Figure 5
        pairs(tmp_path, [gap, gap + 1, gap + 2], base=10.0, transforms=t)
    found = measured(tmp_path)
    assert find(found, "C3", "SimCLR SP > AP at every training length").diffs == pytest.approx(
        {(1, 0): 1.0, (2, 0): 2.0, (3, 0): 3.0})
    assert find(found, "C6", "the random-crop test costs AP more than SP").diffs == pytest.approx(
        {(1, 0): 2.0, (2, 0): 2.0, (3, 0): 3.0})
    assert find(found, "C7", "the gap is larger at the smallest size than at the largest").diffs == pytest.approx(
        {(1, 0): 4.0, (2, 0): 4.0, (3, 0): 4.0})
    # SP at 6 pairs a class (20 + w + gap) against AP with all pairs (40 + w).
    assert find(found, "C7", "SP at the smallest size is at least AP at the largest").diffs == pytest.approx(
        {(1, 0): -12.0, (2, 0): -11.0, (3, 0): -10.0})
    # only_crop's gaps 20, 21, 22 against the full pipeline's 4, 5, 6; no_color's cost gap is 3.
    assert find(found, "C8", "removing transforms (only_crop) costs AP more than SP").diffs == pytest.approx(
        {(1, 0): 16.0, (2, 0): 16.0, (3, 0): 16.0})
    assert find(found, "C8", "the cost gap is largest at only_crop").diffs == pytest.approx(
        {(1, 0): 13.0, (2, 0): 13.0, (3, 0): 13.0})
    verdicts = {(c.id, c.statement): c.summary()[4] for c in found if c.dataset == "embedded-seen"}
    assert verdicts[("C7", "SP at the smallest size is at least AP at the largest")] == "contradicts"
    assert verdicts[("C8", "the cost gap is largest at only_crop")] == "agrees"


def test_the_report_writes_the_claims_table(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    pairs(runs, [5.0, 6.0, 7.0])
    report.main([str(runs), "--out", str(tmp_path / "report")])
    with open(tmp_path / "report" / "CLAIMS.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["claim"] for r in rows} == {f"C{i}" for i in range(1, 10)}
    [simclr] = [r for r in rows if r["statement"] == "SP > AP: simclr" and r["dataset"] == "embedded-seen"]
    assert (float(simclr["mean"]), simclr["n"], simclr["verdict"]) == (pytest.approx(6.0), "3", "agrees")
    text = (tmp_path / "report" / "CLAIMS.md").read_text()
    assert "t(0.975, n−1)" in text and "agrees" in text and "not testable here" in text
