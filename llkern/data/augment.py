"""Batched data augmentation on device: CIFAR's random crop with padding and random horizontal flip.

The local-learning papers train on CIFAR with the augmentation of the ResNet paper: pad each 32×32 image
by 4 pixels on every side, take a random 32×32 crop of the padded image, and flip it left–right with
probability 1/2. torchvision does this per image on the CPU (``RandomCrop(32, padding=4)`` then
``RandomHorizontalFlip()``) inside a DataLoader; here it is one vectorised gather over a whole batch that
is already on its device (CPU or CUDA), so a trainer can augment each batch after moving it, with no
worker processes and no Python loop over samples.

Padding value. llkern's image data is normalised (``load_cifar10(..., normalize=True)``,
:func:`llkern.data.load_image_folder`), while torchvision pads the raw image and normalises afterwards:

* ``padding_mode="constant"`` with ``fill=None`` pads the normalised tensor with 0, i.e. with the
  per-channel *mean* colour;
* ``fill=black_fill(mean, std)`` pads with the normalised value of black (``-mean / std`` per channel),
  which is exactly torchvision's ``RandomCrop(32, padding=4)`` before ``Normalize`` — the most common
  published setting (pass ``CIFAR10_MEAN``, ``CIFAR10_STD`` for :func:`load_cifar10`'s normalisation);
* ``padding_mode="reflect"`` mirrors the image at its border without repeating the edge pixel (as
  ``torch.nn.functional.pad(..., mode="reflect")``); InfoPro's CIFAR script pads this way. Reflection
  commutes with a per-channel affine normalisation, so it is the same before or after normalising.

Randomness comes from ``torch.randint`` on the given ``torch.Generator`` (on the generator's device, then
moved to the batch's), or on the batch's device's default generator when none is given, so a run is
reproducible from the generator's seed. :func:`sample_crop_flip` draws the offsets and flips and
:func:`crop_flip` applies given ones; :func:`random_crop_flip` and :class:`RandomCropFlip` do both.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["RandomCropFlip", "black_fill", "crop_flip", "random_crop_flip", "sample_crop_flip"]

PaddingMode = Literal["constant", "reflect"]
Fill = float | Sequence[float] | torch.Tensor | None


# --- argument checks ---------------------------------------------------------------------------------------

def _check_batch(x: object, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: expected x to be a 4-D batch (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected x to have a floating dtype (normalised images), got {x.dtype}")
    return x


def _check_padding(padding: object, where: str) -> int:
    # bool is an int subclass, but padding=True is certainly a mistake (a swapped flip argument).
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral):
        raise TypeError(f"{where}: expected padding to be an int, got {type(padding).__name__}")
    if padding < 0:
        raise ValueError(f"{where}: expected padding >= 0, got {padding}")
    return int(padding)


def _check_flag(flip: object, where: str) -> bool:
    if not isinstance(flip, bool):
        raise TypeError(f"{where}: expected flip to be a bool, got {type(flip).__name__}")
    return flip


def _check_mode(padding_mode: object, where: str) -> str:
    if padding_mode not in ("constant", "reflect"):
        raise ValueError(f"{where}: expected padding_mode to be 'constant' or 'reflect', got {padding_mode!r}")
    return padding_mode


def _check_reflect_size(x: torch.Tensor, padding: int, padding_mode: str, where: str) -> None:
    # One reflection covers at most size - 1 pixels (the edge pixel is not repeated); torch's F.pad
    # has the same limit.
    height, width = x.shape[-2:]
    if padding_mode == "reflect" and padding >= min(height, width):
        raise ValueError(f"{where}: padding_mode='reflect' needs padding < H and padding < W, got padding={padding} "
                         f"for {height}×{width} images")


def _fill_spec(fill: object, where: str) -> float | tuple[float, ...] | None:
    """``fill`` checked and made plain: None, one float for every channel, or a tuple of per-channel floats."""
    if fill is None:
        return None
    if isinstance(fill, torch.Tensor):
        if fill.dim() > 1:
            raise ValueError(f"{where}: expected fill to be a number or one value per channel, got a tensor of "
                             f"shape {tuple(fill.shape)}")
        fill = fill.tolist()
    if isinstance(fill, numbers.Real) and not isinstance(fill, bool):
        return float(fill)
    if isinstance(fill, Sequence) and not isinstance(fill, str) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in fill):
        return tuple(float(v) for v in fill)
    raise TypeError(f"{where}: expected fill to be None, a number or a sequence of numbers (one per channel), "
                    f"got {fill!r}")


def _fill_values(fill: object, channels: int, where: str) -> tuple[float, ...] | None:
    """``fill`` as one float per channel, or None for zero padding (no per-channel tensor needed)."""
    spec = _fill_spec(fill, where)
    if spec is None or isinstance(spec, tuple):
        if spec is not None and len(spec) != channels:
            raise ValueError(f"{where}: fill has {len(spec)} values but the images have {channels} channels")
        return spec
    return (spec,) * channels


# --- the transform -----------------------------------------------------------------------------------------

def black_fill(mean: Sequence[float], std: Sequence[float]) -> tuple[float, ...]:
    """The normalised value of a black pixel, ``-mean / std`` per channel, for ``fill=``.

    Padding normalised images with it is padding the raw images with 0 and normalising afterwards, as
    torchvision's ``RandomCrop(size, padding=4)`` before ``Normalize(mean, std)`` does. ``mean`` and ``std``
    are the normalisation's per-channel statistics of images scaled to [0, 1] (e.g. ``CIFAR10_MEAN``,
    ``CIFAR10_STD``, or the ``mean``/``std`` of :func:`llkern.data.load_image_folder`'s result).
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std):
        raise ValueError(f"black_fill: mean has {len(mean)} channels but std has {len(std)}")
    if any(s == 0 for s in std):
        raise ValueError(f"black_fill: std must be non-zero, got {std}")
    return tuple(-m / s for m, s in zip(mean, std, strict=True))


