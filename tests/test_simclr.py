"""simclr.py end to end on a tiny embedded world: both pair modes, outputs, bad input (resume after a
kill: tests/test_resume.py)."""
import json

import numpy as np
import pytest
import torch

from common.backbones import ConvNet
from tests.conftest import TINY_WORLD, run_script

TINY_RUN = ["--batch-size", "8", "--eval-every", "1", "--log-every", "1", "--workers", "0", "--world", *TINY_WORLD]


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("pairs", ["semantic", "augmented"])
def test_simclr_trains_and_writes_its_outputs(tiny_world, tmp_path, pairs):
    out = tmp_path / pairs
    run_script("simclr.py", "--pairs", pairs, "--epochs", "2", "--out", out, *TINY_RUN)
    log = read_log(out)
    steps = [r for r in log if "step" in r]
    epochs = [r for r in log if "knn_top1" in r]
    assert len(steps) == 2 * 4  # 32 pairs / batch 8, every step logged
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 and "lr" in r for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 <= r["knn_top1"] <= 100 for r in epochs)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["pairs"] == pairs
    ConvNet().load_state_dict(torch.load(out / "backbone.pth", weights_only=True), strict=True)


def copy_world(tiny_world, dest):
    import shutil

    shutil.copytree(tiny_world / "train", dest)
    shutil.copy(tiny_world / "pairs.csv", dest / "pairs.csv")
    return dest


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(f in proc.stderr for f in fragments), proc.stderr


def test_bad_input_stops_before_training_with_one_line(tiny_world, tmp_path):
    common = ["--pairs", "semantic", "--epochs", "1", "--batch-size", "8", "--arch", "convnet", "--img-size", "32",
              "--out", tmp_path / "out"]
    proc = run_script("simclr.py", *common, "--data", tmp_path / "nowhere", check=False)
    assert_one_line_error(proc, "image root not found", "nowhere")

    data = copy_world(tiny_world, tmp_path / "data")
    lines = (data / "pairs.csv").read_text().splitlines()
    cls, a, b = lines[1].split(",")
    (data / "pairs.csv").write_text("\n".join(lines + [f"{cls},{a},{b}", f"{cls},{a},{a}"]) + "\n")
    proc = run_script("simclr.py", *common, "--data", data, check=False)
    assert_one_line_error(proc, f"line {len(lines) + 1}: duplicate pair", f"line {len(lines) + 2}: self pair")
    assert not (tmp_path / "out" / "log.jsonl").exists()

    (data / "pairs.csv").write_text("\n".join(lines) + "\n")
    (data / a).write_bytes(b"\x89PNG but not really")
    proc = run_script("simclr.py", *common, "--data", data, check=False)
    assert_one_line_error(proc, "line 2", a)


def test_an_image_that_fails_mid_epoch_in_a_worker_gives_one_line(tiny_world, tmp_path):
    data = copy_world(tiny_world, tmp_path / "data")
    victim = sorted((data / "c001").iterdir())[0]
    full = victim.read_bytes()
    victim.write_bytes(full[: len(full) // 2])  # the header reads, the pixels do not
    proc = run_script("simclr.py", "--pairs", "semantic", "--epochs", "1", "--batch-size", "8", "--workers", "1",
                      "--arch", "convnet", "--img-size", "32",
                      "--data", data, "--out", tmp_path / "out", check=False)
    assert_one_line_error(proc, victim.name)
