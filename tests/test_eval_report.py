"""The report on made-up result files: cell values, delta, mean +- std over seeds, the ablation
layouts, baselines, invariance, and the figures."""
import csv
import json
import math

import pytest
from PIL import Image

from eval import report

SQRT2, HALF_SQRT2 = math.sqrt(2), math.sqrt(0.5)


def result(folder, eval_kind="linear", method="simclr", pairs="semantic", seed=0, dataset="stl10", accuracy=None,
           eval_seed=0, **setting):
    record = {"schema": report.SCHEMA, "eval": eval_kind, "method": method, "pairs": pairs, "seed": seed,
              "epochs": 200, "images_per_class": None, "transforms": "full", "arch": "resnet50", "world": None,
              "dataset": dataset, "split": None, "crop": "center", "eval_seed": eval_seed, **setting}
    if accuracy is not None:
        record["accuracy"] = accuracy
    (folder / f"{len(list(folder.iterdir()))}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path):
    runs = tmp_path / "runs"
    (runs / "deep").mkdir(parents=True)
    for seed, sp, ap in ((0, 80, 78), (1, 82, 79)):
        result(runs, seed=seed, accuracy=sp)
        result(runs / "deep", pairs="augmented", seed=seed, accuracy=ap)
    # Two evaluation seeds of pretraining seed 0 are averaged before the spread over seeds.
    result(runs, dataset="cifar10", accuracy=70, eval_seed=0)
    result(runs, dataset="cifar10", accuracy=72, eval_seed=1)
    result(runs, dataset="cifar10", seed=1, accuracy=73)
    result(runs, dataset="cifar10", pairs="augmented", accuracy=69)
    result(runs, method="byol", accuracy=75)
    result(runs, method="byol", pairs="augmented", seed=0, accuracy=74)
    result(runs, method="byol", pairs="augmented", seed=1, accuracy=76)
    for seed, sp, ap in ((0, 87, 85), (1, 87, 86)):  # AP seeds differ from SP seeds: unpaired
        result(runs, method="vicreg", seed=seed, accuracy=sp)
        result(runs, method="vicreg", pairs="augmented", seed=seed + 2, accuracy=ap)
    result(runs, method="dino", epochs=None, transforms=None, accuracy=60)  # no config.json: taken as main
    result(runs, method="supervised", pairs="supervised", accuracy=90)
    result(runs, method="random", pairs="random", accuracy=30)
    # Ablations of SimCLR on STL-10 (the paper's Tables 1, 4, 5 and Figure 5).
    for pairs, center, random, only_crop, ep400, ipc50 in (("semantic", 85.59, 79.29, 64.23, 86.50, 81.68),
                                                           ("augmented", 81.76, 74.26, 24.25, 82.23, 77.48)):
        result(runs / "deep", pairs=pairs, seed=5, accuracy=center)
        result(runs / "deep", pairs=pairs, seed=5, accuracy=random, crop="random")
        result(runs / "deep", pairs=pairs, seed=5, accuracy=only_crop, transforms="only_crop")
        result(runs / "deep", pairs=pairs, seed=5, accuracy=ep400, epochs=400)
        result(runs / "deep", pairs=pairs, seed=5, accuracy=ipc50, images_per_class=50)
    for pairs, background in (("semantic", 0.8), ("augmented", 0.3)):
        scores = {f: {"vs_instance": background if f == "background" else 0.5, "vs_class": 0.9}
                  for f in ("background", "illumination", "occlusion", "pattern")}
        result(runs, eval_kind="invariance", pairs=pairs, dataset="embedded", split="seen", scores=scores)
    for pairs, ap50 in (("semantic", 75.02), ("augmented", 73.82)):
        result(runs, eval_kind="detection", pairs=pairs, dataset="voc07", metrics={"AP50": ap50, "AP": 50.0})
    (runs / "config.json").write_text(json.dumps({"method": "simclr"}))  # not a result: skipped
    (runs / "broken.json").write_text("{")
    return runs


def read_csv(path):
    """{(table, row, column, pairs): (mean, std or None, n)}."""
    with open(path) as f:
        return {(r["table"], r["row"], r["column"], r["pairs"]):
                (float(r["mean"]), float(r["std"]) if r["std"] else None, int(r["n"])) for r in csv.DictReader(f)}


def close(cell, mean, std, n):
    return cell[0] == pytest.approx(mean) and cell[2] == n and (
        cell[1] is None if std is None else cell[1] == pytest.approx(std))


def test_report_tables_values(results, tmp_path):
    report.main([str(results), "--out", str(tmp_path / "out")])
    cells = read_csv(tmp_path / "out" / "results.csv")
    main = "figure4-linear"
    # SimCLR on STL-10: seeds 0, 1 and the ablation runs' main-setting seed 5.
    sp = [80, 82, 85.59]
    ap = [78, 79, 81.76]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    std = lambda v: math.sqrt(sum((x - mean(v)) ** 2 for x in v) / (len(v) - 1))  # noqa: E731
    assert close(cells[main, "simclr", "stl10", "SP"], mean(sp), std(sp), 3)
    assert close(cells[main, "simclr", "stl10", "AP"], mean(ap), std(ap), 3)
    assert close(cells[main, "simclr", "stl10", "delta"], mean(sp) - mean(ap), std([2, 3, 3.83]), 3)
    assert close(cells[main, "simclr", "cifar10", "SP"], 72, SQRT2, 2)  # seed 0 = mean of 70 and 72
    assert close(cells[main, "simclr", "cifar10", "delta"], 3, None, 1)
    assert close(cells[main, "byol", "stl10", "delta"], 0, None, 1)
    assert close(cells[main, "vicreg", "stl10", "delta"], 1.5, HALF_SQRT2, 2)  # unpaired: sqrt(0 + 0.5)
    assert close(cells[main, "dino", "stl10", "SP"], 60, None, 1) and (main, "dino", "stl10", "delta") not in cells
    assert close(cells[main, "supervised", "stl10", "baseline"], 90, None, 1)
    assert close(cells[main, "random", "stl10", "baseline"], 30, None, 1)
    assert (main, "simclr", "stl10", "baseline") not in cells

    table4, table1 = "crop-linear-stl10", "epochs-linear-stl10"
    assert close(cells[table4, "simclr", "random", "SP"], 79.29, None, 1)
    assert close(cells[table4, "simclr", "random", "delta"], 79.29 - 74.26, None, 1)
    assert close(cells[table4, "simclr", "center", "SP"], mean(sp), std(sp), 3)
    assert close(cells[table1, "simclr", "400", "delta"], 86.50 - 82.23, None, 1)
    assert close(cells["images_per_class-linear-stl10", "simclr", "50", "delta"], 81.68 - 77.48, None, 1)
    assert close(cells["images_per_class-linear-stl10", "simclr", "all", "SP"], mean(sp), std(sp), 3)
    assert close(cells["transforms-linear-stl10", "simclr", "only_crop", "delta"], 64.23 - 24.25, None, 1)
    inv = "invariance-vs_instance-embedded-seen"
    assert close(cells[inv, "simclr", "background", "delta"], 0.5, None, 1)
    assert close(cells[inv, "simclr", "occlusion", "SP"], 0.5, None, 1)
    assert close(cells["detection-voc07", "simclr", "AP50", "delta"], 75.02 - 73.82, None, 1)
    assert {t for t, *_ in cells} == {main, table4, table1, "images_per_class-linear-stl10", "transforms-linear-stl10",
                                      inv, "invariance-vs_class-embedded-seen", "detection-voc07"}

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| vicreg |  |  |  | 87.00 ± 0.00 (n=2) | 85.50 ± 0.71 (n=2) | +1.50 ± 0.71 (n=2) |" in md
    assert "| supervised | 90.00 (n=1) |" in md and "Table 4 layout" in md and "Figure 5 layout" in md
    assert md.count("simclr") >= 7


def test_report_figures_are_valid_pngs(results, tmp_path):
    built = report.write_report(report.load_results([results]), tmp_path / "out")
    assert len(built) == 8
    for table in built:
        path = tmp_path / "out" / f"{table.name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            img.verify()
            assert img.size[0] > 300 and img.size[1] > 200


def test_report_without_results_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no result files"):
        report.main([str(tmp_path)])


def world_result(folder, world_seed, pairs, accuracy, version=2, spread=0.5, method="simclr"):
    result(folder, method=method, pairs=pairs, seed=0, dataset="embedded", split="seen", accuracy=accuracy,
           world=[f"seed={world_seed}"], world_seed=world_seed, world_version=version, embedding_std=spread,
           data=None, checkpoint=f"{method}-{pairs}-w{world_seed}/backbone.pth")


def test_world_seeds_are_replicates_paired_by_world(tmp_path):
    for world_seed, sp, ap in ((1, 30, 25), (2, 34, 31), (3, 29, 26)):
        world_result(tmp_path, world_seed, "semantic", sp)
        world_result(tmp_path, world_seed, "augmented", ap)
    [table] = report.tables(report.load_results([tmp_path]))
    d = table.cells["simclr", "embedded-seen", "delta"]
    assert d.n == 3 and d.mean == pytest.approx(11 / 3) and d.std == pytest.approx(math.sqrt(4 / 3))
    assert table.title.endswith("world default)")  # the world seed is not a setting


def test_convnets_of_two_widths_never_share_a_row(tmp_path):
    for width, sp, ap in ((None, 30, 25), (16, 34, 31), (32, 40, 33)):  # None: a run from before --width
        folder = tmp_path / str(width)
        folder.mkdir()
        for pairs, accuracy in (("semantic", sp), ("augmented", ap)):
            result(folder, pairs=pairs, dataset="embedded", split="seen", accuracy=accuracy, arch="convnet",
                   width=width, seed=0 if width is None else 1)
    [table] = report.tables(report.load_results([tmp_path]))
    assert table.rows == ["simclr / convnet", "simclr / convnet (width 32)"]
    assert table.cells["simclr / convnet", "embedded-seen", "SP"].mean == pytest.approx(32)  # 16 is the default
    assert table.cells["simclr / convnet (width 32)", "embedded-seen", "delta"].mean == pytest.approx(7)


def test_a_collapsed_run_makes_its_delta_not_testable(tmp_path):
    for world_seed in (1, 2):
        world_result(tmp_path, world_seed, "semantic", 20, method="byol", spread=0.9 * report.COLLAPSED_BELOW)
        world_result(tmp_path, world_seed, "augmented", 25, method="byol")
        world_result(tmp_path, world_seed, "semantic", 30)
        world_result(tmp_path, world_seed, "augmented", 25)
    built = report.write_report(report.load_results([tmp_path]), tmp_path / "out")
    assert ("byol", "embedded-seen", "delta") not in built[0].cells
    assert ("simclr", "embedded-seen", "delta") in built[0].cells
    text = (tmp_path / "out" / "report.md").read_text()
    assert "result files: embedded world version 2, world seeds 1, 2; pretraining seeds 0. " in text
    assert "| byol | 20.00 ± 0.00 (n=2) | 25.00 ± 0.00 (n=2) | not testable here (collapsed) |" in text
    assert "| byol-semantic-w1 | byol | semantic | 1 | 0 | 0.18 | yes |" in text
    assert "| simclr-semantic-w2 | simclr | semantic | 2 | 0 | 0.50 | no |" in text


def refusal(folder, capsys):
    """The one line eval.report ends with (exit status 2) on the folder's results."""
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(folder)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0
    return message


def test_results_of_two_world_versions_are_refused(tmp_path, capsys):
    world_result(tmp_path, 1, "semantic", 30, version=2)
    result(tmp_path, dataset="embedded", split="seen", accuracy=20, data=None, checkpoint="old/backbone.pth")
    message = refusal(tmp_path, capsys)
    assert "world version 1 (old/backbone.pth)" in message
    assert "world version 2 (simclr-semantic-w1/backbone.pth)" in message


def test_linear_probes_that_chose_l2_differently_are_refused(tmp_path, capsys):
    searched = {"l2": 0.001, "l2_grid": [10.0 ** -e for e in range(7)], "selection": "validation accuracy"}
    fixed = {"l2": 0.01, "l2_grid": [0.01], "selection": "fixed by --l2"}
    result(tmp_path, accuracy=80, protocol=searched, checkpoint="a/backbone.pth")
    result(tmp_path, pairs="augmented", accuracy=78, protocol=searched, checkpoint="b/backbone.pth")
    report.write_report(report.load_results([tmp_path]), tmp_path / "out")  # one protocol: fine
    result(tmp_path, pairs="augmented", accuracy=79, protocol=fixed, checkpoint="c/backbone.pth")
    message = refusal(tmp_path, capsys)
    assert "l2 fixed at 0.01 (c/backbone.pth)" in message
    assert "l2 searched over 7 values from 1 to 1e-06 (a/backbone.pth)" in message
