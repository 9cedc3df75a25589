"""Small residual networks used by the demo, the tests and the examples.

Blocks are pre-activation residual blocks, ``y = shortcut(x) + r(x)``, and implement the
residual protocol ``forward_residual(x) -> (y, r)`` that TRGL's per-block penalty uses.
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """``y = shortcut(x) + r(x)`` with ``r = conv3×3(ReLU(BN(conv3×3(ReLU(BN(x))))))``.

    The shortcut is the identity, or a 1×1 convolution when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
        )
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def forward_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.branch(x)
        return self.shortcut(x) + r, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_residual(x)[0]


def digits_resnet(num_modules: int = 4, width: int = 32, num_classes: int = 10) -> list[nn.Module]:
    """An 8-block pre-activation ResNet for 1×8×8 images, cut into ``num_modules`` modules of whole blocks.

    Returns the modules (``nn.Sequential`` each), ready for :class:`llkern.LocalNet`; chained
    with a head they form the same network trained end to end.
    """
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, 1, 1, bias=False)]
    layers += [PreActBlock(width, width) for _ in range(4)]
    layers += [PreActBlock(width, 2 * width, stride=2)]
    layers += [PreActBlock(2 * width, 2 * width) for _ in range(3)]
    layers += [nn.Sequential(nn.BatchNorm2d(2 * width), nn.ReLU())]
    if not 1 <= num_modules <= 8:
        raise ValueError(f"digits_resnet: expected 1 <= num_modules <= 8, got {num_modules}")
    # Cut between blocks into near-equal counts; the stem goes with the first block, the
    # final BN-ReLU with the last.
    units = [nn.Sequential(layers[0], layers[1]), *layers[2:-2], nn.Sequential(layers[-2], layers[-1])]
    bounds = [round(i * len(units) / num_modules) for i in range(num_modules + 1)]
    return [nn.Sequential(*units[bounds[i]:bounds[i + 1]]) for i in range(num_modules)]


def digits_lenet(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 adapted to digits' 1×8×8 images (MIRACLE's compression demonstration model).

    LeNet-5's layout, 3×3 convolutions with padding (5×5 ones would leave nothing of an 8×8
    image): conv 1→6, ReLU, max-pool 2 (→ 6×4×4), conv 6→16, ReLU, max-pool 2 (→ 16×2×2),
    then 64 → 120 → 84 → classes with ReLUs. 19 k weights and biases.
    """
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


def digits_lenet_caffe(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5-Caffe (the LeNet-5 MIRACLE compresses on MNIST) adapted to digits' 1×8×8 images.

    Caffe's layout — 20 and 50 convolution filters of 5×5, each followed by 2×2 max-pooling, a
    500-unit hidden layer — with padding 2 so that the 5×5 filters keep an 8×8 (then 4×4)
    image: conv 1→20, max-pool (→ 20×4×4), conv 20→50, max-pool (→ 50×2×2), 200 → 500 → classes.
    ReLU after every layer but the last. 131 k weights and biases (MNIST's version: 431 k).
    """
    return nn.Sequential(
        nn.Conv2d(1, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(200, 500), nn.ReLU(), nn.Linear(500, num_classes))
