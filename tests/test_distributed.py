"""Exact gradients under torch.distributed: each script's own loss function, run by two CPU
processes (gloo) on the halves of a fixed global batch with the model prepared as the scripts
prepare it (`Run.prepare`: SyncBatchNorm and DDP), gives the parameter gradients, BatchNorm running
statistics, loss and DINO centre of one process computing the same loss on the whole batch with
plain BatchNorm. The networks run in float64, so the only differences left are rounding.
NT-Xent and VICReg take their fused CPU kernels where the extension is built (float64 included).

One pair of processes runs every method (starting them costs more than the steps) and saves its
results; each test compares them with the single-process computation done here."""
import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import byol
import dino
import simclr
import vicreg
from common import distributed, optim, utils
from common.backbones import build_backbone

WORLD_SIZE = 2
PAIRS, IMG, WIDTH = 8, 16, 8  # global batch; convnet of width 8 on 16 px: 64 features
METHODS = ("simclr", "vicreg", "byol", "dino")
# Sums taken in a different order: gradients and statistics agree to float64 rounding (measured:
# at most 1e-13 absolute, on gradients up to 10). The scripts compute losses in float32 (`.float()`
# keeps bfloat16 autocast out of them), so loss values and DINO's centre agree to float32 rounding.
FLOAT64 = dict(rtol=1e-9, atol=1e-11)
FLOAT32 = dict(rtol=1e-6, atol=1e-7)


def global_batch():
    """Four views of PAIRS samples: two global views and (for DINO) two 8-px local crops."""
    views = torch.randn(4, PAIRS, 3, IMG, IMG, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [views[0], views[1], views[2, ..., :IMG // 2, :IMG // 2], views[3, ..., :IMG // 2, :IMG // 2]]


def build(method):
    """The method's networks as its script builds them, smaller, in float64: {"model": trained,
    "target": momentum network (BYOL, DINO)}."""
    torch.manual_seed(0)
    backbone, feat_dim = build_backbone("convnet", IMG, WIDTH)
    if method == "simclr":
        nets = {"model": simclr.SimCLR(backbone, feat_dim, proj_dim=16)}
    elif method == "vicreg":
        nets = {"model": vicreg.VICReg(backbone, feat_dim, "32-32-32")}
    elif method == "byol":
        online = byol.BYOL(backbone, feat_dim, hidden_dim=32, proj_dim=16)
        nets = {"model": online, "target": copy.deepcopy(online.encoder)}
    else:  # the weight-norm scale trainable (the ViT recipe), so every parameter gets a gradient
        student = dino.DINO(backbone, feat_dim, out_dim=64, norm_last_layer=False)
        teacher = dino.DINO(*build_backbone("convnet", IMG, WIDTH), out_dim=64, norm_last_layer=False)
        teacher.load_state_dict(student.state_dict())
        nets = {"model": student, "target": teacher}
    return {name: net.double() for name, net in nets.items()}


def step(method, nets, views):
    """One step of the script's loss function; returns the loss, the DINO centre after it, and the
    gradients and buffers of the unwrapped networks."""
    model, target = nets["model"], nets.get("target")
    center = torch.linspace(-1, 1, 64, dtype=torch.float64)
    if method == "simclr":
        loss = simclr.simclr_loss(model, views[0], views[1], temperature=0.2)[0]
    elif method == "vicreg":
        loss, _ = vicreg.vicreg_loss(model, views[0], views[1], 25.0, 25.0, 1.0)
    elif method == "byol":
        loss, _ = byol.byol_loss(model, target, views[0], views[1])
    else:
        loss, _ = dino.dino_step_loss(model, target, views, center, teacher_temp=0.04, student_temp=0.1,
                                      center_momentum=0.9)
    loss.backward()
    unwrapped = {name: utils.Run.unwrap(net) for name, net in nets.items()}
    return {
        "loss": loss.detach(),
        "center": center,
        "grads": {k: p.grad for k, p in unwrapped["model"].named_parameters() if p.requires_grad},
        "buffers": {f"{name}.{k}": b for name, net in unwrapped.items() for k, b in net.named_buffers()},
    }


def batchnorm_case():
    """A BatchNorm2d with non-trivial affine parameters, an input batch and output weights."""
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = 3 + 2 * torch.randn(PAIRS, 3, 4, 4, generator=g, dtype=torch.float64)
    return bn, x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def batchnorm_step(bn, x, weights):
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * weights).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            **dict(bn.named_buffers())}


def _worker(rank, port, out):
    """One of the processes: the environment torchrun gives, then the scripts' own Run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    args = utils.base_parser("test", {}, prog="test").parse_args(["--device", "cpu", "--out", str(out / str(rank))])
    run = utils.Run(args)
    assert distributed.is_distributed()
    rows = slice(rank * PAIRS // WORLD_SIZE, (rank + 1) * PAIRS // WORLD_SIZE)
    views = [v[rows] for v in global_batch()]
    results = {}
    for method in METHODS:
        nets = {name: run.prepare(net) for name, net in build(method).items()}
        if "target" in nets:
            nets["target"].requires_grad_(False)  # as the scripts do, after prepare
        results[method] = step(method, nets, views)
    bn, x, weights = batchnorm_case()
    results["batchnorm"] = batchnorm_step(distributed.convert_sync_batchnorm(bn, run.device), x[rows], weights[rows])
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of each of the two processes."""
    out = tmp_path_factory.mktemp("distributed")
    # Forked, the processes start with everything this one has imported (spawned, each would
    # spend seconds importing torch and torchvision again).
    mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD_SIZE, start_method="fork")
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture
def one_thread():
    """The networks are tiny: a second thread only adds overhead, much of it on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual, expected, tolerance):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tolerance, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_the_gradients_of_one_on_the_whole_batch(ranks, one_thread, method):
    expected = step(method, build(method), global_batch())
    assert all(g is not None for g in expected["grads"].values())
    for rank in ranks:
        assert_close(rank[method]["grads"], expected["grads"], FLOAT64)
        assert_close(rank[method]["buffers"], expected["buffers"], FLOAT64)  # BatchNorm statistics
        torch.testing.assert_close(rank[method]["center"], expected["center"], **FLOAT32)
    # SimCLR and VICReg gather: each process's loss is the global one. BYOL and DINO average per
    # sample: the global loss is the mean of the processes' losses.
    losses = torch.stack([rank[method]["loss"] for rank in ranks])
    torch.testing.assert_close(losses.mean(), expected["loss"], **FLOAT32)
    if method in ("simclr", "vicreg"):
        torch.testing.assert_close(losses, expected["loss"].expand(WORLD_SIZE), **FLOAT32)


def test_cpu_syncbatchnorm_is_batchnorm_over_the_whole_batch(ranks):
    bn, x, weights = batchnorm_case()
    expected = batchnorm_step(bn, x, weights)
    # Each process holds its rows of the output and the input gradient; the affine parameters'
    # gradients are per process (DDP would average them), so their sum is the whole batch's.
    for name in ("y", "x_grad"):
        torch.testing.assert_close(torch.cat([rank["batchnorm"][name] for rank in ranks]), expected[name], **FLOAT64)
    for name in ("weight_grad", "bias_grad"):
        torch.testing.assert_close(sum(rank["batchnorm"][name] for rank in ranks), expected[name], **FLOAT64)
    for rank in ranks:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(rank["batchnorm"][name], expected[name], **FLOAT64)
