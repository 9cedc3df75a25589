"""Pure-PyTorch reference of the transport penalty (TRGL)."""

from __future__ import annotations

import torch


def transport_penalty_reference(
    y: torch.Tensor, x: torch.Tensor | None = None, tau: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """``mean(r²)/(2τ)`` ("mean") or ``Σ‖r‖²/(2τB)`` ("sum_per_sample"), r = y − x (or y); float32 or float64 out."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    r = y.to(acc) if x is None else y.to(acc) - x.to(acc)
    denom = r.numel() if reduction == "mean" else r.shape[0]
    return r.square().sum() / (2.0 * tau * denom)
