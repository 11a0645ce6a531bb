"""Fused NT-Xent and VICReg against eager and compiled PyTorch: fwd+bwd time and peak extra memory.

    python bench/losses.py [--device cpu|cuda] [--dtype float32] [--repeats N] [--only nt_xent|vicreg]

Cases: NT-Xent at M = 2N = 512, 4096, 8192 views (and 65536 on CUDA), D = 128, temperature 0.1;
VICReg at N = 256, D = 2048 and 8192. "eager" and "compile" are the reference definitions in
common/losses.py, the second under torch.compile; "fused" is the extension. Time: median of
`repeats` fwd+bwd calls after a warm-up call, the implementations taking turns (so that all see
the same load on a shared machine). Memory: peak bytes allocated during one fwd+bwd beyond what
was allocated before it, less the input gradients (CUDA: allocator statistics; CPU: the
profiler's allocation events, which see torch's allocations, not a BLAS library's own buffers).
Prints a markdown table.
"""
import argparse
import functools
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common.losses import nt_xent, nt_xent_reference, vicreg_loss, vicreg_reference


def fwd_bwd(fn, a, b):
    fn(a, b).backward()
    a.grad = b.grad = None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(impls, a, b, repeats, budget_s=120.0):
    """Median fwd+bwd seconds of each implementation, timed in turns so that all of them see the
    same load on a shared machine. An implementation that runs out of memory gets None."""
    times = {}
    for name, fn in impls.items():
        try:
            fwd_bwd(fn, a, b)  # warm-up: compilation, allocator caches
            times[name] = []
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    for turn in range(repeats):
        for name in times:
            synchronize(a.device)
            start = time.perf_counter()
            fwd_bwd(impls[name], a, b)
            synchronize(a.device)
            times[name].append(time.perf_counter() - start)
        if turn >= 2 and sum(map(sum, times.values())) > budget_s:
            break
    return {name: statistics.median(times[name]) if name in times else None for name in impls}


def peak_extra_memory(fn, a, b):
    """Peak bytes allocated while fn(a, b).backward() runs, beyond the memory held before it and
    the gradients of a and b."""
    gradients = 2 * a.numel() * a.element_size()
    if a.device.type == "cuda":
        synchronize(a.device)
        torch.cuda.reset_peak_memory_stats(a.device)
        before = torch.cuda.memory_allocated(a.device)
        fwd_bwd(fn, a, b)
        synchronize(a.device)
        return torch.cuda.max_memory_allocated(a.device) - before - gradients
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(fn, a, b)
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak - gradients


def cases(device, only):
    if only in (None, "nt_xent"):
        sizes = [512, 4096, 8192] + ([65536] if device.type == "cuda" else [])
        for m in sizes:
            yield "NT-Xent", (m // 2, 128), {
                "eager": functools.partial(nt_xent_reference, temperature=0.1),
                "compile": torch.compile(functools.partial(nt_xent_reference, temperature=0.1), dynamic=False),
                "fused": functools.partial(nt_xent, temperature=0.1, impl="fused"),
            }, f"M={m}, D=128"
    if only in (None, "vicreg"):
        for d in (2048, 8192):
            yield "VICReg", (256, d), {
                "eager": vicreg_reference,
                "compile": torch.compile(vicreg_reference, dynamic=False),
                "fused": functools.partial(vicreg_loss, impl="fused"),
            }, f"N=256, D={d}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 on CPU, 50 on CUDA")
    parser.add_argument("--only", choices=["nt_xent", "vicreg"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; {args.dtype}\n")
    print("| loss | size | impl | fwd+bwd (ms) | speed-up vs eager | peak extra memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for loss, shape, impls, size in cases(device, args.only):
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for _ in range(2))
        times = median_times(impls, a, b, repeats)
        for name, seconds in times.items():
            if seconds is None:
                print(f"| {loss} | {size} | {name} | out of memory | | |", flush=True)
                continue
            speedup = f"{times['eager'] / seconds:.1f}x" if times["eager"] else ""
            memory = peak_extra_memory(impls[name], a, b) / 2**20
            print(f"| {loss} | {size} | {name} | {seconds * 1e3:.1f} | {speedup} | {memory:.1f} |", flush=True)

if __name__ == "__main__":
    main()
