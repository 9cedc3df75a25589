"""GPU benchmark of the activation-freeing ops: relu_with_mask / relu_mask_backward and batch_norm_relu /
batch_norm_relu_backward, each pass against the GPU's copy bandwidth (target >= 85 %) and beside
PyTorch's own kernels (eager) and torch.compile, side by side in one run.

Bytes each pass must move (N elements of s bytes): relu_with_mask reads x, writes y and the mask
(2sN + N/8); relu_mask_backward reads the gradient and the mask, writes grad_x (2sN + N/8);
batch_norm_relu reads x, writes y (2sN; the statistics are PyTorch's and timed apart);
batch_norm_relu_backward (training) reads x and the gradient twice and writes grad_x (5sN).

    python bench/gpu_activation.py [--dry-run]   # --dry-run: tiny shapes on the CPU, nothing written
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

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

from llkern.ops.relu_mask import relu_with_mask


def copy_bandwidth(n: int) -> float:
    src, dst = torch.randn(n, device=bench_device()), torch.empty(n, device=bench_device())
    ms, _ = time_ms(lambda: dst.copy_(src))
    return 8 * n / ms / 1e6


def rows_for(shape: list[int], dtype: torch.dtype, copy_bw: float) -> list[dict]:
    dev = bench_device()
    x = torch.randn(shape, device=dev, dtype=dtype)
    grad = torch.randn(shape, device=dev, dtype=dtype)
    n, s = x.numel(), x.element_size()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    channels = shape[1]
    weight = torch.rand(channels, device=dev, dtype=compute) + 0.5
    bias = torch.randn(channels, device=dev, dtype=compute) * 0.1
    mean, var = torch.batch_norm_update_stats(x, torch.zeros_like(weight), torch.ones_like(weight), 0.0)
    invstd = torch.rsqrt(var + 1e-5)
    y, mask = torch.ops.llkern.relu_with_mask(x)
    y_bn = torch.relu(F.batch_norm(x, None, None, weight.to(dtype), bias.to(dtype), True, 0.0, 1e-5))
    xg = x.clone().requires_grad_()

    def fwd_bwd(fn):
        def run():
            fn(xg).backward(grad)
            xg.grad = None
        return run

    def bn_relu_eager(t):
        return torch.relu(F.batch_norm(t, None, None, weight.to(dtype), bias.to(dtype), True, 0.0, 1e-5))

    variants = [  # (group, impl, callable, bytes it must move at least)
        ("relu fwd", "llkern relu_with_mask", lambda: torch.ops.llkern.relu_with_mask(x), 2 * s * n + n // 8),
        ("relu fwd", "eager F.relu", lambda: F.relu(x), 2 * s * n),
        ("relu bwd", "llkern relu_mask_backward", lambda: torch.ops.llkern.relu_mask_backward(grad, mask, x.stride()),
         2 * s * n + n // 8),
        ("relu bwd", "eager threshold_backward (reads y)", lambda: torch.ops.aten.threshold_backward(grad, y, 0),
         3 * s * n),
        ("relu fwd+bwd", "llkern", fwd_bwd(lambda t: relu_with_mask(t, impl="kernel")[0]), 4 * s * n + n // 4),
        ("relu fwd+bwd", "eager", fwd_bwd(F.relu), 5 * s * n),
        ("relu fwd+bwd", "torch.compile", fwd_bwd(torch.compile(F.relu)), None),
        ("bn+relu fwd (stats given)", "llkern batch_norm_relu",
         lambda: torch.ops.llkern.batch_norm_relu(x, weight, bias, mean, invstd, True), 2 * s * n),
        ("bn+relu bwd (stats given)", "llkern batch_norm_relu_backward",
         lambda: torch.ops.llkern.batch_norm_relu_backward(grad, x, weight, bias, mean, invstd, True, True), 5 * s * n),
        ("bn+relu bwd (stats given)", "eager threshold_backward + native_batch_norm_backward",
         lambda: torch.ops.aten.native_batch_norm_backward(
             torch.ops.aten.threshold_backward(grad, y_bn, 0), x, weight, None, None, mean, invstd, True,
             1e-5, [True, True, True]), None),
        ("bn+relu fwd+bwd", "eager", fwd_bwd(bn_relu_eager), None),
        ("bn+relu fwd+bwd", "torch.compile", fwd_bwd(torch.compile(bn_relu_eager)), None),
    ]
    rows = []
    for group, impl, fn, nbytes in variants:
        try:
            ms, iqr = time_ms(fn)
        except Exception as error:  # one variant (torch.compile, say) failing costs its row, not the run's
            print(f"{group}, {impl} failed on {dtype}: {first_line(error)}")
            xg.grad = None
            empty_cache()
            continue
        row = {"op": f"activation {group}", "shape": shape, "dtype": str(dtype).removeprefix("torch."), "impl": impl,
               "median_ms": ms, "iqr_ms": iqr, "extra_MiB": extra_mib(fn),
               "GB_per_s": nbytes / ms / 1e6 if nbytes else None, "copy_GB_per_s": copy_bw}
        rows.append(row)
        append_result(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dry_run_argument(parser)
    set_dry_run(parser.parse_args().dry_run)
    require_device()
    shape = [3, 5, 7, 11] if dry_run() else [64, 256, 32, 32]
    copy_bw = copy_bandwidth(64 * 2**20 if not dry_run() else 333)
    print(f"{device_name()}: copy bandwidth {copy_bw:.0f} GB/s (read + written)")
    rows = rows_for(shape, torch.float32, copy_bw) + rows_for(shape, torch.bfloat16, copy_bw)
    print("\n| dtype | pass | impl | ms | IQR | GB/s | % of copy BW | extra MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bw = f"{r['GB_per_s']:.0f}" if r["GB_per_s"] else "-"
        pct = f"{100 * r['GB_per_s'] / copy_bw:.0f}%" if r["GB_per_s"] else "-"
        print(f"| {r['dtype']} | {r['op'].removeprefix('activation ')} | {r['impl']} | {r['median_ms']:.3f} | "
              f"{r['iqr_ms']:.3f} | {bw} | {pct} | {r['extra_MiB']:.0f} |")
    print("\ntarget: every llkern row >= 85 % of copy bandwidth")


if __name__ == "__main__":
    main()
