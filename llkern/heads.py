"""Auxiliary heads: the small classifiers that give each local module its loss."""

from __future__ import annotations

import torch
from torch import nn

from llkern.ops.aux_head import aux_head_loss


def feature_channels(shape: torch.Size | tuple[int, ...]) -> int:
    """Channel count C of a feature shape ``(B,C,H,W)``, ``(B,T,C)`` or ``(B,C)``."""
    if len(shape) == 4:
        return shape[1]
    if len(shape) in (2, 3):
        return shape[-1]
    raise ValueError(f"expected a feature shape (B,C), (B,T,C) or (B,C,H,W), got {list(shape)}")


class LinearHead(nn.Module):
    """Mean-pool over H, W (image features), then a linear classifier.

    ``(B,C,H,W)`` → ``(B, classes)``; ``(B,C)`` → ``(B, classes)``; ``(B,T,C)`` → ``(B,T, classes)``
    (one prediction per token). ``forward`` returns logits (inference, early exit);
    :meth:`loss` computes the cross-entropy with the fused op, which never forms the logits and
    produces the gradients in its forward pass.

    Args:
        num_classes: number of classes.
        in_channels: C; ``None`` infers it on the first call (``nn.LazyLinear``).
        bias: whether the linear layer has a bias.
        impl: implementation of the fused loss (``"auto"``, ``"kernel"``, ``"reference"``).
    """

    def __init__(self, num_classes: int, in_channels: int | None = None, bias: bool = True,
                 impl: str = "auto") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LinearHead: expected num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.impl = impl
        self.fc = nn.LazyLinear(num_classes, bias=bias) if in_channels is None else nn.Linear(
            in_channels, num_classes, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        elif features.dim() not in (2, 3):
            raise ValueError(f"LinearHead: expected features of shape (B,C), (B,T,C) or (B,C,H,W), "
                             f"got {list(features.shape)}")
        return self.fc(features)

    def loss(self, features: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0,
             ignore_index: int = -100, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of this head on ``features`` and the number of correct predictions (fused)."""
        if isinstance(self.fc, nn.LazyLinear) and self.fc.has_uninitialized_params():
            with torch.no_grad():
                self(features[:1])  # sizes the lazy layer
        return aux_head_loss(features, self.fc.weight, self.fc.bias, target, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction=reduction, return_correct=True,
                             impl=self.impl)
