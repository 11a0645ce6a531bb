"""Installs the `common` and `eval` packages and builds the fused-loss extension.

The CPU extension (common._C) is always built. The CUDA one (common._C_cuda) is built
whenever a CUDA toolkit and a CUDA build of torch are present, with or without a GPU.
Force either way with SEMPAIRS_CUDA=1 / SEMPAIRS_CUDA=0.
Build with `pip install --no-build-isolation -e .` so the installed torch is used.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def find_cuda_home():
    """The toolkit folder (bin/nvcc, include/cuda_runtime.h), or None.

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when that nvcc is a
    wrapper script living outside the toolkit, so look for the headers as well.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")):
            return path
    return None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    forced = os.environ.get("SEMPAIRS_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and cuda_home is not None


def vector_flags():
    """AVX2 and FMA where the building x86 CPU has them (the CPU kernels' exp2 then runs 8 lanes wide).
    The extension is built on the machine that runs it, as `pip install -e .` does."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def extensions():
    cxx = ["-O3", "-fopenmp"] + vector_flags()
    exts = [
        CppExtension(
            "common._C",
            sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch cannot detect an architecture without a GPU; default to Hopper (H100/H200).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        exts.append(
            CUDAExtension(
                "common._C_cuda",
                sources=sorted(glob.glob("csrc/cuda/*.cu")),
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    return exts


setup(
    name="semantic-pairs",
    version="0.1.0",
    description="Semantic vs augmented positive pairs in self-supervised learning: a controlled study",
    packages=find_packages(include=["common", "common.*", "eval", "eval.*"]),
    package_data={"common": ["resources/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "timm>=1.0",
        "submitit>=1.5",
        "matplotlib>=3.7",
        "scipy>=1.9",
    ],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
