"""GPU benchmark of Mean-KL reparameterised sampling, forward + backward, at 64M weights.

Layout (num_blocks, 32) fp32: 2M blocks of 32 weights, 10 bits each. Against eager PyTorch (the
same formulas with torch ops and a stored noise tensor, Newton unrolled 12 times) and
torch.compile of it. Prints median ms, peak extra memory and achieved bandwidth; appends rows to
bench/results/results.jsonl.

Floor (H100, 3.0 TB/s): the forward reads θ, γ, ν, ρ and writes w (5 × 256 MiB); the backward
reads g, θ, γ, ν, ρ and writes dθ, dγ, dρ (8 × 256 MiB): 3.3 GB → 1.1 ms. (The issue's 0.6 ms
counts fewer tensors: ν and ρ per layer instead of per weight.) The floor is these bytes at the copy bandwidth
measured in the same run; extra memory is above the inputs and their three gradients.

    python bench/gpu_mean_kl.py [--dry-run]   # --dry-run: 37 blocks of 29, CPU (Triton interpreted), nothing written
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_dry_run_argument,
    append_result,
    bench_device,
    copy_bandwidth,
    dry_run,
    first_line,
    require_device,
    set_dry_run,
    speedups,
    time_and_peak,
)

import llkern

NUM_BLOCKS, BLOCK = 1 << 21, 32
DRY_NUM_BLOCKS, DRY_BLOCK = 37, 29  # --dry-run
KAPPA, DELTA = 10 * math.log(2), 0.05


def eager(theta, gamma, nu, rho, eps):
    kappa = KAPPA * torch.softmax(gamma, dim=-1)
    t = torch.tanh(theta)
    mu = nu + (1 - DELTA) * rho * torch.sqrt(2 * kappa) * t
    d = (2 * kappa * (1 - (1 - DELTA) ** 2 * t * t)).clamp_min(1e-12)
    u = torch.where(d >= 1, -(1 + d), -torch.sqrt(2 * d))
    for _ in range(12):
        h = torch.expm1(u) - u
        u = u - (h - d) / (h + u)
    return mu + rho * torch.exp(0.5 * u) * eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dry_run_argument(parser)
    set_dry_run(parser.parse_args().dry_run)
    require_device()
    torch.manual_seed(0)
    shape = (DRY_NUM_BLOCKS, DRY_BLOCK) if dry_run() else (NUM_BLOCKS, BLOCK)
    device = bench_device()
    theta, gamma = torch.randn(shape, device=device, requires_grad=True), torch.randn(shape, device=device,
                                                                                     requires_grad=True)
    nu = torch.zeros(shape, device=device)
    rho = torch.full(shape, 0.1, device=device, requires_grad=True)
    eps = torch.randn(shape, device=device)
    grad = torch.randn(shape, device=device)
    params_mib = 4 * theta.numel() * 4 / 2**20
    grads_mib = 3 * theta.numel() * 4 / 2**20  # d theta, d gamma, d rho: any implementation holds them
    copy_gbps = copy_bandwidth()
    floor = 13 * 4 * theta.numel() / copy_gbps / 1e6  # 5 tensors through the forward, 8 through the backward
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + written): floor {floor:.3f} ms")
    variants = {
        "llkern": lambda: llkern.mean_kl_sample(theta, gamma, nu, rho, seed=1, impl="kernel"),
        "eager": lambda: eager(theta, gamma, nu, rho, eps),
        "torch.compile": (lambda f: lambda: f(theta, gamma, nu, rho, eps))(torch.compile(eager)),
    }
    print("| impl | ms fwd+bwd | extra MiB | vs eager | vs compile | of floor |")
    print("|---|---|---|---|---|---|")
    results = {}
    for label, fn in variants.items():
        def step(fn=fn):
            fn().backward(grad)
            theta.grad = gamma.grad = rho.grad = None
        try:
            ms, iqr, extra = time_and_peak(step)
        except Exception as error:
            print(f"{label} failed: {first_line(error)}")
            continue
        results[label] = (ms, iqr, extra - grads_mib)
    for label, (ms, iqr, extra) in results.items():
        vs_eager, vs_compile = speedups(results, ms)
        append_result({"op": "mean_kl_sample fwd+bwd", "shape": list(shape), "dtype": "float32", "impl": label,
                       "median_ms": ms, "iqr_ms": iqr, "extra_MiB": extra, "params_MiB": params_mib,
                       "floor_ms": floor, "of_floor": ms / floor, "copy_GB_per_s": copy_gbps,
                       "vs_eager": vs_eager, "vs_compile": vs_compile})
        print(f"| {label} | {ms:.3f} | {extra:.0f} | {vs_eager:.2f}x | {vs_compile:.2f}x | {ms / floor:.1f}x |")


if __name__ == "__main__":
    main()
