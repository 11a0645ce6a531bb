"""The fused losses (csrc/) against the reference definitions in common/losses.py."""
import importlib.util
import os
import shutil

import pytest
import torch

from bench.losses import peak_extra_memory
from common import losses

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def embeddings(n, d, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, d, generator=generator, dtype=torch.float64)).to(device, dtype) for _ in range(2)]


def loss_and_grads(fn, a, b, upstream=0.7):
    """fn(a, b) and the gradients of upstream * fn(a, b), on fresh leaves (a non-unit upstream
    gradient checks that the backward scales by it)."""
    a, b = (t.detach().requires_grad_() for t in (a, b))
    loss = fn(a, b)
    grads = torch.autograd.grad(loss, (a, b), torch.tensor(upstream, dtype=loss.dtype, device=loss.device))
    return [loss.detach(), *grads]


def assert_close(actual, expected, rtol, floors=(1e-3, 1e-3, 1e-3)):
    """Each tensor within rtol of expected, relative to its largest entry or, where that is smaller,
    to its floor: the size of the terms it sums (a result can be ~0, its rounding error is not)."""
    for x, y, floor in zip(actual, expected, floors):
        y = y.to(x.device, torch.float64)
        torch.testing.assert_close(x.double(), y, rtol=rtol, atol=rtol * max(y.abs().max().item(), floor))


def nt_xent_floors(z1, z2, temperature):
    """The size of NT-Xent's terms: logits up to 1 / temperature; each anchor's gradient on a
    normalised view up to 2 / (temperature M), divided by the view's norm. At N = 1 or D = 1 the
    exact loss or gradients are 0 and float32 leaves rounding errors of these sizes."""
    grad = 2 / (temperature * 2 * len(z1) * torch.cat([z1, z2]).norm(dim=1).min().item())
    return 1 / temperature, grad, grad


def nt_xent_fn(temperature, impl):
    return lambda a, b: losses.nt_xent(a, b, temperature, impl=impl)


def vicreg_fn(impl, coefficients=(25.0, 25.0, 1.0)):
    return lambda a, b: losses.vicreg_loss(a, b, *coefficients, impl=impl)


# N = 1 and 2, D = 1, odd sizes, sizes that cross tile edges on CPU (blocks of up to 256 rows), large D.
NT_XENT_SHAPES = [(1, 3), (2, 1), (2, 5), (3, 7), (17, 64), (130, 40), (700, 8), (5, 1000)]


