"""Triton kernel of MIRACLE's candidate selection (the wrapper: llkern/ops/miracle_encode.py).

A program codes one block b = first_block + row, or with SPLITS > 1 one of SPLITS equal, consecutive
shares of its candidates (so a few blocks still fill the GPU; the host then keeps, per block, the split
with the largest key, the first of equal ones). Its candidates are scored a tile at a time,
a [TILE, BLOCK] tile (TILE candidates × the block size rounded up to a power of two, masked): ε of
candidate k and weight j is draw ``k · block_size + j`` of llkern's Philox stream ``(seed, b)``
(docs/random.md), and the score of w = ρ ε is

    log q(w) − log p(w) = Σ_j −½ ((ρ_j ε_j − μ_j) / σ_j)² + ½ ε_j² + Σ_j (ln ρ_j − ln σ_j).

The last sum is the block's constant: it is added once, to the winner's score. The per-weight part
is written ½ (ε − d)(ε + d) with d = (ρ/σ) ε − μ/σ, one product of two well-conditioned factors.
A running maximum and its index are kept across tiles (strictly greater replaces: the lowest index
wins ties, as ``numpy.argmax``), so no more than one tile of candidates is ever held.

``SAMPLE`` adds Gumbel noise −ln(−ln u_k) to candidate k's score before the maximum, u_k from word 0
of draw k of the stream ``(seed, gumbel_first + row)``; the noise is computed in float64 (u_k has 25
significant bits, more than float32 holds, and −ln u_k near u_k = 1 needs them). ``F64`` computes
the normals and scores in float64 (float64 inputs); otherwise ε is llkern's float32 ``stream_normal``
and the scores are accumulated in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl
from llkern.triton_kernels.philox import stream_normal, stream_words

TWO_M24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24


@triton.jit
def _normal_f64(seed, stream, n):
    """docs/random.md's normal, computed in float64 from the same words (what the NumPy decoder computes)."""
    x0, x1 = stream_words(seed, stream, n)
    u0 = ((x0 >> 8).to(tl.float64) + 0.5) * TWO_M24
    u1 = (x1 >> 8).to(tl.float64) * TWO_M24
    return tl.sqrt(-2.0 * tl.log(u0)) * tl.cos(6.283185307179586 * u1)


# seed and the stream offsets are never specialised: an int argument equal to 1 would otherwise become a constexpr
@triton.jit(do_not_specialize=["seed", "first_block", "gumbel_first"])
def miracle_select(mu_ptr, sigma_ptr, rho_ptr, index_ptr, score_ptr, key_ptr, block_size,
                   stride_mu_b, stride_mu_j, stride_sigma_b, stride_sigma_j, stride_rho_b, stride_rho_j,
                   seed, first_block, gumbel_first,
                   NUM_CANDIDATES: tl.constexpr, SPLITS: tl.constexpr, SAMPLE: tl.constexpr, F64: tl.constexpr,
                   TILE: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)  # this program's share of the candidates: PER_SPLIT from split · PER_SPLIT
    PER_SPLIT: tl.constexpr = NUM_CANDIDATES // SPLITS
    cols = tl.arange(0, BLOCK).to(tl.int64)
    live = cols < block_size
    # padded columns get μ = 0, σ = ρ = 1: d = ε there, and their term (ε − d)(ε + d) is masked anyway
    mu = tl.load(mu_ptr + row * stride_mu_b + cols * stride_mu_j, mask=live, other=0.0)
    sigma = tl.load(sigma_ptr + row * stride_sigma_b + cols * stride_sigma_j, mask=live, other=1.0)
    rho = tl.load(rho_ptr + row * stride_rho_b + cols * stride_rho_j, mask=live, other=1.0)
    if F64:
        mu, sigma, rho = mu.to(tl.float64), sigma.to(tl.float64), rho.to(tl.float64)
        ratio, shift = rho / sigma, mu / sigma
    else:
        # Correctly rounded: float32 `/` compiles to an approximate reciprocal-multiply on the GPU, and
        # ρ·(1/ρ) ≠ 1 for ~15 % of floats would break exact ties (σ = ρ must give ratio 1).
        mu, sigma, rho = mu.to(tl.float32), sigma.to(tl.float32), rho.to(tl.float32)
        ratio, shift = tl.div_rn(rho, sigma), tl.div_rn(mu, sigma)
    one_minus_ratio = (1.0 - ratio)[None, :]
    one_plus_ratio = (1.0 + ratio)[None, :]
    shift = shift[None, :]
    constant = tl.sum(tl.where(live, tl.log(rho) - tl.log(sigma), 0.0), axis=0)
    stream = first_block + row
    gumbel_stream = gumbel_first + row
    k_tile = tl.arange(0, TILE).to(tl.int64)

    best_key = -float("inf")  # the maximised quantity (the score, + Gumbel noise when sampling)
    if SAMPLE or F64:
        best_key = best_key + tl.zeros((), tl.float64)
    else:
        best_key = best_key + tl.zeros((), tl.float32)
    best_index = split * PER_SPLIT
    best_score = tl.zeros_like(constant)
    for offset in range(0, PER_SPLIT, TILE):
        k = split * PER_SPLIT + offset + k_tile
        n = (k[:, None] * block_size + cols[None, :]).to(tl.uint64)
        if F64:
            eps = _normal_f64(seed, stream, n)
        else:
            eps = stream_normal(seed, stream, n)
        # (ε − d)(ε + d) with d = rε − s, written as ((1 − r)ε + s)((1 + r)ε − s): the GPU contracts
        # ε − rε into fma(a, b, −r·round(ab)) when ε = ab, which leaves ab's rounding error where σ = ρ,
        # μ = 0 must give exactly 0 (ties then go to the lowest index); (1 − r) = 0 there makes it exact.
        # It also avoids the cancellation in ε − d when r ≈ 1.
        eps_minus_d = one_minus_ratio * eps + shift
        eps_plus_d = one_plus_ratio * eps - shift
        score = 0.5 * tl.sum(tl.where(live[None, :], eps_minus_d * eps_plus_d, 0.0), axis=1)
        if SAMPLE:
            x0, _ = stream_words(seed, gumbel_stream, k.to(tl.uint64))
            u = ((x0 >> 8).to(tl.float64) + 0.5) * TWO_M24
            key = score.to(tl.float64) - tl.log(-tl.log(u))
        else:
            key = score
        top = tl.max(key, axis=0)
        top_index = tl.min(tl.where(key == top, k, NUM_CANDIDATES), axis=0)  # the lowest k at the maximum
        top_score = tl.sum(tl.where(k == top_index, score, 0.0), axis=0)
        better = top > best_key
        best_key = tl.where(better, top, best_key)
        best_index = tl.where(better, top_index, best_index)
        best_score = tl.where(better, top_score, best_score)
    out = row * SPLITS + split
    tl.store(index_ptr + out, best_index)
    tl.store(score_ptr + out, (best_score + constant).to(score_ptr.dtype.element_ty))
    if SPLITS > 1:  # the host takes the best split (the first of equal keys: the lowest index)
        tl.store(key_ptr + out, best_key)
