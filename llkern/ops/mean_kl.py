"""Mean-KL reparameterised sampling: weights ``w = μ + σ ε`` whose KL from the prior is exactly the
block's budget, from unconstrained parameters θ (mean) and γ (budget split).

Formulas: llkern/reference/mean_kl.py. The noise ε is draw ``block · block_size + j`` of llkern's
Philox stream ``(seed, stream)`` (docs/random.md): the backward regenerates it and nothing per
weight is stored. The Triton kernels are in triton_kernels/mean_kl.py; ``torch.ops.llkern.mean_kl_sample``
and ``mean_kl_sample_backward`` are ``torch.library.triton_op``s. Where Triton cannot run
(:func:`llkern.ops.context.triton_available`), ``impl="auto"`` uses the float64 reference with the
NumPy generator's normals.
"""

from __future__ import annotations

import math
import numbers
import struct
import sys

import numpy as np
import torch

from llkern._ext import check_values, device_guard
from llkern.ops.context import use_triton
from llkern.random import normals
from llkern.reference.mean_kl import mean_kl_reference

__all__ = ["mean_kl_noise", "mean_kl_sample"]

NAME = "llkern.mean_kl_sample"
# A program takes a tile of about TILE_ELEMENTS values: TILE_ELEMENTS // BLOCK blocks (BLOCK the block size
# rounded up to a power of two), one block when a block alone is that wide. A fixed 32 blocks per
# program spilled registers from BLOCK = 64 up and took minutes to compile at BLOCK = 1024.
TILE_ELEMENTS = 1024
# Budgets above this are refused: the float32 kernel is exact to 1e-7 up to 1e7 nats per block and gives
# NaN by 1e8, and MIRACLE's blocks carry tens of bits (C ≤ 32).
MAX_KAPPA_BLOCK = 1e6
# The kernels hold a block in registers: wider blocks are refused there (MIRACLE's widest, 256 weights per bit at
# C ≤ 24, fit); the reference takes any width.
MAX_KERNEL_BLOCK = 8192


def _check(theta, gamma, nu, rho, seed, stream, kappa_block, delta) -> None:
    for arg, value in (("theta", theta), ("gamma", gamma), ("nu", nu), ("rho", rho)):
        if arg == "nu" and value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{NAME}: expected {arg} to be a Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{NAME}: expected {arg} to be a floating-point tensor, got {value.dtype}")
        if value.shape != theta.shape or value.device != theta.device or value.dtype != theta.dtype:
            raise ValueError(f"{NAME}: expected {arg} like theta ({list(theta.shape)}, {theta.dtype}, "
                             f"{theta.device}), got {list(value.shape)}, {value.dtype}, {value.device}")
    if theta.dim() != 2 or theta.numel() == 0:
        raise ValueError(f"{NAME}: expected parameters of shape (num_blocks, block_size), non-empty, got "
                         f"{list(theta.shape)}")
    for arg, value in (("seed", seed), ("stream", stream)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**32:
            raise ValueError(f"{NAME}: expected {arg} to be an int in [0, 2^32), got {value!r}")
    # (subnormal values are refused too: the kernels take the float64 bits as an int64, and the bits of a
    # subnormal fit in an int32, which Triton would pass as one)
    if isinstance(kappa_block, bool) or not isinstance(kappa_block, numbers.Real) \
            or not sys.float_info.min <= kappa_block <= MAX_KAPPA_BLOCK:
        raise ValueError(f"{NAME}: expected kappa_block (nats per block) in (0, {MAX_KAPPA_BLOCK:g}], got "
                         f"{kappa_block!r}")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not sys.float_info.min <= delta < 1.0:
        raise ValueError(f"{NAME}: expected delta in (0, 1), got {delta!r}")
    # (a host sync on a GPU: there only with llkern.value_checks() on; without it a bad ρ gives NaN)
    if check_values(rho) and not bool(((rho > 0) & torch.isfinite(rho)).all()):
        raise ValueError(f"{NAME}: expected rho (the prior's standard deviation) finite and > 0 everywhere")
    if check_values(gamma) and not bool(torch.isfinite(gamma).all()):  # (an inf gave a silent NaN block)
        raise ValueError(f"{NAME}: expected gamma (the budget split) finite everywhere")


def mean_kl_noise(shape: tuple[int, int], seed: int, stream: int) -> torch.Tensor:
    """The noise ε of every weight (float64, from the NumPy generator): what the kernels regenerate."""
    draws = np.arange(shape[0] * shape[1], dtype=np.uint64)
    return torch.from_numpy(normals(seed, stream, draws).reshape(shape))


def mean_kl_sample(theta: torch.Tensor, gamma: torch.Tensor, nu: torch.Tensor | None, rho: torch.Tensor, *, seed: int,
                   stream: int = 0, kappa_block: float = 10 * math.log(2), delta: float = 0.05,
                   impl: str = "auto") -> torch.Tensor:
    """Sample weights whose KL from N(ν, ρ²) is exactly ``kappa_block`` nats per block.

    Args:
        theta: ``(num_blocks, block_size)`` mean parameters (unconstrained).
        gamma: ``(num_blocks, block_size)`` budget-split parameters (softmax over each block).
        nu: prior means, like theta (not trained), or None for zero means (nothing is read or kept for them).
        rho: prior standard deviations (> 0), like theta; gather a per-layer ρ into this layout and
            its gradient flows back to the layers.
        seed, stream: name the noise stream (uint32 each); the same pair gives the same ε.
        kappa_block: nats per block (default 10·ln 2: 10 bits, MIRACLE's C).
        delta: margin that keeps |μ − ν| strictly inside the bound ρ√(2κ_w) (default 0.05).
        impl: ``"auto"``, ``"kernel"`` (Triton) or ``"reference"`` (float64, NumPy noise).

    Returns:
        w, like theta. Differentiable in theta, gamma and rho.
    """
    _check(theta, gamma, nu, rho, seed, stream, kappa_block, delta)
    if not use_triton(NAME, theta.device, impl):
        eps = mean_kl_noise(tuple(theta.shape), seed, stream).to(theta.device)
        nu = torch.zeros_like(theta) if nu is None else nu
        w, _, _ = mean_kl_reference(theta, gamma, nu, rho, eps, float(kappa_block), float(delta))
        return w.to(theta.dtype)
    if theta.shape[1] > MAX_KERNEL_BLOCK:
        raise ValueError(f"{NAME}: the kernel takes blocks of at most {MAX_KERNEL_BLOCK} weights, got block_size "
                         f"{theta.shape[1]}; use impl='reference' for wider blocks")
    return torch.ops.llkern.mean_kl_sample(theta, gamma, nu, rho, seed, stream, float(kappa_block), float(delta))


# --- the ops torch.library sees ------------------------------------------------------------------


def _launch_args(theta: torch.Tensor):
    import triton
    import triton.language as tl

    num_blocks, block_size = theta.shape
    block = triton.next_power_of_2(block_size)
    rows = max(1, TILE_ELEMENTS // block)
    grid = ((num_blocks + rows - 1) // rows,)
    acc = tl.float64 if theta.dtype == torch.float64 else tl.float32
    # More warps for the widest blocks, one per program: 4 warps spilled about 6 KB per thread at BLOCK = 8192.
    warps = min(16, max(4, block // 512))
    return grid, dict(ROWS=rows, BLOCK=block, ACC=acc, num_warps=warps)


def _bits(value: float) -> int:
    """A float64's bits as an int: the kernels take κ_B and δ this way, since Triton passes a Python float
    as a float32."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@torch.library.triton_op("llkern::mean_kl_sample", mutates_args=())
def _mean_kl_sample_op(theta: torch.Tensor, gamma: torch.Tensor, nu: torch.Tensor | None, rho: torch.Tensor,
                       seed: int, stream: int, kappa_block: float, delta: float) -> torch.Tensor:
    from llkern.triton_kernels import mean_kl as kernels

    theta, gamma, rho = (t.contiguous() for t in (theta, gamma, rho))
    has_nu = nu is not None
    nu = nu.contiguous() if has_nu else theta  # (not read without HAS_NU)
    w = torch.empty_like(theta)
    grid, meta = _launch_args(theta)
    with device_guard(theta):
        torch.library.wrap_triton(kernels.mean_kl_forward)[grid](
            theta, gamma, nu, rho, w, theta.shape[0], theta.shape[1], seed, stream, _bits(kappa_block),
            _bits(delta), HAS_NU=has_nu, **meta)
    return w


@torch.library.triton_op("llkern::mean_kl_sample_backward", mutates_args=())
def _mean_kl_sample_backward_op(grad: torch.Tensor, theta: torch.Tensor, gamma: torch.Tensor,
                                nu: torch.Tensor | None, rho: torch.Tensor, seed: int, stream: int, kappa_block: float,
                                delta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from llkern.triton_kernels import mean_kl as kernels

    grad, theta, gamma, rho = (t.contiguous() for t in (grad, theta, gamma, rho))
    has_nu = nu is not None
    nu = nu.contiguous() if has_nu else theta
    d_theta, d_gamma, d_rho = torch.empty_like(theta), torch.empty_like(theta), torch.empty_like(theta)
    grid, meta = _launch_args(theta)
    with device_guard(theta):
        torch.library.wrap_triton(kernels.mean_kl_backward)[grid](
            grad, theta, gamma, nu, rho, d_theta, d_gamma, d_rho, theta.shape[0], theta.shape[1], seed, stream,
            _bits(kappa_block), _bits(delta), HAS_NU=has_nu, **meta)
    return d_theta, d_gamma, d_rho


@_mean_kl_sample_op.register_fake
def _mean_kl_sample_fake(theta, gamma, nu, rho, seed, stream, kappa_block, delta):
    return torch.empty(theta.shape, dtype=theta.dtype, device=theta.device)


@_mean_kl_sample_backward_op.register_fake
def _mean_kl_sample_backward_fake(grad, theta, gamma, nu, rho, seed, stream, kappa_block, delta):
    return tuple(torch.empty(theta.shape, dtype=theta.dtype, device=theta.device) for _ in range(3))


def _setup_context(ctx, inputs, output):
    theta, gamma, nu, rho, seed, stream, kappa_block, delta = inputs
    ctx.save_for_backward(theta, gamma, nu, rho)  # the parameters only (no ν when it is None): ε is regenerated
    ctx.args = (seed, stream, kappa_block, delta)


def _backward(ctx, grad):
    theta, gamma, nu, rho = ctx.saved_tensors
    d_theta, d_gamma, d_rho = torch.ops.llkern.mean_kl_sample_backward(grad, theta, gamma, nu, rho, *ctx.args)
    return d_theta, d_gamma, None, d_rho, None, None, None, None


_mean_kl_sample_op.register_autograd(_backward, setup_context=_setup_context)
