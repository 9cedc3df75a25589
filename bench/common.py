"""Shared by the benchmarks: the results file, the machine description, and the GPU benchmarks' timing and
memory helpers with their ``--dry-run`` mode (tiny shapes on the CPU, nothing written)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "results.jsonl"
_dry_run = False


def machine() -> dict:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "host": os.uname().nodename}


def append_result(row: dict, path: Path = RESULTS) -> None:
    """Append one measurement (op, shape, dtype, impl, median_ms, iqr_ms, ...) with the machine's facts.
    Under ``--dry-run`` nothing is written."""
    if _dry_run:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({**machine(), **row}) + "\n")


def peak_rss_extra_mib(setup: str, step: str, repeats: int = 5) -> float:
    """Peak resident memory (MiB) that ``step`` adds over what ``setup`` left, in a fresh process.

    Linux's peak-RSS counter (VmHWM) is reset after ``setup`` (writing 5 to
    /proc/self/clear_refs), so the figure counts every allocation of the step (PyTorch's,
    llkern's buffer cache, BLAS workspaces), not just tensors.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch, torch.nn.functional as F, llkern

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1])  # kB

        {setup}
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        base = status("VmRSS:")
        for _ in range({repeats}):
            {step}
        print((status("VmHWM:") - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# --- the GPU benchmarks (bench/gpu_*.py) and their --dry-run -------------------------------------------
# Without --dry-run these are the CUDA measurements (CUDA events, the caching allocator's peak). With it
# a script runs its whole code path at tiny shapes on the CPU (Triton kernels in the interpreter), times
# with time.perf_counter, reports zero memory and appends no result: a check before spending GPU time.


def add_dry_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU (Triton interpreted), 2 timing repetitions, no results "
                             "written: checks the script's code path before a GPU run")


def set_dry_run(enabled: bool) -> None:
    """Turn the dry run on for this process (before any tensor is made). llkern's Triton kernels run on CPU
    tensors only in Triton's interpreter, which TRITON_INTERPRET=1 must turn on before torch is imported
    (torch imports triton, whose own jitted helpers are then fixed): without it, the script restarts itself
    with it."""
    global _dry_run
    _dry_run = bool(enabled)
    if _dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("dry run: restarting with TRITON_INTERPRET=1", flush=True)
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
        print("dry run: tiny shapes on the CPU; nothing is written to bench/results/", flush=True)
        _gpu_fusion_limits()


def _gpu_fusion_limits() -> None:
    """Let torch.compile on the CPU realize intermediate buffers where it would on a GPU. Inductor inlines a
    chain of pointwise ops into its users up to an op count that is larger on the CPU (50, against 30 on a
    GPU in torch 2.13): gpu_mean_kl.py's 12 unrolled Newton steps, each reading the last iterate three
    times, then take minutes to compile on the CPU (exponential in the steps), seconds with the GPU's limits."""
    try:
        import torch._inductor.config as inductor
    except ImportError:
        return
    for name in ("realize_opcount_threshold", "realize_acc_reads_threshold"):
        default = getattr(inductor, f"_{name}_default", None)
        if getattr(inductor, name, 0) is None and default is not None:
            setattr(inductor, name, default)


def dry_run() -> bool:
    return _dry_run


def bench_device() -> str:
    """Where the benchmark's tensors go: "cuda", or "cpu" in a dry run."""
    return "cpu" if _dry_run else "cuda"


def require_device() -> None:
    """Stop unless the benchmark's device is there (a dry run needs none)."""
    if not _dry_run:
        assert torch.cuda.is_available(), "needs a CUDA device"


def device_name() -> str:
    if _dry_run:
        return f"CPU {platform.processor() or platform.machine()} (dry run)"
    return torch.cuda.get_device_name()


def synchronize() -> None:
    if not _dry_run:
        torch.cuda.synchronize()


def empty_cache() -> None:
    if not _dry_run:
        torch.cuda.empty_cache()


def time_ms(fn, reps: int = 50, warmup: int = 5) -> tuple[float, float]:
    """Median and interquartile range of ``fn``'s time in ms: CUDA events, or time.perf_counter (at most
    2 repetitions after 1 warm-up) in a dry run."""
    if _dry_run:
        reps, warmup = min(reps, 2), min(warmup, 1)
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(reps):
        if _dry_run:
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def extra_mib(fn) -> float:
    """MiB that one call of ``fn`` allocates at its peak above what was allocated before (0 in a dry run,
    where ``fn`` still runs once)."""
    if _dry_run:
        fn()
        return 0.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(n: int = 1 << 28) -> float:
    """GB/s of a device-to-device copy of ``n`` float32 values, counting bytes read and written: the
    ceiling that memory-bound floors divide by, measured in the same run (333 values in a dry run)."""
    n = min(n, 333) if _dry_run else n
    src, dst = torch.randn(n, device=bench_device()), torch.empty(n, device=bench_device())
    ms, _ = time_ms(lambda: dst.copy_(src))
    return 8 * n / ms / 1e6


def gemm_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """TFLOP/s of an n×n×n product in ``dtype`` (PyTorch's matmul settings as they are: float32 without
    TF32 by default): the ceiling that compute-bound floors divide by, measured in the same run."""
    n = min(n, 64) if _dry_run else n
    a, b = (torch.randn(n, n, device=bench_device()).to(dtype) for _ in range(2))
    ms, _ = time_ms(lambda: a @ b, reps=20, warmup=3)
    return 2 * n**3 / ms / 1e9


def cuda_graphed(step):
    """``step`` captured once in a CUDA graph; the returned function replays it: the same kernels without
    Python, autograd or launch costs, for shapes whose kernels take less time than launching them. The
    step must not synchronise with the host (capture fails if it does). In a dry run: ``step`` itself."""
    if _dry_run:
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, autograd's first run
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_and_peak(step, reps: int = 10, warmup: int = 2) -> tuple[float, float, float]:
    """Median ms and IQR of ``step``, and the MiB one more step allocates above what was allocated before."""
    ms, iqr = time_ms(step, reps=reps, warmup=warmup)
    return ms, iqr, extra_mib(step)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def speedups(results: dict, ms: float) -> tuple[float, float]:
    """How many times faster than the "eager" and "torch.compile" rows of ``results`` (label -> (ms, ...))."""
    vs = [results[label][0] / ms if label in results else float("nan") for label in ("eager", "torch.compile")]
    return vs[0], vs[1]


@contextlib.contextmanager
def pytorch_activation_ops(enabled: bool = True):
    """Inside, llkern.nn.activation_memory runs its options in PyTorch ops instead of the compiled
    relu_with_mask / batch_norm_relu ops (the code before those ops existed, and what a build without
    llkern._C runs): the "before" of a before/after comparison. The choice is made at each call."""
    import llkern.nn.activation_memory as activation_memory

    previous = activation_memory.kernel_available
    if enabled:
        activation_memory.kernel_available = lambda op, device_type: False
    try:
        yield
    finally:
        activation_memory.kernel_available = previous


def median_ms(fn, repeats: int = 15, warmup: int = 3) -> tuple[float, float, float]:
    """(median, min, max) wall time of ``fn()`` in milliseconds on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), min(times), max(times)
