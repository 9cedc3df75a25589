"""MODA: collecting every ReLU output of a model.

See llkern/moda/__init__.py for the method.
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVE: list[ActivationCollector] = []


def record(x: torch.Tensor, name: str = "record") -> torch.Tensor:
    """Hand ``x`` (a functional ReLU's output) to the innermost active :class:`ActivationCollector`;
    returns ``x`` unchanged (and does nothing when no collector is active)."""
    if _ACTIVE:
        _ACTIVE[-1]._append(name, x)
    return x


def relu_modules(model: nn.Module) -> list[tuple[str, nn.ReLU]]:
    """The ``nn.ReLU`` modules of ``model`` with their qualified names, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ReLU)]


class ActivationCollector:
    """Context manager that records every ``nn.ReLU`` output of ``model`` (and :func:`record` calls).

    ``with ActivationCollector(model) as acts: model(x)`` leaves the outputs, with their graphs, in
    ``acts.activations`` (one entry per ReLU call, in call order) and the ReLUs' names in ``acts.names``;
    the hooks are removed on exit. An ``nn.ReLU(inplace=True)`` output is the tensor the ReLU wrote:
    it must not be modified in place afterwards if a loss is to be computed on it.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ActivationCollector: expected model to be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.activations: list[torch.Tensor] = []
        self.names: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _append(self, name: str, output: torch.Tensor) -> None:
        self.names.append(name)
        self.activations.append(output)

    def clear(self) -> None:
        self.activations, self.names = [], []

    def __enter__(self) -> ActivationCollector:
        if self._handles:
            raise RuntimeError("ActivationCollector: already active (collectors are not re-entrant)")
        for name, m in relu_modules(self.model):
            self._handles.append(m.register_forward_hook(
                lambda _m, _inp, out, name=name: self._append(name, out)))
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _ACTIVE.remove(self)

def unit_activations(t: torch.Tensor) -> torch.Tensor:
    """Per-sample unit activations ``(B, N)``: ``|t|`` for ``(B, N)``, the per-channel mean of ``|t|`` over
    the trailing (spatial) dimensions for ``(B, C, ...)``. 16-bit inputs are widened to float32."""
    if t.dim() < 2:
        raise ValueError(f"unit_activations: expected activations of shape (B, N) or (B, C, ...), "
                         f"got {list(t.shape)}")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.abs() if t.dim() == 2 else t.abs().flatten(2).mean(dim=2)
