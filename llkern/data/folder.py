"""A directory of one's own images, one folder per class (torchvision's ImageFolder layout), as tensors."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderData", "load_image_folder"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
_SPLIT_TEST_NAMES = ("test", "val")  # the held-out folder of a given split, in order of preference


class ImageFolderData(NamedTuple):
    """What :func:`load_image_folder` returns; unpacks as ``x, y, x_test, y_test, classes, mean, std``.

    ``x_train``/``x_test`` are ``(N, C, H, W)`` float32, ``y_train``/``y_test`` ``(N,)`` int64 class indices
    into ``classes`` (the class folder names, sorted). ``mean`` and ``std`` are the per-channel statistics
    that were applied, ``x = (pixels / 255 - mean) / std``: those of the training images when normalising,
    else 0 and 1. ``black_fill(mean, std)`` (llkern.data.augment) is then the value of a black pixel.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _visible(path: Path) -> bool:
    # Skip hidden entries: .git, .ipynb_checkpoints, macOS's ._* resource forks and the like.
    return not path.name.startswith(".")


def _subdirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _is_image(path: Path, extensions: tuple[str, ...]) -> bool:
    return path.suffix.lower() in extensions


def _class_images(class_dir: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The image files under a class folder, at any depth (as ImageFolder), in a fixed order."""
    images, skipped = [], []
    root, seen = Path(os.path.realpath(class_dir)), set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        # A linked folder is followed once, and never one that holds the class folder (a link back up read
        # the other classes' images again under this class, ~40 levels deep, into train and test alike).
        real = Path(os.path.realpath(dirpath))
        if real in seen or (real != root and root.is_relative_to(real)):
            dirnames[:] = []
            continue
        seen.add(real)
        # not into hidden folders; in name order, so that which link to a folder counts is fixed
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            if _visible(path):
                (images if _is_image(path, extensions) else skipped).append(path)
    if not images:
        other = (f"; it has {len(skipped)} other file(s), e.g. {sorted(skipped)[0].name}" if skipped
                 else "; it has no visible files (names starting with '.' are skipped)")
        raise ValueError(f"class folder {class_dir} holds no images (extensions {', '.join(extensions)}){other}")
    # Sorting the paths relative to the class folder fixes the order (os.walk's is the file system's).
    return sorted(images, key=lambda p: p.relative_to(class_dir).as_posix())


def _scan(directory: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    """Class name → image files, for a directory of class folders."""
    class_dirs = _subdirs(directory)
    if not class_dirs:
        loose = [p.name for p in directory.iterdir() if p.is_file() and _visible(p) and _is_image(p, extensions)]
        hint = (f"; found {len(loose)} image(s) directly in it (e.g. {sorted(loose)[0]}): put each class's images "
                f"in a folder of their own" if loose else "")
        raise ValueError(f"no class folders under {directory}: expected {directory}/CLASS_NAME/IMAGE, one folder per "
                         f"class, images with extensions {', '.join(extensions)}{hint}")
    return {d.name: _class_images(d, extensions) for d in class_dirs}


def _given_split(root: Path) -> tuple[Path, Path] | None:
    """``(train, test)`` folders when ``root`` is laid out as ``train/CLASS/…`` and ``test/CLASS/…`` (or ``val/``).

    ``train`` must itself hold folders, so that a dataset with classes named "train" and "test" (folders of
    images) still reads as classes. Other folders next to a given split are an error, not ignored.
    """
    train = root / "train"
    test = next((root / name for name in _SPLIT_TEST_NAMES if (root / name).is_dir()), None)
    if test is None or not train.is_dir() or not _subdirs(train):
        return None
    others = [d.name for d in _subdirs(root) if d.name not in ("train", *_SPLIT_TEST_NAMES)]
    if others:
        raise ValueError(f"{root} has train/ and {test.name}/ (a given split) but also folder(s) "
                         f"{', '.join(others)}: move them into train/ and {test.name}/, or use one folder per class "
                         f"directly under {root} for a random split")
    return train, test


def _image_size(image_size: object) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"load_image_folder: expected image_size to be None, a positive int or a (height, width) "
                         f"pair of positive ints, got {image_size!r}")
    return int(size[0]), int(size[1])


def _split_indices(labels: torch.Tensor, num_classes: int, test_fraction: float,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: each class puts round(n * test_fraction) of its n images in the test set, keeping >= 1."""
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        # Round half up (Python's round() goes to even); at most n - 1 so every class keeps a training image.
        n_test = min(len(members) - 1, math.floor(len(members) * test_fraction + 0.5))
        is_test[members[torch.randperm(len(members), generator=generator)[:n_test]]] = True
    # The original (class, file) order within each part: the split chooses, the trainer shuffles.
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def load_image_folder(root: str | os.PathLike[str], *, image_size: int | tuple[int, int] | None = None,
                      test_fraction: float = 0.2, seed: int = 0, normalize: bool = True,
                      mode: Literal["RGB", "L"] = "RGB",
                      extensions: Iterable[str] = IMAGE_EXTENSIONS) -> ImageFolderData:
    """Images in class folders, ``root/CLASS_NAME/*.png`` etc., as an :class:`ImageFolderData`.

    Args:
        root: a directory with one folder per class (the folder name is the class name; images may sit in
            sub-folders of it; hidden files and folders are skipped, other files than images are ignored),
            or with ``train/`` and ``test/`` (or ``val/``, used when there is no ``test/``) folders that
            each hold such class folders: a given split, used as is (``test_fraction`` and ``seed`` are then
            unused). The classes are the sorted folder names (of ``train/`` for a given split; a class
            folder in ``test/`` must also be one in ``train/``), numbered 0, 1, … in that order.
        image_size: ``(height, width)`` (or one int for square images) to resize every image to, bilinearly
            (Pillow's, antialiased when shrinking); None keeps the images' size, which must then be the same
            for all of them.
        test_fraction: for a random split, the fraction of each class's images held out for the test set
            (rounded half up per class, keeping at least one training image per class), in [0, 1). With 0
            the test tensors are empty.
        seed: fixes the random split (a ``torch.Generator`` seed); the same folder and seed give the same split.
        normalize: standardise each channel with the mean and std of the *training* images (pixels scaled to
            [0, 1]), applied to both parts, as :func:`load_cifar10` does with CIFAR's statistics; otherwise
            return the pixels scaled to [0, 1]. A channel that is constant over the training images keeps
            std 1 instead of dividing by 0.
        mode: ``"RGB"`` (3 channels; grayscale and palette images are expanded, an alpha channel is dropped)
            or ``"L"`` (1 channel, luminance). One mode for all images keeps the channel count fixed.
        extensions: the file name endings read as images (any case); Pillow must be able to decode them.
            A GIF or WebP animation contributes its first frame.

    Returns an :class:`ImageFolderData`: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (float32
    ``(N, C, H, W)`` and int64 ``(N,)``, each part in class order then file order), ``classes``, ``mean``,
    ``std``. Raises ``FileNotFoundError``/``NotADirectoryError`` for a missing ``root``; ``ValueError``
    naming the folder or file for no class folders, a class folder without images, an unreadable or
    corrupt image, images of different sizes without ``image_size``, or a ``test_fraction`` that leaves
    no test image; ``ImportError`` without Pillow.
    """
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("llkern.data.folder.load_image_folder needs Pillow: pip install pillow") from error
    size = _image_size(image_size)
    if not isinstance(test_fraction, numbers.Real) or isinstance(test_fraction, bool) \
            or not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"load_image_folder: expected test_fraction in [0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"load_image_folder: expected seed to be an int, got {type(seed).__name__}")
    if mode not in ("RGB", "L"):
        raise ValueError(f"load_image_folder: expected mode 'RGB' or 'L', got {mode!r}")
    if isinstance(extensions, str):  # a lone ".png" would otherwise be read as its characters
        extensions = (extensions,)
    extensions = tuple(sorted({(e if e.startswith(".") else "." + e).lower() for e in extensions}))
    if not extensions:
        raise ValueError("load_image_folder: extensions is empty")

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a directory")

    # First the file lists and labels (the split depends on names only, never on pixels), then the pixels.
    given = _given_split(root)
    if given is not None:
        train_classes, test_classes = _scan(given[0], extensions), _scan(given[1], extensions)
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            raise ValueError(f"{given[1]} has class folder(s) {', '.join(unknown)} that {given[0]} lacks: every test "
                             f"class needs training images")
        classes = tuple(train_classes)
        index = {name: i for i, name in enumerate(classes)}
        train_files = [(path, index[name]) for name, paths in train_classes.items() for path in paths]
        test_files = [(path, index[name]) for name, paths in test_classes.items() for path in paths]
    else:
        by_class = _scan(root, extensions)
        classes = tuple(by_class)
        files = [(path, label) for label, paths in enumerate(by_class.values()) for path in paths]
        labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        train_idx, test_idx = _split_indices(labels, len(classes), float(test_fraction), int(seed))
        if test_fraction > 0 and len(test_idx) == 0:
            raise ValueError(f"load_image_folder: test_fraction={test_fraction} leaves no test image ({len(files)} "
                             f"images in {len(classes)} classes under {root}; each class keeps at least one "
                             f"training image): use a larger test_fraction, more images, or test_fraction=0")
        train_files = [files[i] for i in train_idx.tolist()]
        test_files = [files[i] for i in test_idx.tolist()]

    resample = getattr(Image, "Resampling", Image).BILINEAR  # Image.Resampling since Pillow 9.1
    first: list[tuple[Path, tuple[int, int]]] = []  # the first image read and its (width, height)

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                # 16-bit grey (mode I;16, or I in Pillow before 10.1): convert() would clip every value above 255
                if image.mode.startswith("I;16") or image.mode == "I":
                    wide = np.asarray(image).astype(np.int64)
                    if wide.size and (wide.min() < 0 or wide.max() > 65535):
                        raise ValueError(f"{image.mode} pixels outside 0..65535 (32-bit integers) have no fixed "
                                         "range; save the images with 8 or 16 bits per channel")
                    image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))  # 0..65535 → 0..255, mode L
                elif image.mode == "F":
                    raise ValueError("F pixels (32-bit floats) have no fixed range; save the images with 8 or 16 "
                                     "bits per channel")
                image = image.convert(mode)  # decodes the pixels (the first frame of an animation)
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), resample)
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
            # OSError covers UnidentifiedImageError (not an image) and truncated files; Pillow's decoders
            # also raise SyntaxError, ValueError or EOFError on malformed data.
            raise ValueError(f"{path}: not a readable image ({type(error).__name__}: {error})") from error
        if not first:
            first.append((path, image.size))
        elif image.size != first[0][1]:
            (w0, h0), (w, h) = first[0][1], image.size
            raise ValueError(f"{path} is {h}×{w} (height×width) but {first[0][0]} is {h0}×{w0}: images of "
                             f"different sizes need image_size=(height, width) to resize them to")
        return pixels

    def stack(part: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        channels = 3 if mode == "RGB" else 1
        if not part:
            h, w = size if size is not None else (first[0][1][1], first[0][1][0])
            return torch.zeros(0, channels, h, w), torch.zeros(0, dtype=torch.int64)
        pixels = np.stack([read(path) for path, _ in part])  # (N, H, W, 3) or (N, H, W)
        images = torch.from_numpy(pixels.reshape(*pixels.shape[:3], channels)).permute(0, 3, 1, 2)
        return images.to(torch.float32).div_(255.0).contiguous(), torch.tensor([lab for _, lab in part])

    x_train, y_train = stack(train_files)
    x_test, y_test = stack(test_files)
    channels = x_train.shape[1]
    if normalize:
        # var_mean accumulates in float64 on the CPU; population std, as CIFAR10_STD.
        var, mean = torch.var_mean(x_train, dim=(0, 2, 3), correction=0)
        std = var.sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        x_train = (x_train - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        x_test = (x_test - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        mean_values, std_values = tuple(mean.tolist()), tuple(std.tolist())
    else:
        mean_values, std_values = (0.0,) * channels, (1.0,) * channels
    return ImageFolderData(x_train, y_train.to(torch.int64), x_test, y_test.to(torch.int64), classes,
                           mean_values, std_values)
