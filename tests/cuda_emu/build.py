"""Build llkern's CUDA kernels and CUDA bindings for the CPU, against tests/cuda_emu's runtime.

``load()`` compiles every ``csrc/cuda/*.cu`` and ``csrc/bindings/*_cuda.cpp``, unchanged apart from
kernel launches and ``__shared__`` declarations (rewritten below), into one extension whose ops are
``torch.ops.llkern_emu.<op>``: the same schemas (and fake kernels) as ``torch.ops.llkern``, taking CPU
tensors, and running the CUDA binding's code and the CUDA kernels (each CUDA thread a fiber, see
``include/cuda_runtime.h``). The C++ namespace ``llkern`` becomes ``llkern_emu`` so that nothing clashes
with ``llkern._C``. The build is cached in ``build/cuda_emu`` (ninja rebuilds what changed); the first
one takes about a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emu"

_library: torch.library.Library | None = None
SIMILARITY_BLOCK_ELEMENTS = 2048  # values of the N x N matrix per block (the GPU's: 2^23)
AUX_HEAD_CHUNK_ELEMENTS = 4096  # logits per chunk (the GPU's: 2^23)


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_!r} at offset {start}")


def rewrite_launches(source: str) -> str:
    """``kernel<<<config>>>(args)`` -> ``::cuda_emu::launch(kernel, ::cuda_emu::Config(config), args)``."""
    out, pos = [], 0
    while (at := source.find("<<<", pos)) >= 0:
        # The kernel: an identifier (with ::) and an optional template argument list just before <<<.
        end = at
        begin = end
        if source[end - 1] == ">":
            depth = 0
            for i in range(end - 1, -1, -1):
                depth += {">": 1, "<": -1}.get(source[i], 0)
                if depth == 0:
                    begin = i
                    break
        name = re.search(r"[A-Za-z_][\w:]*$", source[:begin])
        if name is None:
            raise ValueError(f"no kernel name before <<< at offset {at}")
        begin = name.start()
        close = source.find(">>>", at)
        config = source[at + 3 : close]
        paren = close + 3
        while source[paren].isspace():
            paren += 1
        if source[paren] != "(":
            raise ValueError(f"no argument list after >>> at offset {close}")
        args_end = _matching(source, paren, "(", ")")
        args = source[paren + 1 : args_end - 1].strip()
        kernel = source[begin:end]
        out.append(source[pos:begin])
        out.append(f"::cuda_emu::launch({kernel}, ::cuda_emu::Config({config})" + (f", {args})" if args else ")"))
        pos = args_end
    out.append(source[pos:])
    return "".join(out)


_SHARED = re.compile(
    r"__shared__\s+(?P<type>(?:(?:const|volatile|unsigned|signed|long|short)\s+)*[\w:]+(?:<[^;]*?>)?)"
    r"\s+(?P<name>\w+)(?P<dims>(?:\[[^\]]+\])*)\s*;")


def rewrite_shared(source: str) -> str:
    """``__shared__ T name[dims];`` -> ``auto& name = ::cuda_emu::shared_memory<T[dims], id>();``."""
    counter = iter(range(1, 1 << 30))
    return _SHARED.sub(lambda m: f"auto& {m['name']} = ::cuda_emu::shared_memory<{m['type']}{m['dims']}, "
                                 f"{next(counter)}>();", source)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _sources() -> list[str]:
    BUILD.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in [*sorted((ROOT / "csrc" / "cuda").glob("*.cu")), EMU / "selftest.cu"]:
        target = BUILD / f"{cu.stem}_kernels.cpp"
        _write_if_changed(target, f"// generated from {cu.relative_to(ROOT)} by tests/cuda_emu/build.py\n"
                          f"#line 1 \"{cu}\"\n" + rewrite_shared(rewrite_launches(cu.read_text())))
        sources.append(str(target))
    for binding in sorted((ROOT / "csrc" / "bindings").glob("*_cuda.cpp")):
        target = BUILD / f"{binding.stem}_binding.cpp"
        # The binding registers for the CUDA key of "llkern"; here the CPU key of "llkern_emu".
        _write_if_changed(target, "\n".join([
            f"// generated from {binding.relative_to(ROOT)} by tests/cuda_emu/build.py",
            "#include <torch/library.h>",
            "#undef TORCH_LIBRARY_IMPL",
            "#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(llkern_emu, CPU, m, C10_UID)",
            f'#include "{binding}"',
            "",
        ]))
        sources.append(str(target))
    return sources


def _define_schemas() -> torch.library.Library:
    """llkern_emu's schemas, llkern's renamed, and llkern's fake (meta) kernels registered for them, so that
    ``torch.library.opcheck`` can hold the CUDA bindings' outputs to what the fake kernels promise."""
    from torch._library.simple_registry import singleton

    import llkern  # noqa: F401  (loads llkern._C, whose registrations hold the schemas; llkern.ops the fakes)

    library = torch.library.Library("llkern_emu", "DEF")
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("llkern::"):
            name = str(schema).split("::", 1)[1]
            library.define(name)
            fake = singleton.find(schema.name).fake_impl.kernel
            if fake is not None:
                torch.library.register_fake(f"llkern_emu::{schema.name.split('::', 1)[1]}", fake.func, lib=library)
    return library


