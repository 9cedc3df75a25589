"""Networks for digits' 1×8×8 images built for MODA's module extraction.

:func:`digits_cnn`: a plain CNN, a flat ``nn.Sequential`` of convolutions with BatchNorm and ReLU,
max-pools, a flatten and two linear layers. :func:`digits_resnet_moda`: a small post-activation ResNet of
:class:`ResidualReLUBlock` s, whose ReLUs (the one after each addition included) are ``nn.ReLU`` modules.
Every layer of both is one that :func:`llkern.moda.extract` can slice.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualReLUBlock", "digits_cnn", "digits_resnet_moda"]


def digits_cnn(width: int = 32, num_classes: int = 10, in_channels: int = 1, hidden: int | None = None
               ) -> nn.Sequential:
    """Four conv3×3-BN-ReLU layers and a two-layer classifier for 8×8 images (a small VGG).

    conv ``in_channels``→w, conv w→2w, max-pool 2 (→ 4×4), conv 2w→4w, conv 4w→4w, max-pool 2 (→ 2×2), flatten
    (16w features), linear 16w→``hidden`` (default 4w), ReLU, linear →``num_classes``.
    At ``width=32``: 307,562 parameters.
    """
    if width < 1:
        raise ValueError(f"digits_cnn: expected width >= 1, got {width}")
    hidden = 4 * width if hidden is None else hidden
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * w, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class ResidualReLUBlock(nn.Module):
    """A post-activation residual block whose every ReLU is an ``nn.ReLU`` module (so MODA's hooks see them):
    ``y = relu(branch(x) + shortcut(x))``.

    ``branch``: conv3×3 (stride) → BN → ReLU → conv3×3 → BN. ``shortcut``: the identity when the shape is
    kept (``stride == 1`` and ``in_channels == out_channels``), else a 1×1 convolution with the stride and a
    BN. ``relu``: the ReLU after the addition. :func:`llkern.moda.extract` slices this block.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ResidualReLUBlock: expected {arg} to be an int >= 1, got {value!r}")
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels))
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


def digits_resnet_moda(width: int = 32, num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A small post-activation ResNet for 8×8 images whose ReLUs are all modules (for MODA).

    Stem conv3×3 ``in_channels``→w, BN, ReLU; :class:`ResidualReLUBlock` w→w (identity shortcut);
    w→2w with stride 2 (→ 4×4, 1×1-projection shortcut); 2w→2w (identity shortcut); global average pool,
    flatten, linear 2w→``num_classes``. At ``width=32``: 151,274 parameters.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"digits_resnet_moda: expected width to be an int >= 1, got {width!r}")
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        ResidualReLUBlock(w, w),
        ResidualReLUBlock(w, 2 * w, stride=2),
        ResidualReLUBlock(2 * w, 2 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )
