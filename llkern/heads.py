"""Auxiliary heads: the small classifiers (and projection heads) that give each local module its loss."""

from __future__ import annotations

from collections.abc import Callable

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


def _pool(name: str, features: torch.Tensor) -> torch.Tensor:
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() not in (2, 3):
        raise ValueError(f"{name}: expected features of shape (B,C), (B,T,C) or (B,C,H,W), got {list(features.shape)}")
    return features


class ProjectionHead(nn.Module):
    """InfoPro-style projection head for contrastive local losses: mean-pool over H, W, then a
    two-layer MLP ``Linear(C, hidden) → ReLU → Linear(hidden, out_dim)``.

    ``(B,C,H,W)`` → ``(B, out_dim)``; ``(B,C)`` → ``(B, out_dim)``; ``(B,T,C)`` → ``(B,T, out_dim)``.
    ``forward`` returns the projections (not normalised: :func:`llkern.ops.similarity.supcon_loss`
    normalises them). Used by :class:`llkern.losses.SupervisedContrastive` on modules 0..K−2; see
    :func:`contrastive_heads`.

    Args:
        out_dim: dimension of the projections (default 128, as InfoPro and SupCon).
        in_channels: C; ``None`` infers it on the first call (``nn.LazyLinear``).
        hidden: width of the hidden layer (default 128).
    """

    def __init__(self, out_dim: int = 128, in_channels: int | None = None, hidden: int = 128) -> None:
        super().__init__()
        for arg, value in (("out_dim", out_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProjectionHead: expected {arg} to be an int >= 1, got {value!r}")
        if in_channels is not None and (isinstance(in_channels, bool) or not isinstance(in_channels, int)
                                        or in_channels < 1):
            raise ValueError(f"ProjectionHead: expected in_channels to be an int >= 1 or None, got {in_channels!r}")
        self.out_dim, self.hidden = out_dim, hidden
        first = nn.LazyLinear(hidden) if in_channels is None else nn.Linear(in_channels, hidden)
        self.mlp = nn.Sequential(first, nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(_pool("ProjectionHead", features))


def contrastive_heads(num_classes: int, num_modules: int, *, out_dim: int = 128,
                      hidden: int = 128) -> Callable[[int, torch.Size | None], nn.Module]:
    """A head factory for :class:`llkern.LocalNet` with :class:`llkern.losses.SupervisedContrastive`:
    a :class:`ProjectionHead` on modules 0..K−2 and a :class:`LinearHead` classifier on the last one
    (trained by the last module's task loss), so ``net(x)`` gives logits.

    ``LocalNet(blocks, heads=contrastive_heads(10, len(blocks)), losses=SupervisedContrastive(), ...)``.
    ``net(x, exit=k)`` for k < K−1 then returns head k's projections, not logits.

    Args:
        num_classes: classes of the last module's classifier.
        num_modules: K, the number of modules of the LocalNet.
        out_dim, hidden: of the projection heads.
    """
    if isinstance(num_modules, bool) or not isinstance(num_modules, int) or num_modules < 1:
        raise ValueError(f"contrastive_heads: expected num_modules to be an int >= 1, got {num_modules!r}")

    def factory(k: int, shape: torch.Size | None) -> nn.Module:
        channels = None if shape is None else feature_channels(shape)
        if k == num_modules - 1:
            return LinearHead(num_classes, channels)
        return ProjectionHead(out_dim, channels, hidden)

    return factory
