"""Shared fixtures: a tiny embedded world, generated once per test session into a temporary cache."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One thread per process (subprocesses inherit it): on 2 shared cores, two spinning OpenMP threads
# per process made small forward passes 30x slower while other work ran (tests set more where they
# test threading).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs against a local SLURM cluster that tests/slurm/start_slurm.sh "
                                       "starts (as root; skipped where it cannot run)")


# Everything the tests generate goes to a temporary cache, never the user's.
TINY_WORLD = ["num_classes=4", "pairs_per_class=8", "img_size=32", "transfer_train_per_class=3",
              "transfer_test_per_class=3", "unseen_classes=2"]


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SEMPAIRS_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_world(world_cache):
    """Root of a 4-class, 8-pairs-per-class world (32 px)."""
    from common.data import world_config
    from common.world import ensure_world

    return ensure_world(world_config(TINY_WORLD), world_cache)


def run_script(*args, env=None, timeout=300, check=True):
    """Runs `python args...` in the repository root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc
