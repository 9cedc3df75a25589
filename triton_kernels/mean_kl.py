"""Triton kernels of Mean-KL reparameterised sampling (formulas: llkern/reference/mean_kl.py).

Parameters are laid out in coding blocks, ``(num_blocks, block_size)``; one program takes ROWS
blocks, a [ROWS, BLOCK] tile with BLOCK the block size rounded up to a power of two. The forward
computes κ_w (a softmax over the block), μ, r (Newton on u = ln r) and σ, regenerates the noise ε
from llkern's Philox stream (draw n = block · block_size + j) and writes w = μ + σ ε. The backward
recomputes all of it from the parameters and writes the gradients of θ, γ and ρ: nothing per
weight is stored between the passes.
"""

from __future__ import annotations

import triton
import triton.language as tl
from llkern.triton_kernels.philox import stream_normal

# From the start below, Newton on u converges to rounding in 3 steps in float32 and 4 in float64 over
# d in [1e-12, 1e7] (every budget the op accepts); one more for margin. (A global the compiled kernel
# reads must be a constexpr.)
NEWTON_STEPS = tl.constexpr(5)


@triton.jit
def _c(value, like):
    """The constant ``value`` in the dtype of ``like``: a bare Python float becomes a float32 constant,
    which would cut a float64 kernel's accuracy to float32's."""
    return tl.full([], value, like.dtype)


@triton.jit
def _h(u):
    """e^u − 1 − u without cancellation near 0: its series (through u^11) where |u| < 0.5."""
    s = u * _c(1.0 / 39916800.0, u) + _c(1.0 / 3628800.0, u)
    s = s * u + _c(1.0 / 362880.0, u)
    s = s * u + _c(1.0 / 40320.0, u)
    s = s * u + _c(1.0 / 5040.0, u)
    s = s * u + _c(1.0 / 720.0, u)
    s = s * u + _c(1.0 / 120.0, u)
    s = s * u + _c(1.0 / 24.0, u)
    s = s * u + _c(1.0 / 6.0, u)
    s = s * u + 0.5
    return tl.where(tl.abs(u) < 0.5, u * u * s, tl.exp(u) - 1.0 - u)


@triton.jit
def _tanh(x):
    """tanh from m = e^(−2|x|) − 1 ∈ [−1, 0]: by the series near 0 (no cancellation), by exp beyond, where
    it saturates to −1 (so tanh → ±1 up to |x| = ∞; forming it as h(−2|x|) − 2|x| there gave 0 from
    |x| ≈ 1e7 on, a difference of two equal large numbers, and NaN at ∞)."""
    a = tl.abs(x)
    m = tl.where(a < 0.25, _h(-2.0 * a) - 2.0 * a, tl.exp(-2.0 * a) - 1.0)
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, t)


