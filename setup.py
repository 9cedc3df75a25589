"""Build llkern and its compiled extension llkern._C.

C++ CPU kernels are always built. CUDA kernels are built when LLKERN_CUDA=1,
or by default when torch is a CUDA build and nvcc is found (never decided by
torch.cuda.is_available(), which is false on build machines without a GPU).

Environment:
  LLKERN_CUDA        1: build CUDA kernels (error if impossible); 0: skip them; unset: auto.
  LLKERN_CUDA_ARCHS  CUDA targets, default "80;90a".
  LLKERN_STRICT      1: a failed C++ build fails the install (default: warn and install
                     the pure-PyTorch package, whose ops then fall back to their references).
  MAX_JOBS           parallel compile jobs (torch's ninja builder).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
PACKAGES = ["llkern", "llkern.cli", "llkern.compress", "llkern.data", "llkern.local", "llkern.moda", "llkern.models",
            "llkern.nn", "llkern.ops", "llkern.recipes", "llkern.reference", "llkern.triton_kernels"]
PACKAGE_DIR = {"llkern.triton_kernels": "triton_kernels", "llkern.recipes": "recipes"}
PACKAGE_DATA = {"llkern.recipes": ["*.json"]}


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _nvcc_home(cuda_home: str | None) -> str | None:
    """torch's CUDA_HOME (from $CUDA_HOME, `which nvcc` or /usr/local/cuda) if it holds an nvcc."""
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return cuda_home
    return None


def _want_cuda(torch_cuda: str | None, cuda_home: str | None, flag: str | None = None) -> bool:
    """Build CUDA kernels? LLKERN_CUDA=1 forces (error if impossible), 0 skips, unset decides by
    whether torch is a CUDA build and nvcc is found. Never by torch.cuda.is_available()."""
    flag = (os.environ.get("LLKERN_CUDA", "") if flag is None else flag).strip()
    if flag == "0":
        return False
    if flag == "1":
        if torch_cuda is None:
            sys.exit("LLKERN_CUDA=1 but the installed torch is a CPU build: install a CUDA build of torch.")
        if cuda_home is None:
            sys.exit("LLKERN_CUDA=1 but nvcc was not found: set CUDA_HOME or put nvcc on PATH.")
        return True
    if flag:
        sys.exit(f"LLKERN_CUDA must be 0 or 1, got {flag!r}")
    return torch_cuda is not None and cuda_home is not None


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
    if not flags:
        sys.exit(f"LLKERN_CUDA_ARCHS lists no architecture: {archs!r}")
    return flags


def _extension_kwargs() -> dict:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("llkern: torch is not importable at build time; installing without llkern._C "
              "(use `pip install --no-build-isolation .` with torch installed).", file=sys.stderr)
        return {}

    # No -std: torch adds the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    sources = ["csrc/ops.cpp", *_sources("csrc/cpu/*.cpp"), *_sources("csrc/bindings/*_cpu.cpp"),
               *_sources("csrc/bindings/*_autograd.cpp")]
    use_cuda = _want_cuda(torch.version.cuda, _nvcc_home(cpp_extension.CUDA_HOME))
    if use_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/bindings/*_cuda.cpp")
        nvcc_flags = ["-O3", "-lineinfo",
                      *_gencode_flags(os.environ.get("LLKERN_CUDA_ARCHS", "80;90a"))]
        ext = cpp_extension.CUDAExtension(
            "llkern._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"], py_limited_api=False)
    else:
        ext = cpp_extension.CppExtension(
            "llkern._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    print(f"llkern: building llkern._C with {'CPU+CUDA' if use_cuda else 'CPU'} kernels", file=sys.stderr)

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder, but a failed build leaves a working pure-PyTorch install unless LLKERN_STRICT=1."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:
                if os.environ.get("LLKERN_STRICT", "0") == "1":
                    raise
                print(f"llkern: WARNING: building llkern._C failed ({error}); installing without "
                      "compiled kernels. Ops fall back to their PyTorch references.", file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, **_extension_kwargs())
