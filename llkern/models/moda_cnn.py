"""A plain (non-residual) CNN for digits' 1×8×8 images, for MODA's module extraction.

A flat ``nn.Sequential`` of convolutions with BatchNorm and ReLU, max-pools, a flatten and two linear
layers: every layer is one that :func:`llkern.moda.extract` can slice.
"""

from __future__ import annotations

from torch import nn


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
