"""Downstream datasets in their exact on-disk formats, read by torchvision and probed end to end.

The fakes hold a handful of images per class, each class a colour with noise and a bright corner
(so a transposed reader shows). torchvision checks every file's MD5, which fakes cannot pass:
like torchvision's own tests, the tests patch check_integrity (the `unchecked` fixture); the
production code keeps the checks, which one test shows.
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common.backbones import build_backbone
from common.transforms import IMAGENET_MEAN, IMAGENET_STD
from eval import datasets, knn, linear_probe
from tests.conftest import run_script


def class_images(num_classes, per_class, size, seed=0):
    """(uint8 N x size x size x 3 HWC, labels): a colour per class (the same in every part) plus
    noise drawn with `seed`, the top-left corner white."""
    colours = np.random.default_rng(12345).integers(0, 256, (num_classes, 3))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = np.clip(colours[labels][:, None, None, :] + rng.normal(0, 20, (len(labels), size, size, 3)), 0, 255)
    images = images.astype(np.uint8)
    images[:, : size // 4, : size // 8] = 255  # not symmetric: a reader that transposes fails
    return images, labels


def write_stl10(root, per_class=(4, 2)):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for part, n, seed in (("train", per_class[0], 0), ("test", per_class[1], 1)):
        images, labels = class_images(10, n, 96, seed)
        # Column-major channel planes: N x C x W x H.
        images.transpose(0, 3, 2, 1).tofile(folder / f"{part}_X.bin")
        (labels + 1).astype(np.uint8).tofile(folder / f"{part}_y.bin")
        out[part] = images, labels
    class_images(1, 2, 96)[0].transpose(0, 3, 2, 1).tofile(folder / "unlabeled_X.bin")
    return out


def write_cifar(root, num_classes, per_class=(4, 2)):
    """CIFAR-10 (5 training batches, test_batch, batches.meta) or CIFAR-100 (train, test, meta)."""
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = "labels" if num_classes == 10 else "fine_labels"
    out = {}
    for part, n, seed in (("train", per_class[0], 0), ("test", per_class[1], 1)):
        images, labels = class_images(num_classes, n, 32, seed)
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # R plane, G plane, B plane
        out[part] = images, labels
        if num_classes == 10 and part == "train":
            for b, chunk in enumerate(np.array_split(np.arange(len(rows)), 5)):
                batch = {"batch_label": f"training batch {b + 1} of 5", "data": rows[chunk],
                         "labels": labels[chunk].tolist()}
                (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch))
        else:
            name = "test_batch" if num_classes == 10 else part
            batch = {"data": rows, key: labels.tolist()}
            if num_classes == 100:
                batch["coarse_labels"] = (labels // 5).tolist()
            (folder / name).write_bytes(pickle.dumps(batch))
    names = [f"class{i}" for i in range(num_classes)]
    meta = {"label_names": names} if num_classes == 10 else {"fine_label_names": names,
                                                             "coarse_label_names": names[:20]}
    (folder / ("batches.meta" if num_classes == 10 else "meta")).write_bytes(pickle.dumps(meta))
    return out


WRITERS = {"stl10": write_stl10, "cifar10": lambda r, **k: write_cifar(r, 10, **k),
           "cifar100": lambda r, **k: write_cifar(r, 100, **k)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: on shared cores a second thread mostly waits for the first (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unchecked(monkeypatch):
    """Skip torchvision's MD5 checks (file existence is still required), as its own tests do."""
    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", exists)


def random_run(tmp_path, name="run", width=8, **config):
    """A RUN folder with a random-init convnet backbone.pth and a config.json."""
    run = tmp_path / name
    run.mkdir()
    torch.manual_seed(0)
    torch.save(build_backbone("convnet", 32, width=width)[0].state_dict(), run / "backbone.pth")
    config = {"method": "simclr", "pairs": "semantic", "seed": 3, "epochs": 2, "images_per_class": None,
              "transforms": "full", "arch": "convnet", "img_size": 32, **config}
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.mark.parametrize("name", ["stl10", "cifar10", "cifar100"])
def test_readers_return_the_pixels_and_labels_written(tmp_path, unchecked, name):
    written = WRITERS[name](tmp_path)
    for part in ("train", "test"):
        images, classes = datasets.labelled_images(name, tmp_path, part)
        expected, labels = written[part]
        assert len(images) == len(labels) and len(classes) == (100 if name == "cifar100" else 10)
        for i in (0, len(labels) - 1):
            img, label = images[i]
            assert label == labels[i]
            np.testing.assert_array_equal(np.asarray(img), expected[i])


def test_production_readers_keep_the_checksums(tmp_path):
    write_cifar(tmp_path, 10)
    with pytest.raises(datasets.DatasetNotFound, match="checksums"):
        datasets.labelled_images("cifar10", tmp_path, "train")


