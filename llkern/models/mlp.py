"""A multilayer perceptron for flat vectors (digits as 64-vectors, tabular data, MOLE's vector tasks)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


def mlp(*, in_features: int = 64, num_classes: int = 10, width: int = 256, depth: int = 3,
        widths: Sequence[int] | None = None, norm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """An MLP as a flat ``nn.Sequential``: ``flatten``, ``layer_0`` … ``layer_{L-1}``, ``head``.

    Each hidden layer is its own unit (Linear, optional BatchNorm1d, ReLU, optional dropout) so that a
    planner can cut between layers; the input is flattened first, so ``(B, 1, 8, 8)`` digits and
    ``(B, 64)`` vectors both work.

    Args:
        in_features: input size after flattening.
        num_classes: classifier outputs.
        width: hidden width, used when ``widths`` is not given.
        depth: number of hidden layers, used when ``widths`` is not given (0: a linear classifier).
        widths: explicit hidden widths, one per hidden layer (overrides ``width`` and ``depth``).
        norm: BatchNorm1d after every hidden linear layer.
        dropout: dropout probability after every hidden ReLU (0 disables it).

    The default (64 → 256 → 256 → 256 → 10) has 150,794 parameters.
    """
    hidden = list(widths) if widths is not None else [width] * depth
    if any(w <= 0 for w in hidden) or in_features <= 0:
        raise ValueError(f"mlp: widths and in_features must be positive, got {hidden} and {in_features}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp: dropout must be in [0, 1), got {dropout}")
    units: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    features = in_features
    for i, w in enumerate(hidden):
        # No bias before BN: BN's shift replaces it.
        layer: list[nn.Module] = [nn.Linear(features, w, bias=not norm)]
        if norm:
            layer.append(nn.BatchNorm1d(w))
        layer.append(nn.ReLU())
        if dropout > 0:
            layer.append(nn.Dropout(dropout))
        units.append((f"layer_{i}", nn.Sequential(*layer)))
        features = w
    units.append(("head", nn.Linear(features, num_classes)))
    return nn.Sequential(OrderedDict(units))
