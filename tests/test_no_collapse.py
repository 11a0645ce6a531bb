"""No collapse over a short run on a small embedded world.

Each script logs embedding_std every step: the per-dimension standard deviation over the batch of
the L2-normalised embeddings its loss acts on (SimCLR's projection, read before its output
BatchNorm, which spreads evenly whatever comes in; VICReg's expander output, BYOL's online
prediction, DINO's centred and sharpened teacher output), times sqrt(dim). It is 0 when every input maps to
the same direction, whatever the norms, and 1 for embeddings spread evenly over all dimensions.
A short run leaves the backbone close to its initialisation, so collapse shows first, and only, at
the head: these are the embeddings to watch.

Floor 0.05: in these runs VICReg stays near 0.8, BYOL above 0.4 and DINO above 0.25 at every step,
while DINO without centring (a known collapse: every input goes to the same dimension) falls from
0.3-0.4 to 0.0-0.02 by the last steps. (At DINO lr 0.24 the centred run itself dipped to 0.04
before recovering: too close to the collapse it is compared with.)
"""
import json

import pytest

from tests.test_methods import train

FLOOR = 0.05
SMALL_WORLD = ["num_classes=8", "pairs_per_class=16", "img_size=32", "transfer_train_per_class=2",
               "transfer_test_per_class=2", "unseen_classes=2"]
# 128 pairs in batches of 32: 16 steps, on 16 px crops to save time. The publications' optimizers
# (LARS; DINO's SGD) at the learning rates a batch of 256 gets (the linear scaling rule would
# divide them by 8 here), so each step moves the weights as a step of a paper-scale run does. DINO's teacher momentum 0.9 lets the teacher follow the
# student within the run: at 0.996 it would stay at its initialisation, unable to collapse.
RUN = ["--pairs", "semantic", "--epochs", "4", "--warmup-epochs", "2", "--batch-size", "32", "--img-size", "16",
       "--workers", "0", "--log-every", "1", "--eval-every", "100", "--world", *SMALL_WORLD]
OPTIMIZER = {"vicreg": "lars", "byol": "lars", "dino": "sgd"}
METHODS = {
    "vicreg": ["--lr", "1.6", "--expander", "512-512-512"],
    "byol": ["--lr", "2.4"],
    # The publication's head, without BatchNorm: BatchNorm in the head (the world's default) also
    # keeps the outputs apart when centring is off, and the collapse compared with would not happen.
    "dino": ["--lr", "0.12", "--momentum-teacher", "0.9", "--out-dim", "1024", "--bn-in-head", "false"],
}


def embedding_stds(tmp_path, monkeypatch, script, *args):
    train(monkeypatch, script, *RUN, "--optimizer", OPTIMIZER[script[:-3]], "--out", tmp_path, *args)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    return [record["embedding_std"] for record in map(json.loads, lines) if "step" in record]


@pytest.mark.parametrize("method", METHODS)
def test_embeddings_keep_their_spread(world_cache, tmp_path, monkeypatch, method):
    stds = embedding_stds(tmp_path, monkeypatch, f"{method}.py", *METHODS[method])
    assert len(stds) == 16 and min(stds) > FLOOR, stds


def test_dino_without_centring_collapses_below_the_floor(world_cache, tmp_path, monkeypatch):
    stds = embedding_stds(tmp_path, monkeypatch, "dino.py", *METHODS["dino"], "--center-momentum", "1.0")
    assert stds[0] > FLOOR and max(stds[-4:]) < FLOOR, stds
