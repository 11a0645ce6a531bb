"""Invariance scores: hand-computed cases, an embedding that sees only the object's pixels, and the CLI."""
import json

import numpy as np
import pytest
import torch

from common.data import world_config
from common.world import counterfactuals
from eval import invariance
from tests.conftest import TINY_WORLD
from tests.test_eval_datasets import one_thread, random_run  # noqa: F401  (autouse fixture)

# Two classes of two instances on the unit circle: same-class distances 2, across classes 2 or 4.
BASE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_scores_from_hand_computed_distances():
    same = invariance.invariance_scores(BASE, BASE, LABELS)
    assert (same["vs_instance"], same["vs_class"], same["d_factor"]) == (1.0, 1.0, 0.0)
    assert same["d_instance"] == pytest.approx(2.0) and same["d_class"] == pytest.approx(3.0)
    # The "changed" image of each instance is the other instance of its class: as far as an instance change.
    swapped = invariance.invariance_scores(BASE, BASE[[1, 0, 3, 2]], LABELS)
    assert swapped["vs_instance"] == pytest.approx(0.0) and swapped["vs_class"] == pytest.approx(1 - 2 / 3)
    # Scale-free: the embedding's length does not matter.
    scaled = invariance.invariance_scores(7 * BASE, 0.5 * BASE[[1, 0, 3, 2]], LABELS)
    assert scaled["vs_instance"] == pytest.approx(0.0) and scaled["vs_class"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="two instances"):
        invariance.invariance_scores(BASE, BASE, torch.arange(4))


def test_an_embedding_of_the_object_pixels_alone_ignores_the_background():
    """Counterfactual pairs of the world, embedded as the pixels the object fully covers in the
    base image: a new background leaves that embedding exactly as it was; new light does not."""
    cfg = world_config(TINY_WORLD)
    scores = {}
    for factor in ("background", "illumination"):
        pairs = counterfactuals(cfg, factor, 8, seed=0)
        mask = (pairs["object"] >= 1.0)[..., None]
        base, changed = (torch.from_numpy((pairs[k] * mask).reshape(8, -1).astype(np.float64))
                         for k in ("base", "changed"))
        scores[factor] = invariance.invariance_scores(base, changed, torch.from_numpy(pairs["label"]))
    assert scores["background"]["d_factor"] == 0.0 and scores["background"]["vs_instance"] == 1.0
    assert scores["illumination"]["d_factor"] > 0 and scores["illumination"]["vs_instance"] < 1.0


def test_invariance_cli_writes_every_factor(tiny_world, tmp_path):
    run = random_run(tmp_path, world=TINY_WORLD)
    invariance.main(["--checkpoint", str(run / "backbone.pth"), "--n", "8"])
    result = json.loads((run / "results" / "invariance-embedded-seen-s0.json").read_text())
    assert result["eval"] == "invariance" and result["dataset"] == "embedded" and result["split"] == "seen"
    assert result["protocol"]["world_config"]["num_classes"] == 4 and result["num_classes"] == 4
    assert set(result["scores"]) == {"background", "illumination", "occlusion", "pattern"}
    for s in result["scores"].values():
        assert s["n"] == 8 and s["d_instance"] > 0 and s["d_class"] > 0 and s["d_factor"] >= 0
        assert s["vs_instance"] == pytest.approx(1 - s["d_factor"] / s["d_instance"]) and s["vs_class"] <= 1
