"""GPU benchmark of the transport penalty, forward + backward, side by side in one run.

Prints milliseconds (median of CUDA-event timings), achieved bandwidth and its ratio to this
GPU's measured copy bandwidth, and extra memory (peak allocated above inputs), for llkern,
eager PyTorch and torch.compile; appends every row to bench/results/results.jsonl.

Floor at N elements of r (fp32): the forward reads r (4N bytes); the backward reads r and
writes dr (8N): 12N bytes, 0.25 ms at N = 64M and 3.0 TB/s. Writing dr in the forward's
pass (``with_grad``) needs 8N: 0.18 ms, if the backward does no work.

    python bench/gpu_transport.py [--dry-run]   # --dry-run: N = 333 on the CPU, nothing written
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_dry_run_argument,
    append_result,
    bench_device,
    device_name,
    dry_run,
    empty_cache,
    extra_mib,
    first_line,
    require_device,
    set_dry_run,
    time_ms,
)

import llkern
from llkern.reference.transport import transport_penalty_reference


def copy_bandwidth(n: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    src, dst = torch.randn(n, device=bench_device()), torch.empty(n, device=bench_device())
    ms, _ = time_ms(lambda: dst.copy_(src))
    return 8 * n / ms / 1e6


def bench_dtype(n: int, dtype: torch.dtype, copy_bw: float) -> list[dict]:
    y = torch.randn(n, device=bench_device(), dtype=dtype, requires_grad=True)
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
        try:
            ms, iqr = time_ms(fn)
        except Exception as error:  # one variant (torch.compile, say) failing costs its row, not the run's
            print(f"{label} failed on {dtype}: {first_line(error)}")
            y.grad = None
            empty_cache()
            continue
        rows.append({"op": "transport_penalty fwd+bwd", "shape": [n], "dtype": str(dtype).removeprefix("torch."),
                     "impl": label, "median_ms": ms, "iqr_ms": iqr, "extra_MiB": extra_mib(fn),
                     "GB_per_s": nbytes / ms / 1e6 if nbytes else None, "copy_GB_per_s": copy_bw})
    by_label = {r["impl"]: r["median_ms"] for r in rows}
    for row in rows:
        row["vs_eager"] = by_label.get("eager", float("nan")) / row["median_ms"]
        row["vs_compile"] = by_label.get("torch.compile", float("nan")) / row["median_ms"]
        append_result(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dry_run_argument(parser)
    set_dry_run(parser.parse_args().dry_run)
    require_device()
    n = 333 if dry_run() else 64 * 2**20
    copy_bw = copy_bandwidth(n)
    print(f"{device_name()}: copy bandwidth {copy_bw:.0f} GB/s (read + written)")
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