@triton.jit
def _state(theta_ptr, gamma_ptr, nu_ptr, rho_ptr, num_blocks, block_size, seed, stream, kappa_bits, delta_bits,
           HAS_NU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Everything both passes need for this program's tile. κ_B and δ arrive as the bits of float64s
    (a Python float argument would be a float32) and are used at the accumulation precision."""
    # tl.cast first: an int argument equal to 1 reaches the kernel as a constant under torch.compile
    kappa_block = tl.cast(kappa_bits, tl.int64).to(tl.float64, bitcast=True).to(ACC)
    delta = tl.cast(delta_bits, tl.int64).to(tl.float64, bitcast=True).to(ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    mask = (rows[:, None] < num_blocks) & (cols[None, :] < block_size)
    idx = rows[:, None] * block_size + cols[None, :]
    gamma = tl.load(gamma_ptr + idx, mask=mask, other=0.0).to(ACC)
    top = tl.max(tl.where(mask, gamma, -float("inf")), axis=1)
    top = tl.where(top == -float("inf"), 0.0, top)  # (rows past the end: no NaN even where masked)
    e = tl.where(mask, tl.exp(gamma - top[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    share = e / tl.where(total > 0, total, 1.0)[:, None]  # softmax over the block
    kappa = kappa_block * share
    theta = tl.load(theta_ptr + idx, mask=mask, other=0.0).to(ACC)
    if HAS_NU:
        nu = tl.load(nu_ptr + idx, mask=mask, other=0.0).to(ACC)
    else:  # zero prior means: nothing to read
        nu = tl.zeros([ROWS, BLOCK], dtype=ACC)
    rho = tl.load(rho_ptr + idx, mask=mask, other=1.0).to(ACC)
    # ρ ≤ 0 or infinite: NaN out (the host checks ρ only with llkern.value_checks() on a GPU; a negative ρ
    # would otherwise give finite, wrong weights)
    rho = tl.where((rho > 0.0) & (rho < float("inf")), rho, float("nan"))
    t = _tanh(theta)
    root = tl.sqrt(2.0 * kappa)
    mu = nu + (1.0 - delta) * rho * root * t
    # d = c − 1 = 2κ − m > 0; floored so that a weight with no budget (r = 1) keeps finite slopes
    # (as the reference: no gradient flows through the floor)
    d_raw = 2.0 * kappa * (1.0 - (1.0 - delta) * (1.0 - delta) * t * t)
    floor = _c(1e-12, d_raw)
    live = d_raw > floor
    d = tl.where(mask & live, d_raw, tl.where(mask, floor, 1.0))
    u = tl.where(d >= 1.0, -(1.0 + d), -tl.sqrt(2.0 * d))
    for _ in tl.static_range(NEWTON_STEPS):  # convex in u: one overshoot, then monotone
        h = _h(u)
        u = u - (h - d) / (h + u)
    r = tl.exp(u)
    sigma = rho * tl.sqrt(r)
    eps = stream_normal(seed, stream, idx.to(tl.uint64)).to(ACC)
    return idx, mask, live, share, kappa, theta, nu, rho, t, root, mu, u, r, sigma, eps, kappa_block, delta


# seed or stream equal to 1 would otherwise be specialised into a Python constant, which has no .to()
@triton.jit(do_not_specialize=["seed", "stream", "kappa_bits", "delta_bits"])
def mean_kl_forward(theta_ptr, gamma_ptr, nu_ptr, rho_ptr, w_ptr, num_blocks, block_size, seed, stream,
                    kappa_bits, delta_bits, HAS_NU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    ACC: tl.constexpr):
    idx, mask, _, _, _, _, _, _, _, _, mu, _, _, sigma, eps, _, _ = _state(
        theta_ptr, gamma_ptr, nu_ptr, rho_ptr, num_blocks, block_size, seed, stream, kappa_bits, delta_bits,
        HAS_NU, ROWS, BLOCK, ACC)
    tl.store(w_ptr + idx, (mu + sigma * eps).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "stream", "kappa_bits", "delta_bits"])
def mean_kl_backward(grad_ptr, theta_ptr, gamma_ptr, nu_ptr, rho_ptr, d_theta_ptr, d_gamma_ptr, d_rho_ptr,
                     num_blocks, block_size, seed, stream, kappa_bits, delta_bits,
                     HAS_NU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    idx, mask, live, share, kappa, _, nu, rho, t, root, mu, u, _, sigma, eps, kappa_block, delta = _state(
        theta_ptr, gamma_ptr, nu_ptr, rho_ptr, num_blocks, block_size, seed, stream, kappa_bits, delta_bits,
        HAS_NU, ROWS, BLOCK, ACC)
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(ACC)
    keep = (1.0 - delta) * (1.0 - delta)
    # σ = ρ √r and dr/dc = r / (r − 1): dσ/dc = σ / (2 (r − 1)) = σ / (2 expm1(u)), no division by r
    # (which underflows to 0 for large budgets)
    g_c = tl.where(live, g * eps * sigma / (2.0 * (_h(u) + u)), 0.0)
    sech2 = 1.0 - t * t
    d_theta = g * (1.0 - delta) * rho * root * sech2 - g_c * 4.0 * keep * kappa * t * sech2
    # s_w · dL/dκ_w, written so that nothing divides by a vanishing √κ: (1−δ) ρ t s / √(2κ) = (1−δ) ρ t √(s/(2κ_B))
    q = g * (1.0 - delta) * rho * t * tl.sqrt(share / (2.0 * kappa_block)) + share * g_c * 2.0 * (1.0 - keep * t * t)
    q = tl.where(mask, q, 0.0)
    d_gamma = kappa_block * (q - share * tl.sum(q, axis=1)[:, None])
    d_rho = g * (mu - nu + sigma * eps) / rho  # w − ν is proportional to ρ (r does not depend on it)
    tl.store(d_theta_ptr + idx, d_theta.to(d_theta_ptr.dtype.element_ty), mask=mask)
    tl.store(d_gamma_ptr + idx, d_gamma.to(d_gamma_ptr.dtype.element_ty), mask=mask)
    tl.store(d_rho_ptr + idx, d_rho.to(d_rho_ptr.dtype.element_ty), mask=mask)