@pytest.mark.parametrize("name, layout", [("stl10", "stl10_binary/"), ("cifar10", "cifar-10-batches-py/"),
                                          ("cifar100", "cifar-100-python/"), ("embedded", "transfer/")])
def test_a_missing_dataset_names_the_layout_expected(tmp_path, name, layout):
    with pytest.raises(datasets.DatasetNotFound, match=layout):
        datasets.labelled_images(name, tmp_path / "nowhere", "train")


def test_the_scripts_report_a_missing_dataset_in_one_line_and_exit_2(tmp_path):
    run = random_run(tmp_path)
    proc = run_script("-m", "eval.linear_probe", "--checkpoint", run / "backbone.pth", "--dataset", "stl10",
                      "--data-root", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and "stl10_binary/" in proc.stderr and "nowhere" in proc.stderr


@pytest.mark.parametrize("name", ["stl10", "cifar10", "cifar100"])
def test_linear_probe_end_to_end(tmp_path, unchecked, name):
    WRITERS[name](tmp_path / "data")
    run = random_run(tmp_path)
    linear_probe.main(["--checkpoint", str(run / "backbone.pth"), "--dataset", name,
                       "--data-root", str(tmp_path / "data")])
    result = json.loads((run / "results" / f"linear-{name}-center-s0.json").read_text())
    classes = 100 if name == "cifar100" else 10
    assert result["schema"] == "sempairs-eval/1" and result["eval"] == "linear"
    assert (result["dataset"], result["split"], result["crop"], result["img_size"]) == (name, None, "center", 32)
    assert (result["num_classes"], result["num_train"], result["num_test"]) == (classes, 4 * classes, 2 * classes)
    assert (result["method"], result["pairs"], result["seed"], result["epochs"]) == ("simclr", "semantic", 3, 2)
    assert 3 * 100 / classes < result["accuracy"] <= 100  # the classes differ in colour: far above chance
    protocol = result["protocol"]
    assert protocol["l2"] in protocol["l2_grid"] and len(protocol["val_accuracy"]) == len(protocol["l2_grid"])
    assert protocol["num_val"] == classes and protocol["test_view"]["resize_ratio"] == 1.0


def test_probe_chooses_l2_without_looking_at_the_test_set(tmp_path, unchecked):
    """The same training set with the test labels shuffled (which also renews the cached test
    features): the choice of l2 cannot change."""
    written = write_cifar(tmp_path / "data", 10, per_class=(6, 3))
    run = random_run(tmp_path)
    args = ["--checkpoint", str(run / "backbone.pth"), "--dataset", "cifar10", "--data-root", str(tmp_path / "data")]
    linear_probe.main(args + ["--out", str(tmp_path / "a.json")])
    test = pickle.loads((tmp_path / "data" / "cifar-10-batches-py" / "test_batch").read_bytes())
    test["labels"] = np.roll(written["test"][1], 3).tolist()
    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(test))
    linear_probe.main(args + ["--out", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / f).read_text())["protocol"] for f in ("a.json", "b.json"))
    assert a["l2"] == b["l2"] and a["val_accuracy"] == b["val_accuracy"]


