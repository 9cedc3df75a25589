"""GPU benchmark of MIRACLE candidate selection (``llkern.ops.miracle_encode.miracle_select``): coding
blocks per second at C = 10 bits, 30 weights a block and C = 12, 60 weights, and at issue 15's target shape
(1024 blocks × 2^16 candidates, 30 weights), fp32, both choices,
against the NumPy encoder's scoring (``llkern.compress.miracle``'s, float64) timed on this machine's CPU on a
few blocks. Checks the first blocks' choices against the float64 reference (where not near-ties),
prints a table and appends rows to bench/results/results.jsonl.

    python bench/gpu_miracle_select.py [--blocks 16384] [--dry-run]

(--dry-run: 11 blocks at C = 5, S = 7 and 5 at C = 6, S = 13 on the CPU, Triton interpreted, nothing written.)

Floor (H100 SXM: 132 SMs at up to 1.98 GHz; 128 FP32 lanes and 64 INT32 lanes per SM and clock, so
3.3e13 instructions/s issued and 1.7e13 integer multiplies/s). Per candidate weight the kernel
computes one Philox-4x32-10 call (only words 0 and 1 are used: one normal per call, the cosine
branch), i.e. 10 rounds × 2 32×32→64-bit multiplies = 40 32-bit multiplies (plus 2 three-way XORs
a round), then two uniforms, a log, a square root and a cosine (~40 FP32 instructions, with
libdevice's polynomials) and 4 for the score. Tiles pad the block to a power of two: 32 and 64
computed weights a candidate.
  * Multiplies alone: 40 / 1.7e13 s a weight. C = 10, S = 30: 2^10 × 32 = 32768 weights a block,
    7.8e-8 s: 13 M blocks/s. C = 12, S = 60: 2^12 × 64 = 262144: 1.6 M blocks/s.
  * Instruction issue: sm_90 SASS of the kernel (ptxas, 8 warps, 128 × 32 tiles) has ~150 executed
    instructions a candidate weight (about 40 IMAD, 30 LOP3, 20 FFMA, the rest shifts, converts,
    compares and the cosine's range check): 150 / 3.3e13 s a weight, 6.7 M blocks/s at C = 10,
    S = 30 and 0.84 M blocks/s at C = 12, S = 60. Expect the measured figure near this one.
The NumPy encoder did 219 blocks/s at C = 10, S = 30 and 15 at C = 12, S = 60 on the 2-core development
VM (bench/results/miracle-encode-2026-11-23.md): the floors are 3e4 and 6e4 times those.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_dry_run_argument,
    append_result,
    bench_device,
    device_name,
    dry_run,
    require_device,
    set_dry_run,
    time_ms,
)

from llkern.ops.miracle_encode import candidate_scores, gumbel_noise, miracle_select, miracle_select_reference

# (bits, block_size, blocks a call: None for --blocks); the last is issue 15's target shape, 1024 blocks × 2^16
CONFIGS = ((10, 30, None), (12, 60, None), (16, 30, 1024))
DRY_CONFIGS, DRY_BLOCKS = ((5, 7, None), (6, 13, 5)), 11  # --dry-run
SEED = 2024
CHECK_BLOCKS = 8  # blocks checked against the float64 reference
NUMPY_BLOCKS = {10: 16, 12: 2}  # blocks the NumPy encoder is timed on, per C (2 for other C)
MARGIN = 1e-3
ISSUE_RATE = 132 * 128 * 1.98e9  # H100 SXM lane-instructions/s
INSTRUCTIONS = 150  # a candidate weight (see the docstring)


def posterior(blocks: int, block_size: int, device: str, generator: torch.Generator):
    """A trained-looking posterior: σ a fraction of ρ, means within a few ρ (fp32)."""
    rho = 0.05 + torch.rand(blocks, block_size, generator=generator, dtype=torch.float64)
    sigma = rho * (0.2 + 0.8 * torch.rand(blocks, block_size, generator=generator, dtype=torch.float64))
    mu = rho * 0.8 * torch.randn(blocks, block_size, generator=generator, dtype=torch.float64)
    return tuple(t.float().to(device) for t in (mu, sigma, rho))


def floor_blocks_per_s(bits: int, block_size: int) -> float:
    padded = 1 << (block_size - 1).bit_length()
    return ISSUE_RATE / (INSTRUCTIONS * 2**bits * padded)


def numpy_blocks_per_s(mu, sigma, rho, bits: int) -> tuple[float, str]:
    """Blocks/s of the NumPy encoder's scoring and argmax on these (CPU) blocks."""
    try:  # the encoder's own code where it still has this helper
        from llkern.compress.miracle import _candidate_scores

        def run():
            m, s, r = (t.double().numpy() for t in (mu, sigma, rho))
            return _candidate_scores(m, s, r, SEED, 0, bits, m.shape[1]).argmax(axis=1)

        label = "llkern.compress.miracle"
    except ImportError:
        def run():
            return miracle_select_reference(mu, sigma, rho, seed=SEED, bits=bits)[0]

        label = "miracle_select_reference"
    start = time.perf_counter()
    run()
    return mu.shape[0] / (time.perf_counter() - start), label


