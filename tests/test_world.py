"""The embedded nuisance world: determinism, layout, the background-class knob, counterfactuals, boxes, cache."""
import csv
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import world
from common.data import world_config
from common.world import BACKGROUND_FAMILIES, FACTORS, WorldConfig, ensure_world
from tests.conftest import run_script

TINY = WorldConfig(num_classes=3, pairs_per_class=3, img_size=20, transfer_train_per_class=2,
                   transfer_test_per_class=2, unseen_classes=2)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def images(root):
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(Path(root).rglob("*.png"))}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return ensure_world(TINY, tmp_path_factory.mktemp("cache"))


def test_same_seed_same_world_other_seed_other_world(tiny_root, tmp_path):
    again = images(ensure_world(TINY, tmp_path / "again"))
    first = images(tiny_root)
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    for name in ("pairs.csv", "boxes.csv", "nuisances.csv"):
        assert (tiny_root / name).read_text() == (tmp_path / "again" / tiny_root.name / name).read_text()
    other = images(ensure_world(dataclasses.replace(TINY, seed=1), tmp_path / "other"))
    assert other.keys() == first.keys()
    assert sum(np.array_equal(first[k], other[k]) for k in first) == 0


def test_fewer_pairs_are_the_first_pairs_of_more(tiny_root, tmp_path):
    small = ensure_world(dataclasses.replace(TINY, pairs_per_class=1), tmp_path)
    big = images(tiny_root)
    for rel, img in images(small).items():
        if rel.startswith("train/"):
            assert np.array_equal(img, big[rel])


def test_layout_is_balanced_and_named(tiny_root):
    meta = json.loads((tiny_root / "world.json").read_text())
    assert meta["version"] == world.WORLD_VERSION
    assert meta["classes"] == ["c000", "c001", "c002"] and meta["unseen_classes"] == ["u000", "u001"]
    assert WorldConfig(**meta["config"]) == TINY
    expected = {"train": (meta["classes"], 2 * TINY.pairs_per_class),
                "transfer/seen/train": (meta["classes"], TINY.transfer_train_per_class),
                "transfer/seen/test": (meta["classes"], TINY.transfer_test_per_class),
                "transfer/unseen/train": (meta["unseen_classes"], TINY.transfer_train_per_class),
                "transfer/unseen/test": (meta["unseen_classes"], TINY.transfer_test_per_class)}
    for split, (classes, per_class) in expected.items():
        folders = sorted(p for p in (tiny_root / split).iterdir())
        assert [p.name for p in folders] == classes
        assert all(len(list(p.glob("*.png"))) == per_class for p in folders), split


def test_pairs_manifest(tiny_root):
    rows = read_csv(tiny_root / "pairs.csv")
    assert list(rows[0]) == ["class", "image_a", "image_b"]
    assert [r["class"] for r in rows] == [c for c in ("c000", "c001", "c002") for _ in range(TINY.pairs_per_class)]
    used = [r["image_a"] for r in rows] + [r["image_b"] for r in rows]
    assert len(set(used)) == len(used) == len(list((tiny_root / "train").rglob("*.png")))
    for r in rows:
        assert r["image_a"] != r["image_b"]
        assert r["image_a"].split("/")[0] == r["image_b"].split("/")[0] == r["class"]
        assert (tiny_root / "train" / r["image_a"]).is_file() and (tiny_root / "train" / r["image_b"]).is_file()


def test_pair_images_are_different_instances(tiny_root):
    for r in read_csv(tiny_root / "pairs.csv"):
        a, b = (np.asarray(Image.open(tiny_root / "train" / r[k])) for k in ("image_a", "image_b"))
        assert not np.array_equal(a, b)


