"""Fine-tuning a few steps on tiny fake CIFAR-10 with the convnet: it learns, writes its result and resumes."""
import json

import pytest
import torch

from eval import finetune
from tests.test_eval_datasets import one_thread, random_run, unchecked, write_cifar  # noqa: F401  (fixtures)


def test_finetune_learns_and_writes_its_result(tmp_path, unchecked, capsys):
    write_cifar(tmp_path / "data", 10, per_class=(4, 2))
    run = random_run(tmp_path)
    before = torch.load(run / "backbone.pth", weights_only=True)
    args = ["--checkpoint", str(run / "backbone.pth"), "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
            "--epochs", "20", "--batch-size", "8", "--warmup-epochs", "1", "--lr", "0.1"]
    finetune.main(args)
    epochs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in epochs] == list(range(1, 21)) and epochs[-1]["loss"] < epochs[0]["loss"]
    result = json.loads((run / "results" / "finetune-cifar10-center-s0.json").read_text())
    assert result["eval"] == "finetune" and result["dataset"] == "cifar10" and result["num_test"] == 20
    assert 40 < result["accuracy"] <= 100  # chance is 10%: the classes differ in colour
    protocol = result["protocol"]
    assert protocol["lr"] == 0.1 * 8 / 256 and protocol["label_smoothing"] == 0.1 and protocol["layer_decay"] is None
    state = torch.load(run / "finetune" / "cifar10-center-s0" / "checkpoint.pth", weights_only=True, map_location="cpu")
    assert state["epoch"] == 20
    tuned = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert tuned.keys() == before.keys() and not torch.equal(tuned["features.0.weight"], before["features.0.weight"])

    # --resume after the last epoch trains no more and evaluates the same model.
    finetune.main(args + ["--resume", "--out", str(tmp_path / "again.json")])
    assert "resumed from" in capsys.readouterr().err
    assert json.loads((tmp_path / "again.json").read_text())["accuracy"] == result["accuracy"]


def test_vit_groups_decay_the_lr_layer_by_layer():
    """ViT-S/8: block k of 12 gets 0.65^(13 - k) of the lr, the stem 0.65^13, the final norm and
    the head all of it; biases, norms, position embedding and class token get no weight decay."""
    from common.backbones import build_backbone

    backbone, dim = build_backbone("vit_small_patch8", img_size=32)
    model = finetune.FineTuned(backbone, dim, 10)
    groups = finetune.param_groups(model, "vit_small_patch8", 0.05, 0.65)
    of = {id(p): g for g in groups for p in g["params"]}
    assert len(of) == sum(1 for _ in model.parameters())
    named = dict(model.named_parameters())

    def scale(name):
        return of[id(named[name])]["lr_scale"]

    assert scale("backbone.blocks.0.attn.qkv.weight") == pytest.approx(0.65 ** 12)
    assert scale("backbone.blocks.11.mlp.fc2.weight") == pytest.approx(0.65)
    assert scale("backbone.patch_embed.proj.weight") == pytest.approx(0.65 ** 13)
    assert scale("backbone.norm.weight") == scale("head.weight") == 1.0
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.blocks.3.norm1.weight", "head.bias"):
        assert of[id(named[name])]["weight_decay"] == 0.0
    assert of[id(named["backbone.blocks.3.attn.proj.weight"])]["weight_decay"] == 0.05
