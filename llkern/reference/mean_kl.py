"""Plain-PyTorch reference of Mean-KL reparameterised sampling (MIRACLE with the Mean-KL
parameterisation; formulas in design.md, "Mean-KL reparameterised sampling").

Weights are laid out in coding blocks: ``(num_blocks, block_size)`` tensors. Per weight w of a
block with budget ``kappa_block`` nats:

* ``κ_w = kappa_block · softmax_block(γ)_w``;
* ``μ = ν + (1 − δ) ρ √(2κ_w) tanh θ``, so ``m = (μ − ν)²/ρ² = (1 − δ)² 2κ_w tanh² θ < 2κ_w``;
* ``r = σ²/ρ² ≤ 1`` solves ``r − ln r = c``, ``c = 1 + 2κ_w − m`` (the KL of N(μ, σ²) from N(ν, ρ²) is
  then exactly κ_w);
* ``w = μ + σ ε``.

So every block's KL is exactly ``kappa_block``, whatever the parameters. The reference solves for r
in float64 (Newton on u = ln r, iterated to convergence) and carries the implicit derivative
``dr/dc = r / (r − 1)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["D_FLOOR", "kl_normal", "mean_kl_mean", "mean_kl_reference", "solve_r"]

D_FLOOR = 1e-12


# 1/n! for n = 2..11: the series of e^u − 1 − u, truncated where |u| < 0.5 leaves < 1e-12 relative
SERIES = [1.0 / math.factorial(n) for n in range(2, 12)]


def _h(u: torch.Tensor) -> torch.Tensor:
    """e^u − 1 − u without cancellation near 0 (series for |u| < 0.5)."""
    series = torch.zeros_like(u)
    for coefficient in reversed(SERIES):
        series = series * u + coefficient
    return torch.where(u.abs() < 0.5, u * u * series, torch.exp(u) - 1 - u)


def solve_r(d: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """r ≤ 1 with r − ln r = 1 + d (d > 0), by Newton on u = ln r: e^u − 1 − u = d, until the steps
    stop shrinking below rounding (at most ``iterations``). No gradient."""
    d = d.detach()
    u = torch.where(d >= 1.0, -(1.0 + d), -torch.sqrt(2.0 * d))
    for _ in range(iterations):
        h = _h(u)
        step = (h - d) / (h + u)  # f'(u) = e^u − 1 = h + u
        u = u - step
        # quadratic convergence from this start: about five steps, then rounding-level wobble
        if not bool((step.abs() > 1e-15 * u.abs().clamp_min(1.0)).any()):
            break
    return torch.exp(u)


def kl_normal(mu: torch.Tensor, sigma: torch.Tensor, nu: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(ν, ρ²)) in nats, elementwise."""
    return torch.log(rho / sigma) + (sigma**2 + (mu - nu) ** 2) / (2 * rho**2) - 0.5


def mean_kl_mean(theta: torch.Tensor, gamma: torch.Tensor, nu: torch.Tensor | None, rho: torch.Tensor,
                 kappa_block: float, delta: float = 0.05) -> torch.Tensor:
    """μ = ν + (1 − δ) ρ √(2κ_w) tanh θ (ν None: zero), in the parameters' dtype: the weights' means, which
    need no r (so no Newton iterations, and no host synchronisation on a GPU)."""
    kappa = kappa_block * torch.softmax(gamma, dim=-1)
    shift = (1.0 - delta) * rho * torch.sqrt(2.0 * kappa) * torch.tanh(theta)
    return shift if nu is None else nu + shift


def mean_kl_reference(theta: torch.Tensor, gamma: torch.Tensor, nu: torch.Tensor, rho: torch.Tensor,
                      eps: torch.Tensor, kappa_block: float, delta: float = 0.05,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w, μ, σ)`` of ``(num_blocks, block_size)`` parameters, computed in float64.

    ``eps`` is the standard normal noise (llkern.random's stream in the kernels). Differentiable
    in θ, γ and ρ; r carries the implicit derivative of ``r − ln r = c``.
    """
    theta, gamma, nu, rho, eps = (t.double() for t in (theta, gamma, nu, rho, eps))
    kappa = kappa_block * torch.softmax(gamma, dim=-1)
    t = torch.tanh(theta)
    mu = mean_kl_mean(theta, gamma, nu, rho, kappa_block, delta)
    # c − 1 = 2κ − m, without cancellation; floored at D_FLOOR (a weight with no budget: r = 1 − 1.4e-6,
    # KL 5e-13 nats instead of 0), where it has no gradient
    d = (2.0 * kappa * (1.0 - (1.0 - delta) ** 2 * t * t)).clamp_min(D_FLOOR)
    r0 = solve_r(d)
    slope = (r0 / (r0 - 1.0)).detach()  # dr/dc
    r = r0 + (d - d.detach()) * slope
    sigma = rho * torch.sqrt(r)
    return mu + sigma * eps, mu, sigma
