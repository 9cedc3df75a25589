"""``nn.Module`` forms of llkern's ops (the functional forms are in :mod:`llkern.functional`)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from llkern.ops.transport import REDUCTIONS, transport_penalty


class TransportPenalty(nn.Module):
    """TRGL's transport penalty as a module: ``forward(y, x=None)`` is
    :func:`llkern.functional.transport_penalty` with this module's ``tau`` and ``reduction``.

    With ``r = y − x`` (``r = y`` when ``x`` is None), ``y`` and ``x`` of one shape ``(B, ...)``:
    ``"mean"`` gives ``mean(r²)/(2τ)``, ``"sum_per_sample"`` gives ``Σ‖r‖²/(2τB)``; a 0-dim tensor
    (float64 for float64 inputs, float32 otherwise).

    Args:
        tau: τ, a finite number > 0.
        reduction: ``"mean"`` or ``"sum_per_sample"``.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.
    """

    def __init__(self, tau: float = 1.0, reduction: str = "mean", impl: str = "auto") -> None:
        super().__init__()
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
            raise TypeError(f"TransportPenalty: expected tau to be a number, got {type(tau).__name__}")
        if not (float(tau) > 0.0 and math.isfinite(float(tau))):
            raise ValueError(f"TransportPenalty: expected tau to be a finite number > 0, got {tau!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"TransportPenalty: expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
        self.tau, self.reduction, self.impl = float(tau), reduction, impl

    def forward(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return transport_penalty(y, x, self.tau, self.reduction, impl=self.impl)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"
