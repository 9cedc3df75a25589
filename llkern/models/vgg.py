"""VGG-11 and VGG-16 with batch normalisation, for 32×32 inputs (CIFAR).

Simonyan & Zisserman's configurations A (11 layers) and D (16 layers) with BN after every convolution.
On 32×32 images the five 2×2 max-pools leave a 1×1 map, so the classifier is a single linear layer
on the 512 channels (the usual CIFAR adaptation; ImageNet's 4096-wide FC layers would hold most of the
parameters for no gain at this resolution).

The model is a flat ``nn.Sequential`` of units — ``conv_i`` (conv3×3-BN-ReLU), ``pool_i`` (max-pool) —
and ``head`` (global average pool, flatten, linear), so that a planner can cut it between any two units.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

# Output channels of each convolution at width 64; "M" is a 2×2 max-pool.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def vgg(config: str | Sequence[int | str] = "vgg16", *, num_classes: int = 10, in_channels: int = 3,
        width: int = 64) -> nn.Sequential:
    """A VGG with BN from a configuration name (``"vgg11"``, ``"vgg16"``) or a list of channels and ``"M"``.

    Args:
        config: the layer list; channel counts are given for ``width=64``.
        num_classes: classifier outputs.
        in_channels: image channels.
        width: channels of the first convolution (64 in the paper); every layer is scaled by ``width / 64``.

    The head's global average pool is the identity on 32×32 inputs (the map is 1×1 after five pools) and
    lets smaller configurations run on other sizes. The default is VGG-16: 14,724,042 parameters.
    """
    layers = VGG_CONFIGS[config] if isinstance(config, str) else tuple(config)
    units: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for i, item in enumerate(layers):
        if item == "M":
            units.append((f"pool_{i}", nn.MaxPool2d(2)))
            continue
        if not isinstance(item, int) or item <= 0:
            raise ValueError(f"vgg: config entries must be positive ints or 'M', got {item!r}")
        out_channels = max(1, item * width // 64)
        # No conv bias: BN's shift makes it redundant.
        units.append((f"conv_{i}", nn.Sequential(nn.Conv2d(channels, out_channels, 3, 1, 1, bias=False),
                                                 nn.BatchNorm2d(out_channels), nn.ReLU())))
        channels = out_channels
    units.append(("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))))
    model = nn.Sequential(OrderedDict(units))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def vgg11(*, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """VGG-11 with BN (configuration A) for 32×32 inputs: 9,228,362 parameters by default."""
    return vgg("vgg11", num_classes=num_classes, in_channels=in_channels, width=width)


def vgg16(*, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """VGG-16 with BN (configuration D) for 32×32 inputs: 14,724,042 parameters by default."""
    return vgg("vgg16", num_classes=num_classes, in_channels=in_channels, width=width)