def sample_crop_flip(batch_size: int, padding: int = 4, flip: bool = True, *,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crop offsets and flips for a batch, as ``(offsets, flips)``.

    ``offsets`` is ``(batch_size, 2)`` int64: each sample's (top, left) corner of its crop in the padded
    image, uniform in ``0..2*padding`` (``padding`` means no shift, as with no padding at all). ``flips`` is
    ``(batch_size,)`` bool, each True with probability 1/2, or None when ``flip`` is False (no draw is
    made then). The offsets are drawn first, then the flips, on ``generator``'s device when a generator is
    given (so the same seed gives the same draws whatever the batch's device), else on ``device``'s default
    generator; both tensors are returned on ``device`` (default: the CPU).
    """
    where = "sample_crop_flip"
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"{where}: expected batch_size to be an int, got {type(batch_size).__name__}")
    if batch_size < 0:
        raise ValueError(f"{where}: expected batch_size >= 0, got {batch_size}")
    padding, flip = _check_padding(padding, where), _check_flag(flip, where)
    device = torch.device("cpu") if device is None else torch.device(device)
    draw_on = generator.device if generator is not None else device
    if padding:
        offsets = torch.randint(0, 2 * padding + 1, (batch_size, 2), generator=generator, device=draw_on)
    else:  # every crop is the image itself: spend no draws
        offsets = torch.zeros(batch_size, 2, dtype=torch.int64, device=draw_on)
    flips = torch.randint(0, 2, (batch_size,), generator=generator, device=draw_on).bool() if flip else None
    # non_blocking only towards a GPU: a CPU → CUDA copy of a few bytes per sample need not stall the host,
    # but a CUDA → CPU one could return before the values arrive, and the CPU gather would read them early.
    quick = device.type != "cpu"
    offsets = offsets.to(device, non_blocking=quick)
    return offsets, (flips.to(device, non_blocking=quick) if flips is not None else None)


def _source_index(start: torch.Tensor, size: int, padding: int, padding_mode: str,
                  reverse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where each output row (or column) of every sample reads from in the *unpadded* image.

    Output pixel ``j`` of a crop starting at ``start`` in the padded image is padded pixel ``start + j``,
    i.e. image pixel ``start + j - padding``; a flipped crop reads ``size - 1 - j`` instead of ``j``. Reading
    the image directly, instead of building the padded batch, saves a full-size copy: constant padding
    becomes a mask of in-range sources, reflect padding a mirrored index. Returns the ``(B, size)`` index and,
    for constant padding with ``padding > 0``, the ``(B, size)`` in-range mask.
    """
    j = torch.arange(size, device=start.device)
    if reverse is not None:
        j = torch.where(reverse[:, None], size - 1 - j, j)
    src = start[:, None] + j - padding
    if padding == 0:
        return src, None
    if padding_mode == "reflect":
        # padding < size (checked), so one mirror at each end is enough: -1 → 1, size → size - 2.
        src = src.abs()
        return torch.where(src > size - 1, 2 * (size - 1) - src, src), None
    inside = (src >= 0) & (src < size)
    return src.clamp(0, size - 1), inside


def _crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None, padding: int,
               fill: tuple[float, ...] | None, padding_mode: str) -> torch.Tensor:
    """The unchecked core of :func:`crop_flip`: one gather (and one select for constant padding)."""
    batch, channels, height, width = x.shape
    rows, row_inside = _source_index(offsets[:, 0], height, padding, padding_mode, None)
    cols, col_inside = _source_index(offsets[:, 1], width, padding, padding_mode, flips)
    b = torch.arange(batch, device=x.device)
    # Gather in the input's memory layout so that channels_last stays channels_last (and contiguous input
    # gives contiguous output) without a copy afterwards.
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last:
        # (B, H, W, C) view: index batch, row, column; the channel dimension comes along contiguously.
        out = x.permute(0, 2, 3, 1)[b[:, None, None], rows[:, :, None], cols[:, None, :]]
        inside = None if row_inside is None else (row_inside[:, :, None] & col_inside[:, None, :])[..., None]
        fill_shape = (channels,)
    else:
        c = torch.arange(channels, device=x.device)
        out = x[b[:, None, None, None], c[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        inside = None if row_inside is None else (row_inside[:, :, None] & col_inside[:, None, :])[:, None]
        fill_shape = (1, channels, 1, 1)
    if inside is not None:
        value = 0.0 if fill is None else torch.tensor(fill, dtype=x.dtype, device=x.device).view(fill_shape)
        out = torch.where(inside, out, value)
    return out.permute(0, 3, 1, 2) if channels_last else out


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None = None, *, padding: int = 4,
              fill: Fill = None, padding_mode: PaddingMode = "constant") -> torch.Tensor:
    """Crop each image of a batch at given offsets of its padded version, then flip the marked ones.

    Args:
        x: ``(B, C, H, W)`` floating images on any device, any strides (channels_last input gives
            channels_last output; other input gives contiguous output).
        offsets: ``(B, 2)`` integer (top, left) corners in the image padded by ``padding`` on each side,
            each in ``0..2*padding``; :func:`sample_crop_flip` draws them.
        flips: ``(B,)`` bool, True to flip that sample's crop left–right; None flips nothing.
        padding: pixels of padding on each side.
        fill: constant padding value: None for 0, a number for every channel, or one number per channel
            (e.g. :func:`black_fill`); used only with ``padding_mode="constant"``.
        padding_mode: ``"constant"`` (pad with ``fill``) or ``"reflect"`` (mirror without repeating the edge;
            needs ``padding < H`` and ``padding < W``).

    Returns a new ``(B, C, H, W)`` tensor of ``x``'s dtype and device; differentiable with respect to ``x``.
    Raises ``TypeError``/``ValueError`` naming the offending argument. Checking that the offsets are in range
    reads them on the host (one device synchronisation); :func:`random_crop_flip` skips that.
    """
    where = "crop_flip"
    x = _check_batch(x, where)
    padding, padding_mode = _check_padding(padding, where), _check_mode(padding_mode, where)
    _check_reflect_size(x, padding, padding_mode, where)
    values = _fill_values(fill, x.shape[1], where)
    batch = x.shape[0]
    if not isinstance(offsets, torch.Tensor) or offsets.shape != (batch, 2) \
            or offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        desc = (f"{offsets.dtype} tensor of shape {tuple(offsets.shape)}" if isinstance(offsets, torch.Tensor)
                else type(offsets).__name__)
        raise ValueError(f"{where}: expected offsets to be an integer tensor of shape ({batch}, 2), got {desc}")
    if offsets.numel() and (bool((offsets < 0).any()) or bool((offsets > 2 * padding).any())):
        raise ValueError(f"{where}: offsets must be in 0..{2 * padding} (2 * padding), got values in "
                         f"{int(offsets.min())}..{int(offsets.max())}")
    if flips is not None and (not isinstance(flips, torch.Tensor) or flips.shape != (batch,)
                              or flips.dtype != torch.bool):
        desc = (f"{flips.dtype} tensor of shape {tuple(flips.shape)}" if isinstance(flips, torch.Tensor)
                else type(flips).__name__)
        raise ValueError(f"{where}: expected flips to be None or a bool tensor of shape ({batch},), got {desc}")
    offsets = offsets.to(device=x.device, dtype=torch.int64)
    flips = None if flips is None else flips.to(x.device)
    return _crop_flip(x, offsets, flips, padding, values, padding_mode)


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None, *, fill: Fill = None,
                     padding_mode: PaddingMode = "constant") -> torch.Tensor:
    """CIFAR's training augmentation on a batch: random crop of the ``padding``-padded images, random flip.

    Each sample gets its own crop offset, uniform over the ``(2*padding + 1)²`` positions, and is flipped
    left–right with probability 1/2 when ``flip``; all in one gather on ``x``'s device. ``generator``
    makes it reproducible (see :func:`sample_crop_flip` for the draws); ``fill`` and ``padding_mode`` are
    those of :func:`crop_flip` — the module docstring discusses which padding value matches torchvision.
    With ``padding=0`` and ``flip=False`` nothing changes and ``x`` itself is returned (no copy).

    Returns a ``(B, C, H, W)`` tensor like ``x`` (dtype, device, channels_last kept). Raises ``TypeError``
    for a non-tensor or non-floating ``x`` and a non-int ``padding``, ``ValueError`` for a tensor that is
    not 4-D, a negative ``padding``, or a ``fill`` of the wrong length.
    """
    where = "random_crop_flip"
    x = _check_batch(x, where)
    padding, flip = _check_padding(padding, where), _check_flag(flip, where)
    padding_mode = _check_mode(padding_mode, where)
    _check_reflect_size(x, padding, padding_mode, where)
    values = _fill_values(fill, x.shape[1], where)
    if padding == 0 and not flip:
        return x
    offsets, flips = sample_crop_flip(x.shape[0], padding, flip, generator=generator, device=x.device)
    return _crop_flip(x, offsets, flips, padding, values, padding_mode)


class RandomCropFlip(nn.Module):
    """:func:`random_crop_flip` as a module, for ``LocalTrainer.fit(..., transform=RandomCropFlip())``.

    Args:
        padding: pixels of padding on each side (CIFAR: 4).
        flip: also flip left–right with probability 1/2.
        generator: the ``torch.Generator`` to draw from (kept by reference, so its state advances with each
            call); None uses the default generator of the batch's device.
        fill: constant padding value (None: 0, i.e. the mean colour of normalised data; a number; or one
            number per channel, e.g. :func:`black_fill` of the normalisation's mean and std).
        padding_mode: ``"constant"`` or ``"reflect"``.

    The module has no parameters or buffers and augments whenever it is called, in training and eval mode
    alike: apply it to training batches only.
    """

    def __init__(self, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None, *,
                 fill: Fill = None, padding_mode: PaddingMode = "constant") -> None:
        super().__init__()
        where = "RandomCropFlip"
        self.padding = _check_padding(padding, where)
        self.flip = _check_flag(flip, where)
        self.padding_mode = _check_mode(padding_mode, where)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{where}: expected generator to be a torch.Generator or None, "
                            f"got {type(generator).__name__}")
        self.generator = generator
        # Kept as plain floats (no device): the channel count is only known per batch, where it is checked.
        self.fill = _fill_spec(fill, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return random_crop_flip(x, self.padding, self.flip, self.generator, fill=self.fill,
                                padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        fill = "" if self.fill is None or self.padding_mode != "constant" else f", fill={self.fill}"
        return f"padding={self.padding}, flip={self.flip}, padding_mode={self.padding_mode!r}{fill}"
