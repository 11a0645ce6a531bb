"""bench/train_throughput.py on the CPU, so that the GPU sessions' one run of it (bench/gpu_check.sh) does not
find its bugs."""
import importlib.util
import os

from common import pairs
from tests.conftest import REPO, TINY_WORLD, run_script

BENCH = ["bench/train_throughput.py", "--arch", "convnet", "--img-size", "32", "--steps", "1", "--warmup", "1",
         "--workers", "0", "--device", "cpu", "--world", *TINY_WORLD]


def test_train_throughput_times_every_method_through_the_loader(tiny_world):
    # 64 items (every image of the 32 pairs) in batches of 4: two loader timings of 2 + 6 batches fit one epoch
    out = run_script(*BENCH, "--batch-size", "4").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert sorted(rows) == ["byol", "dino", "simclr", "vicreg"]
    for precision, *rates in rows.values():  # images/s of the step alone, the loader alone and both; time share in the loader
        assert len(rates) == 4 and all(float(r) > 0 for r in rates[:3]) and 0 <= float(rates[3].rstrip("%")) <= 100


def test_train_throughput_gives_a_row_per_method_and_precision(tiny_world):
    out = run_script(*BENCH, "--batch-size", "4", "--methods", "simclr", "--precision", "fp32", "bf16").stdout
    assert [line.split()[:2] for line in out.splitlines()[2:] if line.strip()] == [["simclr", "fp32"], ["simclr", "bf16"]]


def test_train_throughput_refuses_timings_that_cross_an_epoch(tiny_world):
    proc = run_script(*BENCH, "--batch-size", "8", "--methods", "simclr", check=False)
    assert proc.returncode != 0 and "takes 16 batches in one epoch; the data has 8" in proc.stderr


def load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench/train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_fake_imagenet_has_the_images_asked_for_and_a_manifest(tmp_path):
    root = load_bench().write_fake_imagenet(tmp_path, 25, per_class=10, unique_classes=2)
    classes = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(classes) == 3 and all(len(os.listdir(c)) == 10 for c in classes)
    assert os.stat(classes[2] / os.listdir(classes[2])[0]).st_nlink == 2  # linked from a generated class
    assert pairs.per_class_counts(pairs.load_pairs(tmp_path / "pairs.csv", tmp_path)) == {c.name: 5 for c in classes}
    assert root == str(tmp_path)


def test_fake_imagenet_fills_its_thousand_classes_when_asked_for_more(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench.imagenet, "synsets_1k", lambda: ["n01", "n02"])  # a world of two synsets
    bench.write_fake_imagenet(tmp_path, 50, per_class=10, unique_classes=1)
    assert sorted(len(os.listdir(c)) for c in tmp_path.iterdir() if c.is_dir()) == [25, 25]
