"""GPU benchmark of the fused auxiliary head, forward + backward, side by side in one run.

Shapes (issue 3): 1024×64×8×8 → 10 fp32, 256×2048×7×7 → 1000 bf16, and 16384 tokens × 2048 → 32000
bf16. Against eager PyTorch, torch.compile, ``F.linear_cross_entropy`` (when torch has it), and
Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy when importable (the GPU
machine has no network: `make gpu-wheels` here, then carry .whl). Prints median milliseconds and peak
extra memory (allocated above the inputs and their gradients); appends rows to bench/results/results.jsonl.

The first shape is launch-bound (kernels of microseconds): it also gets llkern's and eager's steps replayed
from a CUDA graph, the GPU's share of the time.

Floors (H100, 3.0 TB/s, ~800 TFLOP/s bf16): 1024×64×8×8 fp32 reads the features once and writes
their gradient once, 2 × 16 MiB → 11 µs; 256×2048×7×7 bf16, 2 × 49 MiB → 34 µs; the token shape is
three 16384×2048×32000 GEMMs, 6.4 TFLOP → 8.1 ms. Both ceilings (copy bandwidth, bfloat16 GEMM rate) are
measured in the same run; each row gets the larger of its two floors and its ratio to it. Memory at the token
shape: llkern holds d weight in float32 (250 MiB) and a 48 MiB chunk of logits; with ``low_memory=True`` d weight
is summed in bfloat16 and the logits chunk is 48 MiB of bfloat16 (Liger-Kernel's default; "Liger FLCE, fp32 dW" is
its float32 accumulation).

    python bench/gpu_aux_head.py [--dry-run]   # --dry-run: DRY_SHAPES on the CPU, nothing written
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
    copy_bandwidth,
    cuda_graphed,
    dry_run,
    empty_cache,
    first_line,
    gemm_tflops,
    require_device,
    set_dry_run,
    speedups,
    time_and_peak,
    time_ms,
)

import llkern

SHAPES = [  # (features shape, classes, dtype)
    ((1024, 64, 8, 8), 10, torch.float32),
    ((256, 2048, 7, 7), 1000, torch.bfloat16),
    ((1, 16384, 2048), 32000, torch.bfloat16),
]
LAUNCH_BOUND_SHAPE = SHAPES[0][0]
DRY_SHAPES = [  # --dry-run: the same three kinds, tiny and odd
    ((7, 13, 3, 3), 5, torch.float32),
    ((5, 11, 3, 3), 37, torch.bfloat16),
    ((1, 29, 17), 211, torch.bfloat16),
]


def eager(f, w, b, t):
    rows = f.mean((2, 3)) if f.dim() == 4 else f.reshape(-1, f.shape[-1])
    return F.cross_entropy(F.linear(rows, w, b).float(), t.reshape(-1))


def variants():
    out = {"llkern": lambda f, w, b, t: llkern.functional.aux_head_loss(f, w, b, t, impl="kernel"),
           # bfloat16 logits and d weight summed in bfloat16 (no effect on the float32 shape)
           "llkern low_memory": lambda f, w, b, t: llkern.functional.aux_head_loss(f, w, b, t, low_memory=True,
                                                                                   impl="kernel"),
           "eager": eager, "torch.compile": torch.compile(eager)}
    if hasattr(F, "linear_cross_entropy"):
        def torch_lce(f, w, b, t):
            rows = f.mean((2, 3)) if f.dim() == 4 else f.reshape(-1, f.shape[-1])
            return F.linear_cross_entropy(rows, w, t.reshape(-1), linear_bias=b)
        out["F.linear_cross_entropy"] = torch_lce
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(f, w, b, t):
            rows = f.mean((2, 3)) if f.dim() == 4 else f.reshape(-1, f.shape[-1])
            return liger_fused_linear_cross_entropy(rows, w, t.reshape(-1), b)

        def liger_fp32(f, w, b, t):  # d weight summed in float32, like llkern's default
            rows = f.mean((2, 3)) if f.dim() == 4 else f.reshape(-1, f.shape[-1])
            return liger_fused_linear_cross_entropy(rows, w, t.reshape(-1), b, accum_dtype=torch.float32)
        out["Liger FLCE"] = liger
        out["Liger FLCE, fp32 dW"] = liger_fp32
    except Exception as error:  # not installed, or built for another torch/triton: the row is skipped, not the run
        print(f"liger-kernel not importable ({first_line(error)}): skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        def cut(f, w, b, t):
            # Cut Cross-Entropy has no bias argument: b is zero here, so the loss is the same (and b gets
            # no gradient from this row)
            rows = f.mean((2, 3)) if f.dim() == 4 else f.reshape(-1, f.shape[-1])
            return cce(rows, w, t.reshape(-1))
        out["Cut Cross-Entropy"] = cut
    except Exception as error:
        print(f"cut-cross-entropy not importable ({first_line(error)}): skipped")
    return out


def floor_ms(shape: tuple[int, ...], classes: int, dtype: torch.dtype, copy_gbps: float, tflops: float) -> float:
    """The larger of the memory floor (read the features and the weight, write their gradients) at the measured
    copy bandwidth and the compute floor (three rows × channels × classes products) at the measured GEMM rate."""
    rows = shape[0] if len(shape) == 4 else shape[0] * shape[1]
    channels = shape[1] if len(shape) == 4 else shape[-1]
    size = torch.finfo(dtype).bits // 8
    nbytes = 2 * size * (torch.Size(shape).numel() + classes * channels)
    flops = 3 * 2 * rows * channels * classes
    return max(nbytes / copy_gbps / 1e6, flops / tflops / 1e9)


def bench_shape(shape: tuple[int, ...], classes: int, dtype: torch.dtype, copy_gbps: float, tflops: float) -> None:
    torch.manual_seed(0)
    channels = shape[1] if len(shape) == 4 else shape[-1]
    f = torch.randn(shape, device=bench_device(), dtype=dtype, requires_grad=True)
    w = (torch.randn(classes, channels, device=bench_device()) / channels**0.5).to(dtype).requires_grad_()
    b = torch.zeros(classes, device=bench_device(), dtype=dtype, requires_grad=True)
    t = torch.randint(0, classes, shape[:2] if len(shape) == 3 else shape[:1], device=bench_device())
    inputs_mib = sum(x.numel() * x.element_size() for x in (f, w, b)) / 2**20

    def step_of(fn):
        def step():
            fn(f, w, b, t).backward()
            f.grad = w.grad = b.grad = None
        return step

    results = {}
    fns = variants()
    for label, fn in fns.items():
        step = step_of(fn)
        try:
            ms, iqr, extra = time_and_peak(step, reps=20, warmup=3)
            extra -= inputs_mib  # above the inputs' gradients, which any implementation must hold
        except Exception as error:  # a peer that cannot run this shape: say so, go on
            print(f"{label} failed on {list(shape)}: {first_line(error)}")
            f.grad = w.grad = b.grad = None
            empty_cache()
            continue
        results[label] = (ms, iqr, extra)
    if shape == LAUNCH_BOUND_SHAPE or (dry_run() and shape == DRY_SHAPES[0][0]):
        # Kernels of a few microseconds: the rows above time Python and launches as much as the GPU. The
        # same steps replayed from a CUDA graph time the GPU's part (llkern's step makes no host sync).
        for label in ("llkern", "eager"):
            try:
                ms, iqr = time_ms(cuda_graphed(step_of(fns[label])), reps=50, warmup=5)
            except Exception as error:
                print(f"{label}, CUDA graph failed on {list(shape)}: {error}")
                continue
            results[f"{label}, CUDA graph"] = (ms, iqr, float("nan"))
    floor = floor_ms(shape, classes, dtype, copy_gbps, tflops)
    for label, (ms, iqr, extra) in results.items():
        vs_eager, vs_compile = speedups(results, ms)
        append_result({"op": "aux_head_loss fwd+bwd", "shape": [*shape, classes],
                       "dtype": str(dtype).removeprefix("torch."), "impl": label, "median_ms": ms,
                       "iqr_ms": iqr, "extra_MiB": extra, "vs_eager": vs_eager, "vs_compile": vs_compile,
                       "floor_ms": floor, "of_floor": ms / floor, "copy_GB_per_s": copy_gbps,
                       "gemm_TFLOP_per_s": tflops})
        print(f"| {list(shape)}→{classes} | {str(dtype).removeprefix('torch.')} | {label} | {ms:.3f} | "
              f"{extra:.0f} | {vs_eager:.2f}x | {vs_compile:.2f}x | {floor:.3f} | {ms / floor:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dry_run_argument(parser)
    set_dry_run(parser.parse_args().dry_run)
    require_device()
    copy_gbps, tflops = copy_bandwidth(), gemm_tflops(torch.bfloat16)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + written), bfloat16 GEMM {tflops:.0f} TFLOP/s")
    print("| shape | dtype | impl | ms | extra MiB | vs eager | vs compile | floor ms | of floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, classes, dtype in DRY_SHAPES if dry_run() else SHAPES:
        bench_shape(shape, classes, dtype, copy_gbps, tflops)


if __name__ == "__main__":
    main()
