"""NT-Xent (SimCLR) and VICReg losses.

Each loss has a reference definition in plain PyTorch, which is the documentation of its maths,
and a fused version from the C++/CUDA extension (csrc/) with the same value and gradients in less
time and memory. `impl` chooses: "reference"; "fused" (an error where the extension has no kernel
for the tensor's device and dtype); "auto" (fused where it has one, else reference).
Both work on embeddings gathered across processes: pass the gathered tensors.
"""
import importlib

import torch
import torch.nn.functional as F


def nt_xent_reference(z1, z2, temperature=0.1):
    """NT-Xent over the 2N views (z1's rows, then z2's): each view's positive is its partner, the
    other 2N - 2 views are its negatives; cosine similarities / temperature, mean over anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    m = logits.shape[0]
    not_self = torch.eye(m, dtype=torch.bool, device=z.device)
    partner = torch.arange(m, device=z.device).roll(m // 2)  # (i + N) mod 2N
    return F.cross_entropy(logits.masked_fill(not_self, float("-inf")), partner)


def vicreg_reference(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg (Bardes et al.): invariance (MSE between the views), variance (hinge on each
    dimension's std, eps 1e-4) and covariance (squared off-diagonal covariances / D) terms."""
    n, d = x.shape
    _check_two_samples(n)

    def variance_and_covariance(z):
        z = z - z.mean(dim=0)
        cov = z.T @ z / (n - 1)
        std = torch.sqrt(cov.diagonal() + 1e-4)
        off_diagonal = cov.masked_fill(torch.eye(d, dtype=torch.bool, device=z.device), 0)
        return F.relu(1 - std).mean(), off_diagonal.pow(2).sum() / d

    std_x, cov_x = variance_and_covariance(x)
    std_y, cov_y = variance_and_covariance(y)
    return sim_coeff * F.mse_loss(x, y) + std_coeff * (std_x + std_y) / 2 + cov_coeff * (cov_x + cov_y)


def _check_two_samples(n):
    if n < 2:  # the official definition would divide by zero
        raise ValueError(f"vicreg_loss needs at least 2 samples per view, got {n} (the variance "
                         "and covariance divide by N - 1)")


def _load(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return None  # not built


# common._C defines torch.ops.sempairs with its CPU kernels (and VICReg's for CUDA, which is
# plain ATen code); common._C_cuda, built when a CUDA toolkit was found, adds NT-Xent's.
_C = _load("common._C")
_C_cuda = _load("common._C_cuda") if _C is not None else None
FUSED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
_FUSED = {
    (op, device)
    for op in ("nt_xent", "vicreg")
    for device in FUSED_DTYPES
    if _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"sempairs::{op}", device.upper())
}


def fused_available(op, device, dtype=torch.float32):
    """Whether the extension has a kernel for `op` ("nt_xent" or "vicreg") on `device`, `dtype`."""
    device = torch.device(device).type
    return (op, device) in _FUSED and dtype in FUSED_DTYPES[device]


def _use_fused(op, tensor, impl):
    if impl not in ("auto", "fused", "reference"):
        raise ValueError(f"impl must be 'auto', 'fused' or 'reference', got {impl!r}")
    available = fused_available(op, tensor.device, tensor.dtype)
    if impl == "fused" and not available:
        raise RuntimeError(
            f"no fused {op} kernel for {tensor.dtype} on {tensor.device.type}: build the extension "
            "(pip install --no-build-isolation -e .; CUDA needs a toolkit) or use impl='reference'"
        )
    return impl != "reference" and available


def nt_xent(z1, z2, temperature=0.1, impl="auto"):
    """NT-Xent (scalar) of two (N, D) batches of embeddings; see nt_xent_reference. Runs in the
    inputs' precision even under autocast (which would put the similarities in bf16)."""
    with torch.autocast(z1.device.type, enabled=False):
        if _use_fused("nt_xent", z1, impl):
            return torch.ops.sempairs.nt_xent(z1, z2, temperature)[0]
        return nt_xent_reference(z1, z2, temperature)


def vicreg_loss(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, impl="auto"):
    """VICReg loss (scalar) of two (N, D) batches of embeddings, N >= 2; see vicreg_reference.
    Runs in the inputs' precision even under autocast."""
    # Checked here too, not only by the extension: a C++ exception thrown from an extension built
    # with another compiler than torch's crashed the process on a GPU machine instead of raising.
    _check_two_samples(x.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        if _use_fused("vicreg", x, impl):
            return torch.ops.sempairs.vicreg(x, y, sim_coeff, std_coeff, cov_coeff)[0]
        return vicreg_reference(x, y, sim_coeff, std_coeff, cov_coeff)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("the fused sempairs losses have first derivatives only (no double backward)")


if _C is not None:
    # Shapes and dtypes of the outputs, so torch.compile can trace through the operators.
    @torch.library.register_fake("sempairs::nt_xent")
    def _(z1, z2, temperature):
        lse_dtype = torch.float64 if z1.dtype == torch.float64 else torch.float32
        return z1.new_empty(()), z1.new_empty(2 * z1.shape[0], dtype=lse_dtype)

    @torch.library.register_fake("sempairs::nt_xent_backward")
    def _(grad, z1, z2, lse, temperature):
        return z1.new_empty(z1.shape), z2.new_empty(z2.shape)

    @torch.library.register_fake("sempairs::vicreg")
    def _(x, y, sim_coeff, std_coeff, cov_coeff):
        n, d = x.shape
        g = n if n < d else d  # Gram form when N < D, covariance form otherwise
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty(()), x.new_empty(2, g, g, dtype=acc), x.new_empty(2, d, dtype=acc)

    @torch.library.register_fake("sempairs::vicreg_backward")
    def _(grad, x, y, grams, variances, sim_coeff, std_coeff, cov_coeff):
        return x.new_empty(x.shape), y.new_empty(y.shape)

    def _save_inputs_and_extras(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2], *output[1:])
        ctx.coefficients = inputs[2:]

    def _nt_xent_backward(ctx, grad, _grad_lse):
        z1, z2, lse = ctx.saved_tensors
        return *torch.ops.sempairs.nt_xent_backward(grad, z1, z2, lse, *ctx.coefficients), None

    def _vicreg_backward(ctx, grad, _grad_grams, _grad_variances):
        dx, dy = torch.ops.sempairs.vicreg_backward(grad, *ctx.saved_tensors, *ctx.coefficients)
        return dx, dy, None, None, None

    torch.library.register_autograd("sempairs::nt_xent", _nt_xent_backward, setup_context=_save_inputs_and_extras)
    torch.library.register_autograd("sempairs::vicreg", _vicreg_backward, setup_context=_save_inputs_and_extras)
    torch.library.register_autograd("sempairs::nt_xent_backward", _no_double_backward)
    torch.library.register_autograd("sempairs::vicreg_backward", _no_double_backward)
