"""GPU benchmark of the similarity-matrix losses, forward + backward, side by side in one run.

Shapes (issue 4): N ∈ {4096, 16384, 32768}, d ∈ {128, 256}, bf16 and fp32; the symmetric InfoNCE
(CLIP's loss, the one Inf-CL computes). Against eager PyTorch (the loss over the whole N×N
matrix), torch.compile, and Inf-CL when importable (PyPI ``inf-cl``; carry the wheel: the GPU
machine has no network). Prints median milliseconds and peak extra memory (allocated above the
inputs and their gradients); appends rows to bench/results/results.jsonl.

Floor (H100, ~800 TFLOP/s bf16 dense on tensor cores): symmetric InfoNCE at N = 32768, d = 128
needs four N×N×d products, 4 × 2·N²·d = 1.1 TFLOP → 1.4 ms; at fp32 (no TF32) ~60 TFLOP/s → 18 ms.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result
from gpu_transport import speedups, time_and_peak

import llkern

TAU = 0.07
SHAPES = [(n, d, dtype) for n in (4096, 16384, 32768) for d in (128, 256) for dtype in (torch.bfloat16, torch.float32)]


def eager(a, b):
    s = (F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T) / TAU
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))


def variants():
    out = {"llkern": lambda a, b: llkern.functional.info_nce(a, b, TAU, symmetric=True, impl="kernel"),
           "eager": eager, "torch.compile": torch.compile(eager)}
    try:
        from inf_cl import cal_inf_loss

        def inf_cl(a, b):
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            labels = torch.arange(a.shape[0], device=a.device)
            return 0.5 * (cal_inf_loss(a, b, labels, scale=1 / TAU).mean()
                          + cal_inf_loss(b, a, labels, scale=1 / TAU).mean())
        out["Inf-CL"] = inf_cl
    except ImportError:
        print("inf-cl not importable: skipped")
    return out


def bench_shape(n: int, d: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    a = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    inputs_mib = 2 * a.numel() * a.element_size() / 2**20
    results = {}
    for label, fn in variants().items():
        def step(fn=fn):
            fn(a, b).backward()
            a.grad = b.grad = None
        try:
            ms, iqr, extra = time_and_peak(step)
            extra -= inputs_mib  # (the gradients of the inputs: any implementation holds them)
        except Exception as error:  # out of memory at the large shapes, or a peer that cannot run
            print(f"{label} failed at N={n}, d={d}, {dtype}: {str(error).splitlines()[0]}")
            torch.cuda.empty_cache()
            continue
        results[label] = (ms, iqr, extra)
    for label, (ms, iqr, extra) in results.items():
        vs_eager, vs_compile = speedups(results, ms)
        append_result({"op": "info_nce symmetric fwd+bwd", "shape": [n, d], "dtype": str(dtype).removeprefix("torch."),
                       "impl": label, "median_ms": ms, "iqr_ms": iqr, "extra_MiB": extra, "vs_eager": vs_eager,
                       "vs_compile": vs_compile})
        print(f"| {n}×{d} | {str(dtype).removeprefix('torch.')} | {label} | {ms:.3f} | {extra:.0f} | "
              f"{vs_eager:.2f}x | {vs_compile:.2f}x |")


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    print("| N×d | dtype | impl | ms | extra MiB | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|")
    for n, d, dtype in SHAPES:
        bench_shape(n, d, dtype)


if __name__ == "__main__":
    main()