def test_probe_searches_a_finer_grid_or_takes_a_fixed_l2(tmp_path, unchecked):
    """--l2-per-decade 4 searches ssl-transfer's spacing (the decades among it); --l2 fits that l2
    alone; asking for both ends the command with exit 2."""
    write_cifar(tmp_path / "data", 10, per_class=(6, 3))
    run = random_run(tmp_path)
    args = ["--checkpoint", str(run / "backbone.pth"), "--dataset", "cifar10", "--data-root", str(tmp_path / "data")]
    linear_probe.main(args + ["--l2-per-decade", "4", "--out", str(tmp_path / "fine.json")])
    linear_probe.main(args + ["--l2", "0.003", "--out", str(tmp_path / "fixed.json")])
    fine, fixed = (json.loads((tmp_path / f).read_text())["protocol"] for f in ("fine.json", "fixed.json"))
    assert len(fine["l2_grid"]) == 25 and set(linear_probe.L2_GRID) <= set(fine["l2_grid"])
    assert fine["selection"] == "validation accuracy" and fine["l2"] in fine["l2_grid"]
    assert (fixed["l2_grid"], fixed["l2"], fixed["selection"]) == ([0.003], 0.003, "fixed by --l2")
    proc = run_script("-m", "eval.linear_probe", *args, "--l2", "0.003", "--l2-per-decade", "4", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--l2" in proc.stderr, proc.stderr


def test_random_crop_test_is_seeded_and_cached_apart(tmp_path, unchecked):
    write_stl10(tmp_path / "data")
    run = random_run(tmp_path)
    common = ["--checkpoint", str(run / "backbone.pth"), "--dataset", "stl10", "--data-root", str(tmp_path / "data"),
              "--crop", "random"]
    linear_probe.main(common)
    cached = run / "features" / "stl10-test-random-s0-32.pt"
    first = torch.load(cached, weights_only=True)
    assert first["key"]["crop_scale"] == list(datasets.RANDOM_CROP_SCALE)
    linear_probe.main(common + ["--seed", "1", "--out", str(tmp_path / "seed1.json")])
    linear_probe.main(common[:-2] + ["--out", str(tmp_path / "centre.json")])
    other = torch.load(run / "features" / "stl10-test-random-s1-32.pt", weights_only=True)
    centre = torch.load(run / "features" / "stl10-test-center-32.pt", weights_only=True)
    assert not torch.allclose(first["features"], other["features"])
    assert not torch.allclose(first["features"], centre["features"])
    result = json.loads((run / "results" / "linear-stl10-random-s0.json").read_text())
    assert result["crop"] == "random" and result["protocol"]["train_view"]["crop"] == "center"

    # The same seed reuses the cache; a retrained checkpoint does not.
    mtime = cached.stat().st_mtime_ns
    linear_probe.main(common)
    assert cached.stat().st_mtime_ns == mtime
    torch.save(build_backbone("convnet", 32, width=8)[0].state_dict(), run / "backbone.pth")
    linear_probe.main(common)
    again = torch.load(cached, weights_only=True)
    assert again["key"]["checkpoint_sha256"] != first["key"]["checkpoint_sha256"]
    assert not torch.allclose(again["features"], first["features"])


def test_random_crop_shows_a_fifth_to_a_half_of_the_image():
    """On an image whose red and green channels are the x and y coordinates, the span of the
    coordinates in the view is the crop's box."""
    ramp = np.arange(96, dtype=np.float64) / 95 * 255
    img = np.zeros((96, 96, 3), np.uint8)
    img[..., 0], img[..., 1] = ramp[None, :], ramp[:, None]
    view = datasets.Views([(Image.fromarray(img), 0)], datasets.eval_view(96, "random"), seed=0)
    mean, std = torch.tensor(IMAGENET_MEAN)[:2, None, None], torch.tensor(IMAGENET_STD)[:2, None, None]
    fractions = []
    for seed in range(20):
        view.seed = seed
        x = (view[0][0][:2] * std + mean) * 255
        width = (x[0].max() - x[0].min()) / 255
        height = (x[1].max() - x[1].min()) / 255
        fractions.append(float(width * height))
        torch.testing.assert_close(view[0][0], datasets.Views(view.images, view.transform, seed)[0][0])
    assert 0.17 <= min(fractions) and max(fractions) <= 0.53 and max(fractions) - min(fractions) > 0.05


def test_centre_view_keeps_the_whole_image():
    """SimCLR/Kornblith transfer protocol: a 96-px STL-10 image upscaled to 224 keeps its border
    (ImageNet's resize to 256 and crop 224 would cut 1/16 of each side)."""
    ramp = np.arange(96, dtype=np.float64) / 95 * 255
    img = np.zeros((96, 96, 3), np.uint8)
    img[..., 0], img[..., 1] = ramp[None, :], ramp[:, None]
    x = datasets.Views([(Image.fromarray(img), 0)], datasets.eval_view(224), seed=0)[0][0]
    mean, std = torch.tensor(IMAGENET_MEAN)[:2, None, None], torch.tensor(IMAGENET_STD)[:2, None, None]
    x = (x[:2] * std + mean) * 255
    assert x.shape[-2:] == (224, 224)
    assert x[0].min() < 3 and x[0].max() > 252 and x[1].min() < 3 and x[1].max() > 252


def test_embedded_world_probe_and_knn_both_splits(tiny_world, tmp_path):
    from tests.conftest import TINY_WORLD

    run = random_run(tmp_path, world=TINY_WORLD)
    for split in ("seen", "unseen"):
        linear_probe.main(["--checkpoint", str(run / "backbone.pth"), "--split", split])
        knn.main(["--checkpoint", str(run / "backbone.pth"), "--split", split])
        for kind in ("linear", "knn"):
            result = json.loads((run / "results" / f"{kind}-embedded-{split}-center-s0.json").read_text())
            assert result["dataset"] == "embedded" and result["split"] == split and 0 <= result["accuracy"] <= 100
            assert result["protocol"]["test_view"]["resize_ratio"] == 1.0
            classes = 4 if split == "seen" else 2
            assert result["num_classes"] == classes and result["num_test"] == 3 * classes
