"""Auxiliary heads: the small classifiers that give each local module its loss."""

from __future__ import annotations

import torch
from torch import nn


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial dims: ``(B,C,H,W)`` → ``(B,C)``; ``(B,T,C)`` → ``(B,C)``; ``(B,C)`` unchanged."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    if features.dim() == 2:
        return features
    raise ValueError(f"expected features of shape (B,C), (B,T,C) or (B,C,H,W), got {list(features.shape)}")


def feature_channels(shape: torch.Size | tuple[int, ...]) -> int:
    """Channel count of a feature shape as :func:`pool_features` sees it (C of (B,C,H,W), (B,T,C), (B,C))."""
    if len(shape) == 4:
        return shape[1]
    if len(shape) in (2, 3):
        return shape[-1]
    raise ValueError(f"expected a feature shape (B,C), (B,T,C) or (B,C,H,W), got {list(shape)}")


class LinearHead(nn.Module):
    """Mean-pool over the spatial dims, then a linear classifier: ``(B,C,H,W) | (B,T,C) | (B,C)`` → ``(B, classes)``.

    Args:
        num_classes: number of classes.
        in_channels: C; ``None`` infers it on the first call (``nn.LazyLinear``).
        bias: whether the linear layer has a bias.
    """

    def __init__(self, num_classes: int, in_channels: int | None = None, bias: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LinearHead: expected num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.fc = nn.LazyLinear(num_classes, bias=bias) if in_channels is None else nn.Linear(
            in_channels, num_classes, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(pool_features(features))
