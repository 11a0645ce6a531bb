"""vicreg.py, byol.py and dino.py end to end on a tiny embedded world: both pair modes, the outputs
simclr.py writes, ResNet-50 and ViT-S/8 backbones, DINO's schedules and frozen last layer as
trained, and resume of the EMA teacher and DINO's centre.

The scripts run in this process as `python SCRIPT ARGS` would (runpy with sys.argv): a subprocess
would spend most of its time importing torch again."""
import json
import runpy
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision

from common import utils
from common.backbones import ConvNet, build_backbone
from tests.conftest import REPO, TINY_WORLD

TINY_RUN = ["--batch-size", "8", "--log-every", "1", "--workers", "0", "--world", *TINY_WORLD]
TINY_HEADS = {
    "vicreg": ["--expander", "64-64-64"],
    "byol": ["--hidden-dim", "64", "--proj-dim", "32"],
    "dino": ["--out-dim", "64", "--local-crops", "2"],
}


def train(monkeypatch, script, *args):
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", [script, *map(str, args)])
        runpy.run_path(str(REPO / script), run_name="__main__")


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")  # checkpoints of a CUDA run hold CUDA tensors


def part(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same(a, b, same=True):
    assert a.keys() == b.keys()
    equal = [torch.equal(a[k], b[k]) for k in a]
    assert all(equal) if same else not all(equal)


@pytest.mark.parametrize("pairs", ["semantic", "augmented"])
@pytest.mark.parametrize("method", ["vicreg", "byol", "dino"])
def test_method_trains_and_writes_the_outputs_simclr_writes(tiny_world, tmp_path, monkeypatch, method, pairs):
    out = tmp_path / "run"
    width_flag = ["--width", 8] if pairs == "augmented" else []  # reaches the backbone (and DINO's teacher)
    width = 8 if width_flag else 16  # the default
    train(monkeypatch, f"{method}.py", "--pairs", pairs, "--epochs", "1", "--out", out, *TINY_RUN, *TINY_HEADS[method],
          *width_flag)
    log = read_log(out)
    steps = [r for r in log if "step" in r]
    assert len(steps) == 4  # 32 pairs / batch 8
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 < r["embedding_std"] for r in steps)
    assert log[-1]["epoch"] == 1 and 0 <= log[-1]["knn_top1"] <= 100
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["pairs"] == pairs and config["width"] == width
    checkpoint = load(out / "checkpoint.pth")
    backbone = load(out / "backbone.pth")
    ConvNet(width).load_state_dict(backbone, strict=True)
    # The evaluated backbone: BYOL's online network, DINO's teacher (as DINO's own evaluations).
    saved = {"vicreg": ("model", "backbone."), "byol": ("model", "encoder.backbone."),
             "dino": ("teacher", "backbone.")}[method]
    assert_same(backbone, part(checkpoint[saved[0]], saved[1]))
    if method == "dino":
        assert_same(backbone, part(checkpoint["student"], "backbone."), same=False)


@pytest.mark.parametrize("method", ["simclr", "vicreg", "byol", "dino"])
def test_training_starts_from_the_init_backbone(tiny_world, tmp_path, monkeypatch, method):
    torch.manual_seed(123)  # not the run's seed
    start = build_backbone("convnet")[0].state_dict()
    torch.save(start, tmp_path / "start.pth")
    out = tmp_path / "run"
    train(monkeypatch, f"{method}.py", "--pairs", "semantic", "--epochs", "1", "--lr", "0", "--init-backbone",
          tmp_path / "start.pth", "--out", out, *TINY_RUN, *TINY_HEADS.get(method, []))
    # At learning rate 0 the weights stay where they started; BatchNorm's running statistics move.
    weights = {k: v for k, v in load(out / "backbone.pth").items() if "running" not in k and "batches" not in k}
    assert_same(weights, {k: start[k] for k in weights})


@pytest.mark.parametrize("arch", ["resnet50", "vit_small_patch8"])
def test_dino_resnet50_and_vit_recipes_and_their_backbones(tiny_world, tmp_path, monkeypatch, arch):
    out = tmp_path / arch
    # On --data, so that the publication's recipe applies (the world's defaults differ). The ResNet's
    # local crops (24 px) keep its layer4 maps at least as large as their stride, as bf16 needs.
    img_size = 64 if arch == "resnet50" else 32
    train(monkeypatch, "dino.py", "--pairs", "semantic", "--arch", arch, "--img-size", img_size, "--epochs", "1",
          "--batch-size", "4", "--images-per-class", "2", "--out", out, "--log-every", "1", "--workers", "0",
          "--data", tiny_world / "train", "--manifest", tiny_world / "pairs.csv", *TINY_HEADS["dino"])
    config = json.loads((out / "config.json").read_text())
    optimizer = load(out / "checkpoint.pth")["optimizer"]
    if arch == "resnet50":
        model = torchvision.models.resnet50()
        model.fc = torch.nn.Identity()  # backbone.pth holds no classifier
        assert (config["optimizer"], config["lr"], config["norm_last_layer"]) == ("sgd", 0.03, True)
        assert [g["weight_decay"] for g in optimizer["param_groups"]] == [1e-4, 0.0]
    else:
        model = timm.create_model("vit_small_patch8_224", num_classes=0, img_size=32)
        assert (config["optimizer"], config["lr"], config["norm_last_layer"]) == ("adamw", 5e-4, False)
        assert config["drop_path_rate"] == 0.1 and config["teacher_temp"] == 0.07
        # Two steps of the cosine weight decay 0.04 -> 0.4: 0.04 then 0.4 - 0.18 * (1 + cos(pi / 2)) = 0.22.
        assert [r["wd"] for r in read_log(out) if "step" in r] == pytest.approx([0.04, 0.22])
        assert [g["weight_decay"] for g in optimizer["param_groups"]] == pytest.approx([0.22, 0.0])
        assert "exp_avg_sq" in next(iter(optimizer["state"].values()))  # AdamW
    model.load_state_dict(load(out / "backbone.pth"), strict=True)


