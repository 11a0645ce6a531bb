"""Resume after a kill at any step, and the stop on a non-finite loss.

With --checkpoint-every N a run also checkpoints within epochs; a checkpoint holds the objects the
script trains (model, optimizer, EMA teacher, DINO's centre), the random states and the position in
the data, so a resumed run continues from the next batch and reaches the weights of an
uninterrupted one. The kill step is drawn at random on each run (it is in the failure message)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import utils
from common.backbones import ConvNet
from tests.conftest import REPO
from tests.test_methods import TINY_HEADS, TINY_RUN, load, part, read_log, train

STEPS = 8  # 2 epochs of 32 pairs / batch 8
CPU_RUN = [*TINY_RUN, "--device", "cpu"]  # same weights is a CPU promise: CUDA kernels need not be deterministic


def logged_steps(out):
    """Step numbers in OUT/log.jsonl, read while the run may be appending to it."""
    path = out / "log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last piece may be a line still being written
    return [r["step"] for r in map(json.loads, lines) if "step" in r]


def epoch_losses(out):
    return {r["epoch"]: r["loss"] for r in read_log(out) if "knn_top1" in r}  # the last record of each epoch


def assert_close_states(a, b, context):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{context}, {key}: {m}")


def test_simclr_killed_at_a_random_step_resumes_to_the_same_weights(tiny_world, tmp_path, monkeypatch):
    args = ["simclr.py", "--pairs", "semantic", "--epochs", "2", "--checkpoint-every", "2", *CPU_RUN]
    train(monkeypatch, *args, "--out", tmp_path / "whole")

    killed = tmp_path / "killed"
    kill_after = random.randrange(STEPS - 2)  # the two steps after it leave time for the kill to land
    context = f"killed after step {kill_after}"
    # Niced, so that on a busy machine this process sees the log line before the run gets far.
    proc = subprocess.Popen([sys.executable, *map(str, args), "--out", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(10))
    while proc.poll() is None and kill_after not in logged_steps(killed):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"{context}: the run ended first"
    assert not (killed / "backbone.pth").exists()

    # Checkpoints after steps 1 and 5 are mid-epoch, after 3 and 7 at epoch ends (4 steps per epoch).
    checkpoint = killed / "checkpoint.pth"
    last = load(checkpoint)["step"] if checkpoint.exists() else -1
    # Every second step is checkpointed: mid-epoch before its log line, at epoch ends after it.
    assert kill_after - 2 <= last, context
    logged_before = len(logged_steps(killed))
    train(monkeypatch, *args, "--out", killed, "--resume")
    assert logged_steps(killed)[logged_before:] == list(range(last + 1, STEPS)), context  # from the next batch on

    whole, resumed = load(tmp_path / "whole" / "backbone.pth"), load(killed / "backbone.pth")
    assert_close_states(resumed, whole, context)
    # The epoch's losses from before the kill are kept for its record; the random stream continues.
    assert epoch_losses(killed) == pytest.approx(epoch_losses(tmp_path / "whole"), rel=1e-5), context
    assert torch.equal(load(checkpoint)["rng"]["torch"], load(tmp_path / "whole" / "checkpoint.pth")["rng"]["torch"])


class Stop(Exception):
    pass


def test_dino_resumes_mid_epoch_with_its_teacher_and_centre(tiny_world, tmp_path, monkeypatch):
    args = ["dino.py", "--pairs", "semantic", "--epochs", "1", "--checkpoint-every", "1", *CPU_RUN, *TINY_HEADS["dino"]]
    train(monkeypatch, *args, "--out", tmp_path / "whole")

    stop_after = random.randrange(3)  # of 4 steps; not the last, so the checkpoint is mid-epoch
    log = utils.Run.log

    def log_then_stop(self, loss, **metrics):
        log(self, loss, **metrics)
        if self.step == stop_after:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(utils.Run, "log", log_then_stop)
        with pytest.raises(Stop):
            train(m, *args, "--out", tmp_path / "resumed")
    halfway = load(tmp_path / "resumed" / "checkpoint.pth")
    assert (halfway["epoch"], halfway["batch"], halfway["step"]) == (0, stop_after + 1, stop_after)
    assert halfway["center"].abs().sum() > 0

    train(monkeypatch, *args, "--out", tmp_path / "resumed", "--resume")
    context = f"stopped after step {stop_after}"
    assert logged_steps(tmp_path / "resumed") == [0, 1, 2, 3], context  # no step skipped or repeated
    assert epoch_losses(tmp_path / "resumed") == pytest.approx(epoch_losses(tmp_path / "whole"), rel=1e-5), context
    whole, resumed = load(tmp_path / "whole" / "checkpoint.pth"), load(tmp_path / "resumed" / "checkpoint.pth")
    for name in ("teacher", "student"):
        assert_close_states(resumed[name], whole[name], f"{context}, {name}")
    torch.testing.assert_close(resumed["center"], whole["center"], rtol=1e-5, atol=1e-6)
    optimizer_state = lambda ckpt: {f"{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items()}
    assert_close_states(optimizer_state(resumed), optimizer_state(whole), f"{context}, optimizer")


def test_a_non_finite_loss_stops_the_run_and_names_the_intact_checkpoint(tiny_world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # The warm-up's first steps have a small enough learning rate; the weights then blow up.
    with pytest.raises(SystemExit) as stopped:
        train(monkeypatch, "simclr.py", "--pairs", "semantic", "--epochs", "2", "--checkpoint-every", "1",
              "--lr", "1e30", "--out", out, *TINY_RUN)
    assert stopped.value.code == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    checkpoint = load(out / "checkpoint.pth")  # loads: written atomically, before the failure
    last = checkpoint["step"]
    assert len(errors) == 1 and f"step {last + 1}; last good checkpoint: {out / 'checkpoint.pth'} " \
                                f"(written after step {last}" in errors[0], errors
    assert utils.all_finite(checkpoint["model"]) and utils.all_finite(checkpoint["optimizer"])
    ConvNet().load_state_dict(part(checkpoint["model"], "backbone."), strict=True)
    assert logged_steps(out)[-1] == last
