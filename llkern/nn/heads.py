"""Auxiliary heads: the small classifiers (and projection heads) that give each local module its loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
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
        low_memory: bfloat16 on a GPU: bfloat16 logits and d weight (see
            :func:`llkern.functional.aux_head_loss`), for language-model heads.
        impl: implementation of the fused loss (``"auto"``, ``"kernel"``, ``"reference"``).
    """

    def __init__(self, num_classes: int, in_channels: int | None = None, bias: bool = True,
                 impl: str = "auto", low_memory: bool = False) -> None:
        super().__init__()
        _check_int("LinearHead", "num_classes", num_classes)
        if in_channels is not None:
            _check_int("LinearHead", "in_channels", in_channels)
        self.num_classes = num_classes
        self.impl = impl
        self.low_memory = low_memory
        self.fc = nn.LazyLinear(num_classes, bias=bias) if in_channels is None else nn.Linear(
            in_channels, num_classes, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        elif features.dim() not in (2, 3):
            raise ValueError(f"LinearHead: expected features of shape (B,C), (B,T,C) or (B,C,H,W), "
                             f"got {list(features.shape)}")
        return self.fc(features)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, impl={self.impl!r}, low_memory={self.low_memory}"

    def loss(self, features: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0,
             ignore_index: int = -100, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of this head on ``features`` and the number of correct predictions (fused):
        ``F.cross_entropy(self(features), target, ...)`` without forming the logits, target ``(B,)`` (``(B,T)``
        for ``(B,T,C)`` features) of int64/int32 class indices; a batch whose targets are all ``ignore_index``
        gives 0 (see :func:`llkern.functional.aux_head_loss`)."""
        if isinstance(self.fc, nn.LazyLinear) and self.fc.has_uninitialized_params():
            with torch.no_grad():
                self(features[:1])  # sizes the lazy layer
        return aux_head_loss(features, self.fc.weight, self.fc.bias, target, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction=reduction, return_correct=True,
                             low_memory=self.low_memory, impl=self.impl)


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
    normalises them). Used by :class:`llkern.nn.losses.SupervisedContrastive` on modules 0..K−2; see
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
    """A head factory for :class:`llkern.LocalNet` with :class:`llkern.nn.losses.SupervisedContrastive`:
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


# --- heads of the published local-learning methods ----------------------------------------------------------------

FeatureShape = torch.Size | tuple[int, ...]
HeadFactory = Callable[[int, "torch.Size | None"], nn.Module]


def _check_int(name: str, arg: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected {arg} to be an int >= {minimum}, got {value!r}")
    return value


def _image_channels(name: str, shape: FeatureShape | None) -> int:
    """C of an image feature shape (B,C,H,W); a clear error where LocalNet had no example input."""
    if shape is None:
        raise ValueError(f"{name}: this head is sized from module k's feature shape, got None; "
                         "give LocalNet an example_input")
    if len(shape) != 4:
        raise ValueError(f"{name}: expected an image feature shape (B,C,H,W), got {list(shape)}")
    return int(shape[1])


def _flat(shape: FeatureShape | None) -> bool:
    """Whether a module's output is (B, C): pooled and flattened, as a network's last module ends."""
    return shape is not None and len(shape) == 2


def _check_image_features(name: str, features: torch.Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"{name}: expected features of shape (B,C,H,W), got {list(features.shape)}")


class MLPSRHead(nn.Module):
    """DGL's MLP-SR auxiliary classifier (Belilovsky et al., "Decoupled Greedy Learning of CNNs", ICML 2020).

    ``(B,C,H,W)`` → logits ``(B, classes)``, as the authors' code builds it (``eugenium/DGL``,
    ``auxiliary_nets_study/models.py``, ``aux_type='mlp-sr'``):

    1. spatial reduction: adaptive average pooling to ``(⌈H/reduce⌉, ⌈W/reduce⌉)`` (``reduce=4``);
    2. ``conv_layers`` (3) × [1×1 conv ``width → width`` (no bias) → BatchNorm2d → ReLU], an MLP over channels
       applied at every position (the first conv maps ``C → width``);
    3. adaptive average pooling to ``pool_size × pool_size`` (2×2), flattened to ``width·pool_size²``;
    4. ``mlp_layers`` (3) × [Linear ``width·pool_size² → width·pool_size²`` → BatchNorm1d → ReLU], then a linear
       classifier.

    Feature maps smaller than the pooled sizes (e.g. 1×1) are replicated by the adaptive pooling. The
    BatchNorm1d layers need more than one sample per batch in training mode.

    Args:
        num_classes: classes (or the output dimension).
        in_channels: C of the features.
        reduce: the spatial reduction factor of step 1 (4, as DGL; 1 skips it).
        conv_layers: number of 1×1 conv layers (3, as DGL).
        mlp_layers: hidden layers of the final MLP (3, as DGL; 0 gives a linear classifier on the pooled map).
        pool_size: side of the pooled map of step 3 (2, as DGL).
        width: channels of the 1×1 convs; None (default) keeps C, as DGL.
    """

    def __init__(self, num_classes: int, in_channels: int, *, reduce: int = 4, conv_layers: int = 3,
                 mlp_layers: int = 3, pool_size: int = 2, width: int | None = None) -> None:
        super().__init__()
        name = "MLPSRHead"
        _check_int(name, "num_classes", num_classes)
        _check_int(name, "in_channels", in_channels)
        self.reduce = _check_int(name, "reduce", reduce)
        _check_int(name, "conv_layers", conv_layers, minimum=0)
        _check_int(name, "mlp_layers", mlp_layers, minimum=0)
        self.pool_size = _check_int(name, "pool_size", pool_size)
        width = in_channels if width is None else _check_int(name, "width", width)
        self.num_classes = num_classes
        convs: list[nn.Module] = []
        for i in range(conv_layers):
            convs += [nn.Conv2d(in_channels if i == 0 else width, width, 1, bias=False), nn.BatchNorm2d(width),
                      nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        flat = (width if conv_layers else in_channels) * pool_size * pool_size
        mlp: list[nn.Module] = []
        for _ in range(mlp_layers):
            mlp += [nn.Linear(flat, flat), nn.BatchNorm1d(flat), nn.ReLU()]
        self.mlp = nn.Sequential(*mlp, nn.Linear(flat, num_classes))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, reduce={self.reduce}, pool_size={self.pool_size}"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_image_features("MLPSRHead", features)
        h, w = features.shape[-2:]
        if self.reduce > 1:
            features = F.adaptive_avg_pool2d(features, (-(-h // self.reduce), -(-w // self.reduce)))
        pooled = F.adaptive_avg_pool2d(self.convs(features), self.pool_size)
        return self.mlp(pooled.flatten(1))


def mlp_sr_heads(num_classes: int, *, reduce: int = 4, conv_layers: int = 3, mlp_layers: int = 3,
                 pool_size: int = 2, width: int | None = None) -> HeadFactory:
    """A head factory for :class:`llkern.LocalNet`: an :class:`MLPSRHead` on every module, sized from the
    module's feature shape (LocalNet needs an ``example_input``), and a :class:`LinearHead` on a module whose
    output is already pooled and flattened ``(B, C)`` (a CIFAR ResNet's last). Arguments as :class:`MLPSRHead`."""
    def factory(k: int, shape: torch.Size | None) -> nn.Module:
        if _flat(shape):  # a module that ends pooled and flattened (a network's last): its own classifier
            return LinearHead(num_classes, int(shape[-1]))
        return MLPSRHead(num_classes, _image_channels("mlp_sr_heads", shape), reduce=reduce,
                         conv_layers=conv_layers, mlp_layers=mlp_layers, pool_size=pool_size, width=width)

    return factory


class InfoProHead(nn.Module):
    """InfoPro's auxiliary head (Wang et al., "Revisiting Locally Supervised Learning", ICLR 2021; the
    ``1c2f`` head of the authors' code): conv3×3 → BatchNorm → ReLU → global average pool → flatten →
    Linear(·, hidden) → ReLU → Linear(hidden, num_classes).

    ``(B,C,H,W)`` → ``(B, num_classes)``. With :class:`llkern.nn.losses.SupervisedContrastive` the output is the
    projection (InfoPro: 128-d), with :class:`llkern.nn.losses.CrossEntropy` the logits.

    Args:
        num_classes: output dimension: the classes, or the projection dimension for a contrastive loss.
        in_channels: C of the features.
        conv_channels: channels of the conv; None (default) is InfoPro's rule ``max(C, min(2C, 64))``, which
            gives its ResNets' 16 → 32, 32 → 64 and 64 → 64.
        stride: stride of the conv; None (default) is InfoPro's: 2 where the conv widens, else 1.
        hidden: width of the hidden linear layer (128, InfoPro's ``feature_dim``).
    """

    def __init__(self, num_classes: int, in_channels: int, *, conv_channels: int | None = None,
                 stride: int | None = None, hidden: int = 128) -> None:
        super().__init__()
        name = "InfoProHead"
        _check_int(name, "num_classes", num_classes)
        _check_int(name, "in_channels", in_channels)
        _check_int(name, "hidden", hidden)
        if conv_channels is None:
            conv_channels = max(in_channels, min(2 * in_channels, 64))
        _check_int(name, "conv_channels", conv_channels)
        if stride is None:
            stride = 2 if conv_channels > in_channels else 1
        _check_int(name, "stride", stride)
        self.num_classes = num_classes
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, conv_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(conv_channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(conv_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_image_features("InfoProHead", features)
        return self.head(features)


def infopro_heads(num_classes: int, num_modules: int, *, out_dim: int | None = None, hidden: int = 128,
                  conv_channels: int | None = None, last_linear: bool = True) -> HeadFactory:
    """A head factory for :class:`llkern.LocalNet`, as InfoPro: an :class:`InfoProHead` on modules 0..K−2 and,
    by default, a :class:`LinearHead` (global average pool + linear: the network's own classifier) on the last.

    Args:
        num_classes: classes of the classifiers.
        num_modules: K.
        out_dim: output of the :class:`InfoProHead` s; None (default) gives ``num_classes`` (cross-entropy);
            128 for InfoPro's contrastive loss.
        hidden, conv_channels: of the :class:`InfoProHead` s.
        last_linear: a :class:`LinearHead` on the last module (default); False puts an :class:`InfoProHead`
            with ``num_classes`` outputs there.

    A module whose output is pooled and flattened ``(B, C)`` (a CIFAR ResNet's last ends so) gets a
    :class:`LinearHead` whatever these say: an :class:`InfoProHead` needs a feature map.
    """
    _check_int("infopro_heads", "num_modules", num_modules)

    def factory(k: int, shape: torch.Size | None) -> nn.Module:
        if _flat(shape):  # features already pooled and flattened (a network's last module): a linear head
            return LinearHead(num_classes if k == num_modules - 1 or out_dim is None else out_dim, int(shape[-1]))
        channels = _image_channels("infopro_heads", shape)
        if k == num_modules - 1:
            if last_linear:
                return LinearHead(num_classes, channels)
            return InfoProHead(num_classes, channels, conv_channels=conv_channels, hidden=hidden)
        return InfoProHead(num_classes if out_dim is None else out_dim, channels, conv_channels=conv_channels,
                           hidden=hidden)

    return factory


class ReconstructionDecoder(nn.Module):
    """InfoPro's decoder for the reconstruction loss: module features → an image of the network's input shape.

    ``(B,C,h,w)`` → bilinear interpolation to the image's ``(H, W)`` (``align_corners=True``, as InfoPro) →
    conv3×3 ``C → hidden`` → BatchNorm → ReLU → conv3×3 ``hidden → image channels`` → ``(B, C_img, H, W)``.
    InfoPro ends with a sigmoid and a binary cross-entropy against the image in [0, 1]; llkern's
    :class:`llkern.nn.losses.Reconstruction` compares against the (standardised) input with an MSE, so the
    output is linear: no sigmoid.

    Args:
        in_channels: C of the features.
        image_shape: the input image's shape, ``(C_img, H, W)`` or ``(B, C_img, H, W)``.
        hidden: channels of the hidden conv (12, InfoPro's).
        mode: interpolation, ``"bilinear"`` (default, InfoPro's) or ``"nearest"``.
    """

    def __init__(self, in_channels: int, image_shape: FeatureShape, *, hidden: int = 12,
                 mode: str = "bilinear") -> None:
        super().__init__()
        name = "ReconstructionDecoder"
        _check_int(name, "in_channels", in_channels)
        _check_int(name, "hidden", hidden)
        if len(image_shape) not in (3, 4) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                 for s in image_shape):
            raise ValueError(f"{name}: expected image_shape (C,H,W) or (B,C,H,W) of positive ints, "
                             f"got {list(image_shape)}")
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"{name}: expected mode 'bilinear' or 'nearest', got {mode!r}")
        self.image_shape = tuple(int(s) for s in image_shape[-3:])
        self.mode = mode
        channels = self.image_shape[0]
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, channels, 3, padding=1))

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, mode={self.mode!r}"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_image_features("ReconstructionDecoder", features)
        size = self.image_shape[1:]
        if features.shape[-2:] != size:
            kwargs = {"align_corners": True} if self.mode == "bilinear" else {}
            features = F.interpolate(features, size=size, mode=self.mode, **kwargs)
        return self.decoder(features)


def reconstruction_decoders(image_shape: FeatureShape, *, hidden: int = 12, mode: str = "bilinear") -> HeadFactory:
    """A decoder factory ``f(k, feature_shape)`` for :class:`llkern.nn.losses.Reconstruction`: a
    :class:`ReconstructionDecoder` from module k's features to ``image_shape`` (the network's input,
    ``(C,H,W)`` or ``(B,C,H,W)``, e.g. ``x.shape``). Arguments as :class:`ReconstructionDecoder`."""
    image_shape = tuple(image_shape)
    ReconstructionDecoder(1, image_shape, hidden=hidden, mode=mode)  # validates the arguments now

    def factory(k: int, shape: torch.Size | None) -> nn.Module:
        return ReconstructionDecoder(_image_channels("reconstruction_decoders", shape), image_shape, hidden=hidden,
                                     mode=mode)

    return factory


class TokenHead(nn.Module):
    """A head for transformer modules: LayerNorm over the features, then a :class:`LinearHead`.

    ``(B,T,C)`` → per-token logits ``(B,T, classes)`` (``pool=False``, targets ``(B,T)``), or the logits of the
    mean over tokens ``(B, classes)`` (``pool=True``, targets ``(B,)``). The LayerNorm matters because
    pre-norm blocks leave the residual stream unnormalised. :meth:`loss` computes the cross-entropy through the
    :class:`LinearHead`'s fused op (logits never formed), so :class:`llkern.nn.losses.CrossEntropy` uses it.

    Args:
        num_classes: classes.
        in_channels: C of the tokens.
        pool: mean over the T tokens before the classifier (default False: one prediction per token).
        bias: whether the linear layer has a bias.
        impl: implementation of the fused loss (``"auto"``, ``"kernel"``, ``"reference"``).
    """

    def __init__(self, num_classes: int, in_channels: int, *, pool: bool = False, bias: bool = True,
                 impl: str = "auto") -> None:
        super().__init__()
        _check_int("TokenHead", "num_classes", num_classes)
        _check_int("TokenHead", "in_channels", in_channels)
        self.num_classes, self.pool = num_classes, bool(pool)
        self.norm = nn.LayerNorm(in_channels)
        self.classifier = LinearHead(num_classes, in_channels, bias=bias, impl=impl)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, pool={self.pool}"

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the linear layer sees: the normalised tokens ``(B,T,C)``, or their mean ``(B,C)`` with ``pool``."""
        if tokens.dim() != 3:
            raise ValueError(f"TokenHead: expected features of shape (B,T,C), got {list(tokens.shape)}")
        z = self.norm(tokens)
        return z.mean(dim=1) if self.pool else z

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(tokens))

    def loss(self, tokens: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0,
             ignore_index: int = -100, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of this head on ``tokens`` and the number of correct predictions (fused)."""
        return self.classifier.loss(self.features(tokens), target, label_smoothing=label_smoothing,
                                    ignore_index=ignore_index, reduction=reduction)


def token_heads(num_classes: int, *, pool: bool = False) -> HeadFactory:
    """A head factory for :class:`llkern.LocalNet` on token features ``(B,T,C)``: a :class:`TokenHead` on every
    module, sized from the module's feature shape (LocalNet needs an ``example_input``)."""
    def factory(k: int, shape: torch.Size | None) -> nn.Module:
        if shape is None or len(shape) != 3:
            raise ValueError(f"token_heads: expected module {k}'s feature shape to be (B,T,C), got "
                             f"{None if shape is None else list(shape)} (give LocalNet an example_input)")
        return TokenHead(num_classes, int(shape[-1]), pool=pool)

    return factory


@torch.no_grad()
def feature_shapes(blocks: Sequence[nn.Module], example_input: torch.Tensor) -> list[torch.Size]:
    """The output shape of each module on ``example_input``, as :class:`llkern.LocalNet` passes them to a head
    factory (the blocks run in eval mode, so BatchNorm statistics stay untouched; modes are restored).

    Gives :class:`llkern.nn.losses.Reconstruction` the shapes its decoder factory needs.
    """
    shapes, h = [], example_input
    for block in blocks:
        modes = [(m, m.training) for m in block.modules()]  # each submodule's own mode, restored below
        block.eval()
        try:
            h = block(h)
        finally:
            for m, training in modes:
                m.training = training
        shapes.append(h.shape)
    return shapes
