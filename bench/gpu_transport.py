"""GPU benchmark of the transport penalty, forward + backward, side by side in one run.

Prints milliseconds (median of CUDA-event timings), achieved bandwidth and its ratio to this
GPU's measured copy bandwidth, and extra memory (peak allocated above inputs), for llkern,
eager PyTorch and torch.compile; appends every row to bench/results/results.jsonl.

Floor at N elements of r (fp32): the forward reads r (4N bytes); the backward reads r and
writes dr (8N): 12N bytes, 0.25 ms at N = 64M and 3.0 TB/s. Writing dr in the forward's
pass (``with_grad``) needs 8N: 0.18 ms, if the backward does no work.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result

import llkern
from llkern.reference.transport import transport_penalty_reference


def time_ms(fn, reps: int = 50, warmup: int = 5) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def extra_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_and_peak(step, reps: int = 10, warmup: int = 2) -> tuple[float, float, float]:
    """Median ms and IQR of ``step``, and the MiB one more step allocates above what was allocated before."""
    ms, iqr = time_ms(step, reps=reps, warmup=warmup)
    return ms, iqr, extra_mib(step)


def speedups(results: dict, ms: float) -> tuple[float, float]:
    """How many times faster than the "eager" and "torch.compile" rows of ``results`` (label -> (ms, ...))."""
    vs = [results[label][0] / ms if label in results else float("nan") for label in ("eager", "torch.compile")]
    return vs[0], vs[1]


def copy_bandwidth(n: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    ms, _ = time_ms(lambda: dst.copy_(src))
    return 8 * n / ms / 1e6


def bench_dtype(n: int, dtype: torch.dtype, copy_bw: float) -> list[dict]:
    y = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    size = y.element_size()
    compiled = torch.compile(transport_penalty_reference)

    def step(fn):
        def run():
            fn(y).backward()
            y.grad = None
        return run

    variants = {  # label: (callable, bytes it must move at least)
        "llkern": (step(lambda t: llkern.transport_penalty(t, impl="kernel")), 3 * size * n),
        "llkern fwd only (no grad)": (lambda: llkern.transport_penalty(y.detach(), impl="kernel"), size * n),
        "llkern fwd writing dr (op)": (
            lambda: torch.ops.llkern.transport_penalty(y.detach(), None, 1.0, "mean", True), 2 * size * n),
        "eager": (step(transport_penalty_reference), None),
        "torch.compile": (step(compiled), None),
    }
    rows = []
    for label, (fn, nbytes) in variants.items():
        ms, iqr = time_ms(fn)
        rows.append({"op": "transport_penalty fwd+bwd", "shape": [n], "dtype": str(dtype).removeprefix("torch."),
                     "impl": label, "median_ms": ms, "iqr_ms": iqr, "extra_MiB": extra_mib(fn),
                     "GB_per_s": nbytes / ms / 1e6 if nbytes else None, "copy_GB_per_s": copy_bw})
    by_label = {r["impl"]: r["median_ms"] for r in rows}
    for row in rows:
        row["vs_eager"] = by_label["eager"] / row["median_ms"]
        row["vs_compile"] = by_label["torch.compile"] / row["median_ms"]
        append_result(row)
    return rows


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    n = 64 * 2**20
    copy_bw = copy_bandwidth(n)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw:.0f} GB/s (read + written)")
    rows = bench_dtype(n, torch.float32, copy_bw) + bench_dtype(n, torch.bfloat16, copy_bw)
    print("\n| dtype | impl | ms | IQR | GB/s | % of copy BW | extra MiB | speed-up vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bw = f"{r['GB_per_s']:.0f}" if r["GB_per_s"] else "-"
        pct = f"{100 * r['GB_per_s'] / copy_bw:.0f}%" if r["GB_per_s"] else "-"
        print(f"| {r['dtype']} | {r['impl']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {bw} | {pct} | "
              f"{r['extra_MiB']:.0f} | {r['vs_eager']:.2f}x | {r['vs_compile']:.2f}x |")
    floor = 12 * n / copy_bw / 1e6
    print(f"\nfp32 floor (read r; read r + write dr) at the measured copy bandwidth: {floor:.3f} ms; "
          "target <= 0.25 ms")


if __name__ == "__main__":
    main()