def test_boxes_cover_every_image_inside_it(tiny_root):
    rows = read_csv(tiny_root / "boxes.csv")
    assert list(rows[0]) == ["path", "xmin", "ymin", "xmax", "ymax"]
    assert sorted(r["path"] for r in rows) == sorted(images(tiny_root))
    for r in rows:
        x0, y0, x1, y1 = (int(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert 0 <= x0 < x1 <= TINY.img_size and 0 <= y0 < y1 <= TINY.img_size


def test_box_is_the_tight_box_of_the_object():
    cf = world.counterfactuals(dataclasses.replace(TINY, img_size=24), "occlusion", 12)
    for obj, (x0, y0, x1, y1) in zip(cf["object"], cf["boxes"]):
        rows, cols = np.nonzero(obj > 0)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert obj[y0:y1, x0:x1].sum() == obj.sum()


def class_family_rate(cfg, n):
    """Fraction of pretraining images whose background family is their class's, from parameters only."""
    seen, _ = world.make_classes(cfg)
    hits = 0
    for i in range(n):
        c = i % cfg.num_classes
        _, *rngs, _ = world.image_rngs(cfg.seed, "train", c, i)
        hits += world.sample_nuisance(cfg, seen[c], rngs).background.family == seen[c].bg_family
    return hits / n


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
def test_background_class_correlation_is_what_was_asked(rho):
    cfg = WorldConfig(num_classes=20, bg_class_corr=rho)
    chance = 1 / len(BACKGROUND_FAMILIES)
    estimate = (class_family_rate(cfg, 4000) - chance) / (1 - chance)
    assert abs(estimate - rho) < 0.04  # binomial sd of the estimate <= 0.009


def test_default_backgrounds_are_independent_of_class():
    assert WorldConfig().bg_class_corr == 0.0
    cfg = WorldConfig(num_classes=10)
    seen, _ = world.make_classes(cfg)
    table = np.zeros((10, len(BACKGROUND_FAMILIES)))
    for i in range(3000):
        _, *rngs, _ = world.image_rngs(cfg.seed, "train", i % 10, i)
        table[i % 10, world.sample_nuisance(cfg, seen[i % 10], rngs).background.family] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    cramers_v = np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    assert cramers_v < 0.1  # about 0.05 expected by chance alone at this sample size


def test_transfer_backgrounds_ignore_the_class_even_when_pretraining_correlates(tmp_path):
    cfg = dataclasses.replace(TINY, bg_class_corr=1.0, transfer_train_per_class=8)
    root = ensure_world(cfg, tmp_path)
    seen, _ = world.make_classes(cfg)
    family = {s.name: s.bg_family for s in seen}
    rows = read_csv(root / "nuisances.csv")
    train = [int(r["bg_family"]) == family[r["path"].split("/")[1]] for r in rows if r["path"].startswith("train/")]
    transfer = [int(r["bg_family"]) == family[r["path"].split("/")[3]] for r in rows
                if r["path"].startswith("transfer/seen/")]
    assert all(train)
    assert sum(transfer) < len(transfer) / 2


@pytest.fixture(scope="module")
def counterfactual_sets():
    cfg = dataclasses.replace(TINY, num_classes=5, img_size=24)
    return {f: world.counterfactuals(cfg, f, 20) for f in FACTORS}


def changed_pixels(cf):
    return np.any(cf["base"] != cf["changed"], axis=-1)


def test_counterfactuals_are_shaped_as_documented_and_change_the_image(counterfactual_sets):
    for factor, cf in counterfactual_sets.items():
        assert cf["base"].shape == cf["changed"].shape == (20, 24, 24, 3)
        assert cf["base"].dtype == np.uint8
        assert list(cf["label"]) == [i % 5 for i in range(20)]
        assert changed_pixels(cf).any(axis=(1, 2)).mean() >= 0.9, factor


def test_background_counterfactual_leaves_the_object_and_occluders(counterfactual_sets):
    cf = counterfactual_sets["background"]
    fixed = (cf["object"] == 1) | (cf["base_occluder"] == 1)
    assert np.array_equal(cf["base_occluder"], cf["changed_occluder"])
    assert not (changed_pixels(cf) & fixed).any()


def test_pattern_counterfactual_changes_only_the_object(counterfactual_sets):
    cf = counterfactual_sets["pattern"]
    assert not (changed_pixels(cf) & (cf["object"] == 0)).any()


def test_occlusion_counterfactual_changes_only_under_occluders(counterfactual_sets):
    cf = counterfactual_sets["occlusion"]
    assert (cf["base_occluder"].sum((1, 2)) > 0).all() and (cf["changed_occluder"].sum((1, 2)) > 0).all()
    occluded = (cf["base_occluder"] > 0) | (cf["changed_occluder"] > 0)
    assert not (changed_pixels(cf) & ~occluded).any()


def test_illumination_counterfactual_is_only_light():
    """Illumination is global, so any pixel may change; its geometry must not: the coverage maps
    are the same, and with the light switched off the two renders are identical."""
    cfg = dataclasses.replace(TINY, img_size=24)
    lit = world.counterfactuals(cfg, "illumination", 10)
    assert np.array_equal(lit["base_occluder"], lit["changed_occluder"])
    assert changed_pixels(lit).mean() > 0.5
    dark = world.counterfactuals(dataclasses.replace(cfg, illumination=0.0), "illumination", 10)
    assert np.array_equal(dark["base"], dark["changed"])
    assert np.array_equal(dark["object"], lit["object"])


def test_instances_of_a_class_vary_but_keep_its_parts():
    cfg = WorldConfig(num_classes=1)
    spec = world.make_classes(cfg)[0][0]
    instances = [world.make_image(cfg, spec, "train", 0, i)[2] for i in range(6)]
    assert len({(i.cx, i.cy, i.radius, i.angle) for i in instances}) == 6
    assert len({i.parts[0].half_w for i in instances}) == 6
    for inst in instances:
        assert [p.shape for p in inst.parts] == [p.shape for p in spec.parts]


def test_shape_only_world_draws_part_colours_at_random():
    cfg = WorldConfig(num_classes=1, colour_consistency=0.0)
    seen, _ = world.make_classes(cfg)
    kept = Counter(p.colour == q.colour for i in range(200)
                   for p, q in zip(world.make_image(cfg, seen[0], "train", 0, i)[2].parts, seen[0].parts))
    assert abs(kept[True] / sum(kept.values()) - 1 / len(world.PALETTE)) < 0.06


def test_strength_zero_gives_a_plain_background():
    cfg = WorldConfig(num_classes=1, background_strength=0.0, illumination=0.0, occlusion_prob=0, sticker_prob=0)
    seen, _ = world.make_classes(cfg)
    img, box, _, _ = world.make_image(cfg, seen[0], "train", 0, 0)
    x0, y0, x1, y1 = box
    outside = np.ones(img.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert len(np.unique(img[outside].reshape(-1, 3), axis=0)) == 1


def test_ensure_world_uses_the_cache(tmp_path, monkeypatch):
    root = ensure_world(TINY, tmp_path)
    assert root == tmp_path / TINY.name() and root.name.startswith(f"world-v{world.WORLD_VERSION}-")

    def no_rewrite(*args):
        raise AssertionError("the cached world was generated again")
    monkeypatch.setattr(world, "write_world", no_rewrite)
    assert ensure_world(TINY, tmp_path) == root
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind
    monkeypatch.setenv("SEMPAIRS_CACHE", str(tmp_path))
    assert ensure_world(TINY) == root


def test_config_key_tells_worlds_apart():
    assert WorldConfig().key() == WorldConfig().key()
    assert len({WorldConfig(seed=s).key() for s in range(5)} | {WorldConfig(background_strength=0.9).key()}) == 6


def test_command_line_writes_world_and_preview(tmp_path, capsys):
    preview = tmp_path / "grid.png"
    world.main(["--out", str(tmp_path), "--num-classes", "2", "--pairs-per-class", "1", "--img-size", "16",
                "--unseen-classes", "1", "--transfer-train-per-class", "1", "--transfer-test-per-class", "1",
                "--preview", str(preview)])
    assert "world" in capsys.readouterr().out
    assert (tmp_path / dataclasses.replace(WorldConfig(), num_classes=2, pairs_per_class=1, img_size=16,
                                           unseen_classes=1, transfer_train_per_class=1,
                                           transfer_test_per_class=1).name() / "pairs.csv").is_file()
    assert Image.open(preview).size[0] > 16 * 10


def test_the_default_world_has_probe_splits_that_resolve_a_few_points():
    # 50-shot probes with 50 test images a class, on 100 seen and 40 unseen classes (README, Calibration)
    cfg = WorldConfig()
    assert cfg.transfer_train_per_class >= 50 and cfg.transfer_test_per_class >= 50 and cfg.unseen_classes >= 40
    assert cfg.seed == 0  # the calibration world; studies report on others (eval/study.py)


@pytest.mark.parametrize("setting, message", [
    ("num_classes=0", "world setting num_classes must be at least 1, got 0"),
    ("img_size=4", "world setting img_size must be at least 8, got 4"),
    ("seed=-1", "world setting seed must be at least 0, got -1"),
    ("background_strength=1.5", "world setting background_strength must be in [0, 1], got 1.5"),
    ("colour_consistency=-0.1", "world setting colour_consistency must be in [0, 1], got -0.1")])
def test_a_world_setting_out_of_range_is_one_line_and_exit_2(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        world_config([setting])
    proc = run_script("simclr.py", "--pairs", "semantic", "--world", setting, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr
