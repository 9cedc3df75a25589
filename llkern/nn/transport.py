"""``nn.Module`` forms of llkern's ops (the functional forms are in :mod:`llkern.functional`)."""

from __future__ import annotations

import torch
from torch import nn

from llkern.ops.transport import REDUCTIONS, transport_penalty


class TransportPenalty(nn.Module):
    """TRGL's transport penalty as a module: ``forward(y, x=None)`` is
    :func:`llkern.functional.transport_penalty` with this module's ``tau`` and ``reduction``."""

    def __init__(self, tau: float = 1.0, reduction: str = "mean", impl: str = "auto") -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"TransportPenalty: expected tau > 0, got {tau!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"TransportPenalty: expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
        self.tau, self.reduction, self.impl = tau, reduction, impl

    def forward(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return transport_penalty(y, x, self.tau, self.reduction, impl=self.impl)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"