def _widened(a: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return a.to(out_dtype) if a.dtype != out_dtype else a


@contextlib.contextmanager
def cpu_out_dtype_products():
    """CPU kernels for ``mm``/``addmm`` with ``out_dtype``, while the context lasts.

    The CUDA bindings multiply 16-bit operands into float32 results (cuBLAS, float32 accumulation), an
    overload ATen has only for CUDA. Here the operands are widened to float32 first: the same exact
    products, summed in float32 in another order.
    """
    library = torch.library.Library("aten", "IMPL")

    def mm(a, b, out_dtype):
        return torch.mm(_widened(a, out_dtype), _widened(b, out_dtype))

    def mm_out(a, b, out_dtype, *, out):
        return torch.mm(_widened(a, out_dtype), _widened(b, out_dtype), out=out)

    def addmm(c, a, b, out_dtype, *, beta=1, alpha=1):
        return torch.addmm(_widened(c, out_dtype), _widened(a, out_dtype), _widened(b, out_dtype), beta=beta,
                           alpha=alpha)

    def addmm_out(c, a, b, out_dtype, *, beta=1, alpha=1, out):
        return torch.addmm(_widened(c, out_dtype), _widened(a, out_dtype), _widened(b, out_dtype), beta=beta,
                           alpha=alpha, out=out)

    for name, fn in [("mm.dtype", mm), ("mm.dtype_out", mm_out), ("addmm.dtype", addmm),
                     ("addmm.dtype_out", addmm_out)]:
        library.impl(name, fn, "CPU")
    try:
        yield
    finally:
        library._destroy()


def asan_preload() -> str:
    """What a process must preload (``LD_PRELOAD``) to load a sanitized build: the AddressSanitizer
    runtime, and the C++ runtime after it (whose exceptions the sanitizer must find when it starts)."""
    import subprocess

    def library(name: str) -> str:
        path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip()
        return os.path.realpath(path)

    return f"{library('libasan.so')} {library('libstdc++.so')}"


def load(verbose: bool = False, sanitize: bool | None = None) -> None:
    """Build if needed and load the emulated CUDA ops as ``torch.ops.llkern_emu``.

    sanitize: build with AddressSanitizer, so that a kernel reading or writing outside a tensor (every
    CPU tensor is a malloc'd block with red zones around it) stops the process with a report. The process
    must have been started with ``LD_PRELOAD=asan_preload()``. Default: the ``LLKERN_EMU_ASAN`` variable.
    """
    global _library
    if _library is not None:
        return
    from torch.utils import cpp_extension

    if sanitize is None:
        sanitize = os.environ.get("LLKERN_EMU_ASAN", "0") == "1"
    sources = _sources()
    # The extension's name changes with the emulator's headers, so a changed runtime is a full rebuild.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(EMU.rglob("*.h")))).hexdigest()[:8]
    # Blocks of the similarity matrix and chunks of the aux head's logits far smaller than the GPU's, so
    # that the tests' small sizes run several of them.
    flags = ["-O1", "-g0", "-ffp-contract=off", "-Dllkern=llkern_emu", "-Wno-unused-function",
             f"-DLLKERN_CUDA_SIMILARITY_BLOCK_ELEMENTS={SIMILARITY_BLOCK_ELEMENTS}",
             f"-DLLKERN_CUDA_AUX_HEAD_CHUNK_ELEMENTS={AUX_HEAD_CHUNK_ELEMENTS}"]
    sanitizer = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    build_directory = BUILD / "asan" if sanitize else BUILD
    build_directory.mkdir(parents=True, exist_ok=True)
    library = _define_schemas()
    try:
        cpp_extension.load(
            name=f"llkern_cuda_emu_{'asan_' if sanitize else ''}{digest}",
            sources=sources,
            extra_include_paths=[str(EMU / "include"), str(ROOT / "csrc" / "cuda")],
            extra_cflags=flags + sanitizer,
            extra_ldflags=sanitizer,
            build_directory=str(build_directory),
            is_python_module=False,
            verbose=verbose,
        )
    except BaseException:
        library._destroy()  # a later call defines the schemas again and retries the build
        raise
    _library = library
