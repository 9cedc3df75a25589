"""GPU benchmark of the similarity-matrix losses, forward + backward, side by side in one run.

Shapes (issue 4): N ∈ {4096, 16384, 32768}, d ∈ {128, 256}, bf16 and fp32; the symmetric InfoNCE
(CLIP's loss, the one Inf-CL computes); then supervised contrastive and Rényi-2 MI at N = 16384, d = 128
(issue 15). Against eager PyTorch (the loss over the whole N×N matrix), torch.compile, and Inf-CL when
importable (PyPI ``inf-cl``; the GPU machine has no network:
`make gpu-wheels` here, then carry .whl). Prints median milliseconds and peak extra memory (allocated above the
inputs and their gradients); appends rows to bench/results/results.jsonl.

Floor (H100, ~800 TFLOP/s bf16 dense on tensor cores): symmetric InfoNCE at N = 32768, d = 128
needs four N×N×d products, 4 × 2·N²·d = 1.1 TFLOP → 1.4 ms; at fp32 (no TF32) ~60 TFLOP/s → 18 ms.
llkern's fused bfloat16 op (llkern/ops/info_nce_fused.py) recomputes the tiles instead of storing them: five
products (one forward pass gives the rows' and the columns' log-sum-exps against a fixed offset, two products per
direction in the backward), 1.4 TFLOP → 1.7 ms, and 3 N² exponentials (3.2e9: ~0.8 ms of the H100's 4.2e12/s
MUFU rate, partly hidden under the products). The row "llkern, running max" is the same op with a running
maximum (six products, 6 N² exponentials), measured beside it. Each row's floor: its op's products at the GEMM
rate measured in the same run (bfloat16, and float32 as PyTorch runs it), and the ratio to it.

    python bench/gpu_similarity.py [--dry-run]   # --dry-run: DRY_SHAPES on the CPU, nothing written
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_dry_run_argument,
    append_result,
    bench_device,
    dry_run,
    empty_cache,
    first_line,
    gemm_tflops,
    require_device,
    set_dry_run,
    speedups,
    time_and_peak,
)

import llkern
from llkern.ops.info_nce_fused import fused_fits, running_maximum

TAU = 0.07
SHAPES = [(n, d, dtype) for n in (4096, 16384, 32768) for d in (128, 256) for dtype in (torch.bfloat16, torch.float32)]
DRY_SHAPES = [(n, d, dtype) for n in (37, 97) for d in (7,) for dtype in (torch.bfloat16, torch.float32)]  # --dry-run


def eager(a, b):
    s = (F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T) / TAU
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))


def variants():
    out = {"llkern": lambda a, b: llkern.functional.info_nce(a, b, TAU, symmetric=True, impl="kernel"),
           # the blocked C++ op, which bfloat16 inputs on a GPU no longer take (float32 does: same row twice)
           "llkern blocked": lambda a, b: torch.ops.llkern.info_nce(a, b, TAU, True, True, True)[0],
           "eager": eager, "torch.compile": torch.compile(eager)}
    try:
        from inf_cl import cal_inf_loss

        def inf_cl(a, b):
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            labels = torch.arange(a.shape[0], device=a.device)
            # head_dim: the whole row is one head (Inf-CL's default, 256, cannot view a d = 128 row)
            return 0.5 * (cal_inf_loss(a, b, labels, scale=1 / TAU, head_dim=a.shape[1]).mean()
                          + cal_inf_loss(b, a, labels, scale=1 / TAU, head_dim=a.shape[1]).mean())
        out["Inf-CL"] = inf_cl
    except Exception as error:  # not installed, or built for another torch/triton: the row is skipped, not the run
        print(f"inf-cl not importable ({first_line(error)}): skipped")
    return out


# The floor: the products a fused forward + backward needs at least (2·N²·d FLOP each) at this run's measured GEMM
# rate in the inputs' dtype (float32: PyTorch's default, no TF32): 4 for the symmetric InfoNCE, 3 for one view.
PRODUCTS = {"info_nce symmetric fwd+bwd": 4, "supcon fwd+bwd": 3, "renyi_mutual_information fwd+bwd": 3}
GEMM_TFLOPS: dict[torch.dtype, float] = {}  # measured once per dtype, in main


def floor_ms(op: str, n: int, d: int, dtype: torch.dtype) -> float:
    return PRODUCTS[op] * 2 * n * n * d / GEMM_TFLOPS[dtype] / 1e9


def measure_and_report(op: str, n: int, d: int, dtype: torch.dtype, steps: dict, inputs_mib: float) -> None:
    """Time and peak memory of each step (label → a forward + backward), side by side; rows appended to
    results.jsonl and printed. Memory is above the inputs and their gradients, which any implementation holds."""
    results = {}
    for label, step in steps.items():
        try:
            ms, iqr, extra = time_and_peak(step)
            extra -= inputs_mib
        except Exception as error:  # out of memory at the large shapes, or a peer that cannot run
            print(f"{op} {label} failed at N={n}, d={d}, {dtype}: {first_line(error)}")
            empty_cache()
            continue
        results[label] = (ms, iqr, extra)
    tag = str(dtype).removeprefix("torch.")
    floor = floor_ms(op, n, d, dtype)
    for label, (ms, iqr, extra) in results.items():
        vs_eager, vs_compile = speedups(results, ms)
        append_result({"op": op, "shape": [n, d], "dtype": tag, "impl": label, "median_ms": ms, "iqr_ms": iqr,
                       "extra_MiB": extra, "vs_eager": vs_eager, "vs_compile": vs_compile, "floor_ms": floor,
                       "of_floor": ms / floor, "gemm_TFLOP_per_s": GEMM_TFLOPS[dtype]})
        print(f"| {op} {n}×{d} | {tag} | {label} | {ms:.3f} | {extra:.0f} | {vs_eager:.2f}x | {vs_compile:.2f}x | "
              f"{floor:.3f} | {ms / floor:.1f}x |")


def with_running_maximum(steps: dict, z: torch.Tensor) -> dict:
    """steps with, after "llkern", the fused kernels before the shared offset ("llkern, running max": InfoNCE's
    two forward passes, two exponentials an element in the backward), forward and backward both, where the
    fused kernels run (bfloat16 on a GPU)."""
    if not fused_fits(z, "kernel"):
        return steps
    llkern_step = steps["llkern"]

    def running_max_step():
        with running_maximum():
            llkern_step()
    return {"llkern": llkern_step, "llkern, running max": running_max_step,
            **{k: v for k, v in steps.items() if k != "llkern"}}


def bench_shape(n: int, d: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    a = torch.randn(n, d, device=bench_device(), dtype=dtype, requires_grad=True)
    b = torch.randn(n, d, device=bench_device(), dtype=dtype, requires_grad=True)

    def step_of(fn):
        def step():
            fn(a, b).backward()
            a.grad = b.grad = None
        return step

    steps = with_running_maximum({label: step_of(fn) for label, fn in variants().items()}, a)
    measure_and_report("info_nce symmetric fwd+bwd", n, d, dtype, steps, 2 * a.numel() * a.element_size() / 2**20)


# Supervised contrastive and Rényi-2 MI on one view (issue 15, C: N = 16384): llkern (the fused SupCon and Rényi
# for bfloat16 on a GPU, the blocked ops otherwise), the blocked ops themselves, and the references eagerly and
# compiled. Rényi's floor: three N²d products (distances, then distances and H·u in the backward), 2·N²·d each:
# 2.1e11 FLOP → 0.26 ms at ~800 TFLOP/s; the blocked op's float32 products (no TF32) take ~3.4 ms at ~60.
ONE_VIEW_SHAPES = [(16384, 128, torch.bfloat16), (16384, 128, torch.float32)]
DRY_ONE_VIEW_SHAPES = [(97, 7, torch.bfloat16), (97, 7, torch.float32)]
CLASSES = 100


def renyi_width(z: torch.Tensor) -> float:
    """σ = √d: rows of randn are ~√(2d) apart, so K² ≈ e⁻² (at Silverman's width, ~0.9, every K² off the diagonal
    would be 0 and the gradient exactly 0: the same work, but a trivial case)."""
    return math.sqrt(z.shape[1])


def one_view_variants() -> dict[str, dict]:
    from llkern.reference.similarity import supcon_reference

    def supcon_eager(z, y):
        return supcon_reference(z, y, TAU)

    def renyi_eager(z, y):
        # what one writes in PyTorch: distances through one product (the reference's exact differences would
        # hold an N×N×d tensor, 128 GiB at N = 16384), in z's dtype as autocast runs it, the rest in float32
        u = (z - z.mean(0)) / renyi_width(z)
        sq = (u.float() ** 2).sum(1)
        k2 = torch.exp(-(sq[:, None] + sq[None, :] - 2 * (u @ u.T).float()).clamp_min(0))
        same = (y[:, None] == y[None, :]).float()
        n = torch.tensor(float(z.shape[0]), device=z.device)
        return torch.log2((k2 * same).sum()) - torch.log2(k2.sum()) - torch.log2(same.sum()) + 2 * torch.log2(n)

    return {
        "supcon fwd+bwd": {
            "llkern": lambda z, y: llkern.functional.supcon_loss(z, y, TAU, impl="kernel"),
            "llkern blocked": lambda z, y: torch.ops.llkern.supcon_loss(z, y, TAU, True, True)[0],
            "eager": supcon_eager, "torch.compile": torch.compile(supcon_eager)},
        "renyi_mutual_information fwd+bwd": {
            "llkern": lambda z, y: llkern.functional.renyi_mutual_information(z, y, sigma=renyi_width(z),
                                                                             impl="kernel"),
            # the blocked op, which bfloat16 inputs on a GPU no longer take (float32 does: the same row twice)
            "llkern blocked": lambda z, y: torch.ops.llkern.renyi_mutual_information(z, y, renyi_width(z), None,
                                                                                    True)[0],
            "eager": renyi_eager, "torch.compile": torch.compile(renyi_eager)},
    }


def bench_one_view(n: int, d: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    z = torch.randn(n, d, device=bench_device(), dtype=dtype, requires_grad=True)
    y = torch.randint(0, CLASSES, (n,), device=bench_device())

    def step_of(fn):
        def step():
            fn(z, y).backward()
            z.grad = None
        return step

    for op, fns in one_view_variants().items():
        steps = {label: step_of(fn) for label, fn in fns.items()}
        if op.startswith("supcon"):
            steps = with_running_maximum(steps, z)
        measure_and_report(op, n, d, dtype, steps, z.numel() * z.element_size() / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dry_run_argument(parser)
    parser.add_argument("--part", choices=("all", "info-nce", "one-view"), default="all",
                        help="the symmetric InfoNCE shapes, the one-view losses (SupCon, Rényi), or both")
    args = parser.parse_args()
    set_dry_run(args.dry_run)
    require_device()
    for dtype in (torch.bfloat16, torch.float32):
        GEMM_TFLOPS[dtype] = gemm_tflops(dtype)
    print("GEMM rate (the floors' ceiling): " + ", ".join(f"{str(k).removeprefix('torch.')} {v:.0f} TFLOP/s"
                                                          for k, v in GEMM_TFLOPS.items()))
    print("| op, N×d | dtype | impl | ms | extra MiB | vs eager | vs compile | floor ms | of floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    if args.part in ("all", "info-nce"):
        for n, d, dtype in DRY_SHAPES if dry_run() else SHAPES:
            bench_shape(n, d, dtype)
    if args.part in ("all", "one-view"):
        for n, d, dtype in DRY_ONE_VIEW_SHAPES if dry_run() else ONE_VIEW_SHAPES:
            bench_one_view(n, d, dtype)


if __name__ == "__main__":
    main()
