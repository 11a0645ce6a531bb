"""--precision: bf16 autocast where the device computes bf16 natively, float32 elsewhere; both train
every method to finite losses, and weights and checkpoints stay float32 either way."""
import json

import pytest
import torch

from common import utils
from tests.test_methods import TINY_HEADS, TINY_RUN, load, read_log, train


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16", "avx512f"}, True), ({"amx_bf16"}, True),
                                             ({"fp", "asimd", "bf16"}, True), ({"avx512f", "avx2"}, False)])
def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: " + " ".join(sorted(flags)) + "\n")
    real_path = utils.Path
    monkeypatch.setattr(utils, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert utils.native_bf16(torch.device("cpu")) is expected
    assert utils.resolve_precision("auto", torch.device("cpu")) == ("bf16" if expected else "fp32")
    assert utils.resolve_precision("fp32", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("method", ["simclr", "vicreg", "byol", "dino"])
def test_both_precisions_train_to_finite_losses_and_float32_weights(tiny_world, tmp_path, monkeypatch, method):
    states = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train(monkeypatch, f"{method}.py", "--pairs", "semantic", "--epochs", "1", "--out", out,
              "--precision", precision, *TINY_RUN, *TINY_HEADS.get(method, []))
        assert json.loads((out / "config.json").read_text())["precision"] == precision
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(out) if "loss" in r)
        states[precision] = load(out / "backbone.pth"), load(out / "checkpoint.pth")
    (backbone32, ckpt32), (backbone16, ckpt16) = states["fp32"], states["bf16"]
    assert backbone32.keys() == backbone16.keys()
    for k in backbone32:
        assert backbone16[k].shape == backbone32[k].shape and backbone16[k].dtype == backbone32[k].dtype
    floats = [v for state in (backbone16, *(s for s in ckpt16.values() if isinstance(s, dict)))
              for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    # bf16 changed the computation, not just its label
    assert any(not torch.equal(backbone16[k], backbone32[k]) for k in backbone32 if backbone32[k].is_floating_point())