def check_choices(mu, sigma, rho, bits: int, choose: str, indices: torch.Tensor) -> tuple[int, int]:
    """(decided, agreeing) among the first CHECK_BLOCKS blocks: the kernel against float64 keys."""
    mu, sigma, rho = (t[:CHECK_BLOCKS].double().cpu().numpy() for t in (mu, sigma, rho))
    blocks = mu.shape[0]
    k = np.arange(2**bits, dtype=np.uint64)
    keys = np.stack([candidate_scores(mu[i], sigma[i], rho[i], SEED, i, k) for i in range(blocks)])
    if choose == "sample":
        keys += np.stack([gumbel_noise(SEED, indices.numel() + i, k) for i in range(blocks)])
    ordered = np.sort(keys, axis=1)
    decided = ordered[:, -1] - ordered[:, -2] > MARGIN
    agree = indices[:blocks].cpu().numpy() == keys.argmax(axis=1)
    return int(decided.sum()), int((agree & decided).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=None,
                        help=f"coding blocks per call (>= 4096; default 16384, {DRY_BLOCKS} with --dry-run)")
    add_dry_run_argument(parser)
    args = parser.parse_args()
    set_dry_run(args.dry_run)
    require_device()
    if args.blocks is None:
        args.blocks = DRY_BLOCKS if dry_run() else 16384
    generator = torch.Generator().manual_seed(0)
    print(f"fp32, {device_name()}")
    print("| C | S | blocks | choose | ms | GPU blocks/s | floor blocks/s | of floor | NumPy blocks/s | speedup "
          "| check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    status = 0
    for bits, block_size, blocks in DRY_CONFIGS if dry_run() else CONFIGS:
        blocks = blocks or args.blocks
        mu, sigma, rho = posterior(blocks, block_size, bench_device(), generator)
        cpu = tuple(t[:NUMPY_BLOCKS.get(bits, 2)].cpu() for t in (mu, sigma, rho))
        numpy_rate, numpy_label = numpy_blocks_per_s(*cpu, bits)
        floor = floor_blocks_per_s(bits, block_size)
        for choose in ("argmax", "sample"):
            def step(mu=mu, sigma=sigma, rho=rho, bits=bits, choose=choose):
                return miracle_select(mu, sigma, rho, seed=SEED, bits=bits, choose=choose, impl="kernel")

            indices, _ = step()
            decided, agreeing = check_choices(mu, sigma, rho, bits, choose, indices)
            status |= decided != agreeing
            ms, iqr = time_ms(step, reps=10, warmup=2)
            rate = blocks / (ms / 1e3)
            append_result({"op": "miracle_select", "shape": [blocks, block_size], "dtype": "float32",
                           "impl": f"llkern ({choose})", "bits": bits, "median_ms": ms, "iqr_ms": iqr,
                           "blocks_per_s": rate, "floor_blocks_per_s": floor, "numpy_blocks_per_s": numpy_rate,
                           "numpy_impl": numpy_label})
            print(f"| {bits} | {block_size} | {blocks} | {choose} | {ms:.3f} | {rate:.3g} | {floor:.3g} | "
                  f"{rate / floor:.0%} | {numpy_rate:.3g} | {rate / numpy_rate:.0f}x | "
                  f"{agreeing}/{decided} decided agree |")
    if status:
        print("MISMATCH: the kernel chose differently from the float64 reference on a decided block")
    sys.exit(status)


if __name__ == "__main__":
    main()