@pytest.mark.parametrize("temperature", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("n,d", NT_XENT_SHAPES)
def test_nt_xent_matches_reference_fp64(n, d, temperature):
    z1, z2 = embeddings(n, d)
    fused = loss_and_grads(nt_xent_fn(temperature, "fused"), z1, z2)
    assert_close(fused, loss_and_grads(nt_xent_fn(temperature, "reference"), z1, z2), rtol=1e-9)


@pytest.mark.parametrize("temperature", [0.1, 0.02])
@pytest.mark.parametrize("n,d", [(3, 7), (130, 40), (700, 8), (64, 128)])
def test_nt_xent_matches_reference_fp32(n, d, temperature):
    z1, z2 = embeddings(n, d)
    fused = loss_and_grads(nt_xent_fn(temperature, "fused"), z1.float(), z2.float())
    assert_close(fused, loss_and_grads(nt_xent_fn(temperature, "reference"), z1, z2), rtol=2e-5)


def test_nt_xent_zero_and_non_contiguous_inputs():
    z1, z2 = embeddings(9, 6)
    z1[2], z2[5] = 0, 0  # normalised as F.normalize does: divided by max(||z||, 1e-12)
    expected = loss_and_grads(nt_xent_fn(0.1, "reference"), z1, z2)
    assert_close(loss_and_grads(nt_xent_fn(0.1, "fused"), z1, z2), expected, rtol=1e-9)
    transposed, strided = z1.T.contiguous().T, torch.stack([z2, z2], dim=2)[:, :, 0]
    assert not transposed.is_contiguous() and not strided.is_contiguous()
    assert_close(loss_and_grads(nt_xent_fn(0.1, "fused"), transposed, strided), expected, rtol=1e-9)


def test_nt_xent_cpu_result_does_not_depend_on_thread_count():
    z1, z2 = embeddings(600, 32, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(nt_xent_fn(0.1, "fused"), z1, z2)
        torch.set_num_threads(2)
        two = loss_and_grads(nt_xent_fn(0.1, "fused"), z1, z2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_nt_xent_cpu_memory_is_linear_in_batch():
    z1, z2 = (z.requires_grad_() for z in embeddings(4096, 8, dtype=torch.float32))
    similarity_matrix = (2 * 4096) ** 2 * 4
    assert peak_extra_memory(nt_xent_fn(0.1, "fused"), z1, z2) < similarity_matrix / 8


# N = 2, D = 1, N == D, both forms (Gram when N < D), collapsed and spread-out dimensions.
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("n,d", [(2, 1), (2, 5), (3, 3), (7, 20), (20, 7), (64, 256), (256, 64)])
def test_vicreg_matches_reference_fp64(n, d, scale):
    x, y = embeddings(n, d, scale=scale)
    fused = loss_and_grads(vicreg_fn("fused"), x, y)
    assert_close(fused, loss_and_grads(vicreg_fn("reference"), x, y), rtol=1e-9)


@pytest.mark.parametrize("n,d", [(48, 160), (160, 48)])
def test_vicreg_gram_and_covariance_forms_match_reference(n, d):
    x, y = embeddings(n, d, seed=1)
    _, grams, _ = torch.ops.sempairs.vicreg(x, y, 25.0, 25.0, 1.0)
    assert grams.shape == ((2, n, n) if n < d else (2, d, d))  # which form ran
    for coefficients in [(25.0, 25.0, 1.0), (1.0, 2.0, 30.0)]:
        expected = loss_and_grads(vicreg_fn("reference", coefficients), x, y)
        assert_close(loss_and_grads(vicreg_fn("fused", coefficients), x, y), expected, rtol=1e-9)
        fused32 = loss_and_grads(vicreg_fn("fused", coefficients), x.float(), y.float())
        assert_close(fused32, expected, rtol=1e-4)


def test_vicreg_needs_two_samples():
    x, y = embeddings(1, 4)
    for impl in ("reference", "fused"):
        with pytest.raises(ValueError, match="at least 2 samples"):
            losses.vicreg_loss(x, y, impl=impl)


def test_gradcheck():
    z1, z2 = (z.requires_grad_() for z in embeddings(3, 5))
    assert torch.autograd.gradcheck(nt_xent_fn(0.3, "fused"), (z1, z2))
    for n, d in [(4, 3), (3, 6)]:  # covariance form, Gram form
        x, y = (z.requires_grad_() for z in embeddings(n, d, seed=2))
        assert torch.autograd.gradcheck(vicreg_fn("fused"), (x, y))


def test_double_backward_raises():
    for fn in (nt_xent_fn(0.1, "fused"), vicreg_fn("fused")):
        a, b = (z.requires_grad_() for z in embeddings(4, 3))
        (grad,) = torch.autograd.grad(fn(a, b), a, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            grad.sum().backward()


def test_opcheck():
    z1, z2 = (z.requires_grad_() for z in embeddings(5, 7))
    torch.library.opcheck(torch.ops.sempairs.nt_xent.default, (z1, z2, 0.2))
    loss, lse = torch.ops.sempairs.nt_xent(z1.detach(), z2.detach(), 0.2)
    torch.library.opcheck(torch.ops.sempairs.nt_xent_backward.default, (torch.ones_like(loss), z1.detach(), z2.detach(), lse, 0.2))
    for n, d in [(4, 6), (6, 4)]:
        x, y = (z.requires_grad_() for z in embeddings(n, d))
        torch.library.opcheck(torch.ops.sempairs.vicreg.default, (x, y, 25.0, 25.0, 1.0))
        loss, grams, variances = torch.ops.sempairs.vicreg(x.detach(), y.detach(), 25.0, 25.0, 1.0)
        args = (torch.ones_like(loss), x.detach(), y.detach(), grams, variances, 25.0, 25.0, 1.0)
        torch.library.opcheck(torch.ops.sempairs.vicreg_backward.default, args)


def test_torch_compile_traces_the_fused_ops():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 5, dtype=torch.float64)

    def step(a, b):
        za, zb = head(a), head(b)
        return losses.nt_xent(za, zb, 0.2, impl="fused") + losses.vicreg_loss(za, zb, impl="fused")

    a, b = embeddings(8, 6)
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        head.zero_grad()
        loss = fn(a, b)
        loss.backward()
        results.append([loss.detach(), head.weight.grad.clone()])
    assert_close(results[1], results[0], rtol=1e-12)


def test_impl_dispatch():
    a, b = embeddings(4, 3, dtype=torch.bfloat16)  # no CPU kernel for bfloat16
    assert not losses.fused_available("nt_xent", "cpu", torch.bfloat16)
    assert losses.fused_available("nt_xent", "cpu") and losses.fused_available("vicreg", "cpu", torch.float64)
    with pytest.raises(RuntimeError, match="no fused nt_xent kernel"):
        losses.nt_xent(a, b, impl="fused")
    assert torch.equal(losses.nt_xent(a, b, impl="auto"), losses.nt_xent_reference(a, b))
    with pytest.raises(ValueError, match="impl"):
        losses.vicreg_loss(a, b, impl="triton")


def cuda_toolkit_present():
    """What setup.py looks for: a CUDA build of torch and a toolkit, unless SEMPAIRS_CUDA=0."""
    toolkit = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    return torch.version.cuda is not None and toolkit and os.environ.get("SEMPAIRS_CUDA") != "0"


@pytest.mark.skipif(
    not cuda_toolkit_present() and importlib.util.find_spec("common._C_cuda") is None,
    reason="no CUDA toolkit, no CUDA build",
)
def test_cuda_build_registers_cuda_kernels():
    # Needs no GPU: a build that found a toolkit must have compiled and registered the CUDA kernels.
    assert losses._C_cuda is not None, "CUDA toolkit present but common._C_cuda was not built"
    for op in ("nt_xent", "nt_xent_backward", "vicreg", "vicreg_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sempairs::{op}", "CUDA"), op
    assert losses.fused_available("nt_xent", "cuda", torch.bfloat16)


@cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (3, 7), (130, 40), (700, 8), (1500, 128), (5, 300), (33, 1000)])
def test_nt_xent_cuda_matches_reference(n, d, dtype, rtol):
    z1, z2 = (z.to(dtype).double() for z in embeddings(n, d))  # the values the low-precision inputs hold
    for temperature in (0.1, 0.02):
        expected = loss_and_grads(nt_xent_fn(temperature, "reference"), z1, z2)
        fused = loss_and_grads(nt_xent_fn(temperature, "fused"), z1.to("cuda", dtype), z2.to("cuda", dtype))
        assert all(t.dtype == dtype for t in fused)
        assert_close(fused, expected, rtol, nt_xent_floors(z1, z2, temperature))


@cuda
def test_nt_xent_cuda_non_contiguous_deterministic_and_linear_memory():
    z1, z2 = embeddings(300, 64, dtype=torch.float32, device="cuda")
    expected = loss_and_grads(nt_xent_fn(0.1, "reference"), z1.double(), z2.double())
    strided = torch.stack([z1, z1], dim=2)[:, :, 1]
    runs = [loss_and_grads(nt_xent_fn(0.1, "fused"), strided, z2.T.contiguous().T) for _ in range(2)]
    assert_close(runs[0], expected, rtol=1e-4)
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    a, b = (z.requires_grad_() for z in embeddings(8192, 128, dtype=torch.float32, device="cuda"))
    similarity_matrix = (2 * 8192) ** 2 * 4
    assert peak_extra_memory(nt_xent_fn(0.1, "fused"), a, b) < similarity_matrix / 16


@cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n,d", [(2, 5), (64, 256), (256, 64)])
def test_vicreg_cuda_matches_reference(n, d, dtype, rtol):
    x, y = (z.to(dtype).double() for z in embeddings(n, d))
    expected = loss_and_grads(vicreg_fn("reference"), x, y)
    assert_close(loss_and_grads(vicreg_fn("fused"), x.to("cuda", dtype), y.to("cuda", dtype)), expected, rtol)


@cuda
def test_cuda_opcheck():
    z1, z2 = (z.requires_grad_() for z in embeddings(70, 20, dtype=torch.float32, device="cuda"))
    torch.library.opcheck(torch.ops.sempairs.nt_xent.default, (z1, z2, 0.1))
    x, y = (z.requires_grad_() for z in embeddings(16, 24, dtype=torch.bfloat16, device="cuda"))
    torch.library.opcheck(torch.ops.sempairs.vicreg.default, (x, y, 25.0, 25.0, 1.0))


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_losses_ignore_autocast(impl):
    """The scripts compute losses inside the model's autocast region: the losses keep fp32."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    plain = (losses.nt_xent(z1, z2, 0.1, impl=impl), losses.vicreg_loss(z1, z2, impl=impl))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (losses.nt_xent(z1, z2, 0.1, impl=impl), losses.vicreg_loss(z1, z2, impl=impl))
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32 and torch.equal(a, b)