def test_bf16_on_the_cpu_refuses_maps_smaller_than_a_strided_convolutions_stride(tiny_world, tmp_path, monkeypatch,
                                                                                capsys):
    # 16-px views give resnet18's layer4 1x1 maps, where PyTorch's bf16 CPU kernels give wrong gradients.
    with pytest.raises(SystemExit) as exit_:
        train(monkeypatch, "simclr.py", "--pairs", "semantic", "--arch", "resnet18", "--img-size", "16", "--precision",
              "bf16", "--epochs", "1", "--out", tmp_path / "run", *TINY_RUN)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.split("error: ")[-1]
    assert error.startswith("--precision bf16 on the CPU: backbone.layer4.0.conv1 (stride 2) gets 1x1 maps")
    assert error.count("\n") == 1 and not (tmp_path / "run" / "log.jsonl").exists()  # stopped before a step


class Stop(Exception):
    pass


def train_one_epoch_then_stop(monkeypatch, *args):
    """Runs the script until its first checkpoint, then stops it as a kill would."""
    end_epoch = utils.Run.end_epoch

    def end_then_stop(self, epoch, *a, **kw):
        end_epoch(self, epoch, *a, **kw)
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(utils.Run, "end_epoch", end_then_stop)
        with pytest.raises(Stop):
            train(m, *args)


def test_byol_resume_restores_the_target_network(tiny_world, tmp_path, monkeypatch):
    args = ["byol.py", "--pairs", "semantic", "--epochs", "2", *TINY_RUN, *TINY_HEADS["byol"]]
    train(monkeypatch, *args, "--out", tmp_path / "whole")
    train_one_epoch_then_stop(monkeypatch, *args, "--out", tmp_path / "resumed")
    halfway = load(tmp_path / "resumed" / "checkpoint.pth")
    assert halfway["epoch"] == 1
    assert_same(halfway["target"], part(halfway["model"], "encoder."), same=False)  # an average, not a copy
    train(monkeypatch, *args, "--out", tmp_path / "resumed", "--resume")
    whole, resumed = load(tmp_path / "whole" / "checkpoint.pth"), load(tmp_path / "resumed" / "checkpoint.pth")
    for name in ("target", "model"):
        for key in whole[name]:
            torch.testing.assert_close(resumed[name][key], whole[name][key], rtol=1e-5, atol=1e-6)


def test_dino_resume_schedules_and_frozen_last_layer(tiny_world, tmp_path, monkeypatch):
    args = ["dino.py", "--pairs", "semantic", "--epochs", "2", "--teacher-temp", "0.07",
            "--teacher-temp-warmup-epochs", "2", "--weight-decay", "0.04", "--weight-decay-end", "0.4",
            *TINY_RUN, *TINY_HEADS["dino"]]
    train(monkeypatch, *args, "--out", tmp_path / "whole")
    whole = load(tmp_path / "whole" / "checkpoint.pth")
    steps = [r for r in read_log(tmp_path / "whole") if "step" in r]
    # Teacher temperature: linear 0.04 -> 0.07 over two epochs, one value per epoch.
    assert [r["teacher_temp"] for r in steps] == pytest.approx([0.04] * 4 + [0.07] * 4)
    # Weight decay at the last of 8 steps: 0.4 + 0.5 * (0.04 - 0.4) * (1 + cos(7 pi / 8)) = 0.38629831,
    # applied to the weights only.
    assert [g["weight_decay"] for g in whole["optimizer"]["param_groups"]] == pytest.approx([0.38629831, 0.0])

    train_one_epoch_then_stop(monkeypatch, *args, "--out", tmp_path / "resumed")
    halfway = load(tmp_path / "resumed" / "checkpoint.pth")
    assert halfway["epoch"] == 1 and halfway["center"].abs().sum() > 0
    # The last layer is frozen during the first epoch, so the teacher's average of it equals it;
    # the rest of the student has moved away from the teacher.
    assert_same(part(halfway["student"], "head.last_layer."), part(halfway["teacher"], "head.last_layer."))
    assert_same(part(halfway["student"], "head.mlp."), part(halfway["teacher"], "head.mlp."), same=False)

    train(monkeypatch, *args, "--out", tmp_path / "resumed", "--resume")
    resumed = load(tmp_path / "resumed" / "checkpoint.pth")
    torch.testing.assert_close(resumed["center"], whole["center"], rtol=1e-5, atol=1e-6)
    for name in ("teacher", "student"):
        for key in whole[name]:
            torch.testing.assert_close(resumed[name][key], whole[name][key], rtol=1e-5, atol=1e-6)
    assert_same(part(resumed["student"], "head.last_layer."), part(halfway["student"], "head.last_layer."),
                same=False)
