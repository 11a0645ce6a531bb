"""eval.calibration: the calibration criteria's figures without any semantic-pair accuracy, and
the colour-histogram reference probe."""
import json

import numpy as np
import pytest
from PIL import Image

from eval import calibration, report, study


def write(folder, name, method, pairs, split, accuracy, spread, seed=0, world=0):
    record = {"schema": report.SCHEMA, "eval": "linear", "method": method, "pairs": pairs, "seed": seed,
              "dataset": "embedded", "split": split, "accuracy": accuracy, "embedding_std": spread, "data": None,
              "world_version": 2, "world_seed": world, "checkpoint": f"{method}-{pairs}/backbone.pth"}
    (folder / f"{name}-{split}.json").write_text(json.dumps(record))


def test_the_table_never_shows_a_semantic_pair_accuracy(tmp_path, capsys):
    for split, offset in (("seen", 0), ("unseen", 10)):
        write(tmp_path, "sp", "byol", "semantic", split, 97.25 + offset, 0.05)
        write(tmp_path, "ap", "byol", "augmented", split, 30.0 + offset, 0.4)
        write(tmp_path, "sup", "supervised", "supervised", split, 55.0 + offset, None)
        write(tmp_path, "rand", "random", "random", split, 10.0 + offset, None)
    calibration.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "97.2" not in out and "107.2" not in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()[2:]}
    assert rows["byol semantic"].endswith("| 0.05 | 1 of 1 |")  # collapsed: below report.COLLAPSED_BELOW
    assert "| 30.0 | 40.0 | 3.0x | 0.40 | 0 of 1 |" in rows["byol augmented"]
    assert "| 55.0 | 65.0 |" in rows["supervised"]


def test_the_delta_spread_is_pooled_within_worlds_and_hides_the_mean(tmp_path, capsys):
    # (SP, AP) per seed: world 1 (41, 40), (45, 42); world 2 (50, 45), (52, 49). Centred within
    # worlds, over 2 dof: SP variance (4 + 4 + 1 + 1) / 2 = 5, AP 5, covariance (2 + 2 + 2 + 2) / 2 = 4,
    # so correlation 0.8 and Δ variance 5 + 5 - 8 = 2 (the deltas 1, 3 and 5, 3: squares 4 over 2 dof).
    for world, runs in ((1, ((41, 40), (45, 42))), (2, ((50, 45), (52, 49)))):
        for seed, (sp, ap) in enumerate(runs):
            write(tmp_path, f"sp-w{world}-s{seed}", "simclr", "semantic", "seen", sp, 0.5, seed, world)
            write(tmp_path, f"ap-w{world}-s{seed}", "simclr", "augmented", "seen", ap, 0.7, seed, world)
    spread = calibration.delta_spread(report.load_results([tmp_path]))["simclr"]
    assert spread == pytest.approx((2 ** 0.5, 4, 2, 5 ** 0.5, 5 ** 0.5, 0.8))
    calibration.main([str(tmp_path)])
    out = capsys.readouterr().out
    # the 95% chi-square interval with 2 dof: std * sqrt(2 / 7.378) and std * sqrt(2 / 0.0506)
    assert "| simclr | 1.4 | [0.7, 8.9] | 2.2 | 2.2 | +0.80 | 4 |" in out.splitlines()
    assert "47.0" not in out and "| 44.0 |" in out  # the mean of AP, never of SP
    # one seed per world: the worlds are the replicates (deltas 1 and 5: std 2.83)
    for path in tmp_path.glob("*-s1-seen.json"):
        path.unlink()
    spread = calibration.delta_spread(report.load_results([tmp_path]))["simclr"]
    assert (spread.std, spread.runs, spread.dof) == (pytest.approx(8 ** 0.5), 2, 1)


def test_a_calibration_study_is_summarised_without_semantic_pair_accuracy(tmp_path):
    for seed, (sp, ap) in enumerate(((61.0, 40.0), (65.0, 42.0))):
        write(tmp_path, f"sp-s{seed}", "simclr", "semantic", "seen", sp, 0.5, seed)
        write(tmp_path, f"ap-s{seed}", "simclr", "augmented", "seen", ap, 0.7, seed)
    summary = study.build_report(tmp_path, blind="embedded-calibration" in study.BLIND)
    text = summary.read_text()
    assert summary == tmp_path / "report" / "calibration.md" and not (tmp_path / "report" / "report.md").exists()
    assert "| 41.0 |" in text and "63.0" not in text  # AP's mean shown, SP's (and so Δ) not
    assert "| simclr | 1.4 |" in text  # criterion e's std: deltas 21 and 23


def test_the_std_interval_narrows_with_more_runs():
    low, high = calibration.std_interval(2.5, 5)  # 6 runs
    assert (round(low, 2), round(high, 2)) == (1.56, 6.13)
    low, high = calibration.std_interval(2.5, 60)
    assert 2.0 < low < 2.5 < high < 3.1


def test_pooled_folders_refuse_two_runs_of_one_cell(tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for pairs, acc in (("semantic", 41.0), ("augmented", 40.0)):
            write(tmp_path / folder, pairs, "simclr", pairs, "seen", acc, 0.5)
    # the same checkpoint found twice is one run: no error (and one run gives no spread yet)
    assert calibration.delta_spread(report.load_results([tmp_path / "a", tmp_path / "a"])) == {}
    record = json.loads((tmp_path / "b" / "semantic-seen.json").read_text())
    record["checkpoint"] = "b/simclr-semantic/backbone.pth"
    (tmp_path / "b" / "semantic-seen.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit:
        calibration.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert exit.value.code == 2
    assert "two runs of simclr semantic in world 0, seed 0" in capsys.readouterr().err


def test_colour_histograms_count_each_pixel_in_its_bin(tmp_path):
    pixels = np.zeros((2, 2, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)   # bin (3, 0, 0) of 4 x 4 x 4
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x, y = calibration.colour_histograms([(tmp_path / "a.png", 7)])
    assert x.shape == (1, 64) and y.tolist() == [7]
    assert x[0, 0] == 0.75 and x[0, 3 * 16] == 0.25


def test_the_colour_histogram_probe_sees_the_class_colours(tiny_world):
    # 4 classes whose parts keep their class colours with probability 0.95: colour alone beats chance
    accuracy = calibration.colour_histogram_probe(tiny_world, "seen")
    assert accuracy > 100 / 4
