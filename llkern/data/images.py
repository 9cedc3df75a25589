"""Datasets for accuracy runs without a network: digits (ships with scikit-learn), CIFAR-10 from local files."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """scikit-learn's 8×8 handwritten digits, as ``(x_train, y_train, x_test, y_test)``.

    Images are ``(N, 1, 8, 8)`` float32 scaled to [0, 1] then standardised with the training
    mean and std; labels are int64 in 0..9. The split is stratified and fixed by ``seed``.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("llkern.data.images.load_digits needs scikit-learn: pip install scikit-learn") from error
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[train_idx], (x_test - mean) / std, y[test_idx]


# --- CIFAR-10 from local files ----------------------------------------------------------------------------

CIFAR10_NUM_CLASSES = 10
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the 50,000 training images scaled to [0, 1] (the std over all
# pixels of a channel; the often-copied (0.2023, 0.1994, 0.2010) is an average of per-image stds).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_RECORD_BYTES = 1 + 3 * 32 * 32  # binary distribution: 1 label byte, then R, G, B planes of 32×32, row-major
_BIN_DIR, _PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _cifar_files(distribution: str, train: bool) -> list[str]:
    suffix = ".bin" if distribution == "binary" else ""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    return [name + suffix for name in names]


def _builtin_dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    """``numpy.dtype`` as a CIFAR pickle may call it: a built-in boolean, integer or float dtype, and the shared
    one, never a copy. (The real ``numpy.dtype`` let a file copy the object dtype and set its flags through
    ``__setstate__``: an ndarray then held raw file bytes as object pointers, and freeing it crashed Python.
    The built-in dtypes are singletons whose ``__setstate__`` changes nothing.)"""
    if not isinstance(spec, (str, bytes)):
        raise pickle.UnpicklingError(f"refusing numpy.dtype({spec!r}): a CIFAR-10 batch names dtypes by string")
    try:
        dtype = np.dtype(spec.decode("latin-1") if isinstance(spec, bytes) else spec)
    except TypeError as error:
        raise pickle.UnpicklingError(f"refusing numpy.dtype({spec!r}): {error}") from None
    if dtype.kind not in "biuf" or not dtype.isbuiltin:
        raise pickle.UnpicklingError(f"refusing numpy.dtype({spec!r}): a CIFAR-10 batch holds only built-in "
                                     "boolean, integer and float arrays")
    return dtype


def _cifar_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled CIFAR-10 python batch may name: what NumPy needs to rebuild an ndarray.

    The batches hold a dict of bytes/str, lists of ints and bytes, and one uint8 ndarray. Plain containers
    and strings have their own pickle opcodes and need no global; an ndarray pickled with protocol 2–4
    (the distribution's files were written by Python 2 with protocol 2) is rebuilt by
    ``numpy.core.multiarray._reconstruct(numpy.ndarray, shape, dtype)`` plus ``numpy.dtype(...)`` and
    ``__setstate__`` with the raw bytes; with protocol 5 by ``numpy.core.numeric._frombuffer`` and
    ``numpy.dtype``. NumPy 2 writes ``numpy._core`` where NumPy 1 wrote ``numpy.core``; both spellings
    map to the same functions, resolved here from ``numpy._core`` when it exists so that the deprecated
    ``numpy.core`` alias is never imported. Each of these only allocates an array from given bytes;
    ``numpy.dtype`` is :func:`_builtin_dtype`, which returns only NumPy's shared built-in numeric dtypes.
    Everything else — ``os.system``, ``builtins.eval``, ``_codecs.encode`` (which Python 3 uses for bytes
    in protocol 2), any other class — is refused before it is looked up, so no code from the file runs.
    """
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _builtin_dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle named a global that :class:`CifarUnpickler` does not allow; nothing from the file was run."""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10 python batches that resolves only the NumPy globals of :func:`_cifar_globals`.

    ``find_class`` is the single place where a pickle turns a name into a callable (GLOBAL, STACK_GLOBAL,
    INST, OBJ and the copyreg extension opcodes all go through it), and persistent ids are refused by the
    base class, so a file can build nothing but containers, strings, numbers and ndarrays.
    """

    _allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobalError(
                f"refusing global {module}.{name}: a CIFAR-10 python batch may only reference NumPy's array "
                f"reconstruction globals ({', '.join(sorted(f'{m}.{n}' for m, n in self._allowed))})") from None


def _check_labels(labels: np.ndarray, path: Path) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= CIFAR10_NUM_CLASSES))
    if bad.size:
        raise ValueError(f"{path}: label {int(labels[bad[0]])} of record {int(bad[0])} is out of range "
                         f"0..{CIFAR10_NUM_CLASSES - 1} ({bad.size} such records)")


def _read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    if size == 0 or size % _RECORD_BYTES:
        raise ValueError(f"{path}: {size} bytes is not a whole, non-zero number of {_RECORD_BYTES}-byte records "
                         f"(1 label byte + 3072 image bytes; a standard batch is 10000 records, "
                         f"{10000 * _RECORD_BYTES} bytes)")
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, _RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    _check_labels(labels, path)
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _read_cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        try:
            # encoding="bytes": the files were pickled by Python 2, whose str (keys, the array's raw data)
            # must come back as bytes, not be decoded as text.
            batch = CifarUnpickler(f, encoding="bytes").load()
        except RefusedGlobalError as error:
            raise RefusedGlobalError(f"{path}: {error}") from None
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({error})") from error
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as error:
            # Truncated or malformed pickles surface as any of these (NumPy's __setstate__ raises ValueError
            # on a short buffer).
            raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({type(error).__name__}: {error})") \
                from error
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")

    def field(key: str) -> object:
        for k in (key.encode(), key):  # Python 2 files have bytes keys; a Python 3 re-save has str keys
            if k in batch:
                return batch[k]
        raise ValueError(f"{path}: the batch has no {key!r} entry (keys: {sorted(map(repr, batch))})")

    data, labels = field("data"), field("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if isinstance(labels, np.ndarray):
        integral = labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
    else:
        integral = isinstance(labels, list) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels)
    if not integral:
        raise ValueError(f"{path}: 'labels' must be a list of ints")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except OverflowError:  # a Python int beyond int64: certainly not a class index
        raise ValueError(f"{path}: a label is out of range 0..{CIFAR10_NUM_CLASSES - 1}") from None
    if label_array.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {label_array.shape[0]} labels for {data.shape[0]} images")
    _check_labels(label_array, path)
    return data.reshape(-1, 3, 32, 32), label_array


def _find_cifar_dir(root: Path, distribution: str, train: bool) -> tuple[Path, str]:
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {root} does not exist (llkern never downloads data)")
    kinds = ("binary", "python") if distribution == "auto" else (distribution,)
    # The extracted archive's directory under root, or root itself when it is that directory.
    candidates = [(root / (_BIN_DIR if kind == "binary" else _PY_DIR), kind) for kind in kinds]
    candidates = [(d, kind) for d, kind in candidates if d.is_dir()]
    candidates += [(root, kind) for kind in kinds
                   if root.name == (_BIN_DIR if kind == "binary" else _PY_DIR)
                   or any((root / name).exists() for name in _cifar_files(kind, True) + _cifar_files(kind, False))]
    # First the candidate that holds the whole split (an empty or partial binary directory must not hide
    # a complete python one); else the first, so that its missing files are reported.
    for d, kind in candidates:
        if all((d / name).is_file() for name in _cifar_files(kind, train)):
            return d, kind
    if candidates:
        return candidates[0]
    expected = " or ".join(
        f"{root / (_BIN_DIR if kind == 'binary' else _PY_DIR)}/{{{', '.join(_cifar_files(kind, True))}, "
        f"{_cifar_files(kind, False)[0]}}} ({kind} distribution)" for kind in kinds)
    raise FileNotFoundError(f"no CIFAR-10 data under {root}: expected {expected}. llkern never downloads data: "
                            f"get the archive from {_SOURCE} and extract it into {root}")


def load_cifar10(root: str | os.PathLike[str], *, train: bool = True, normalize: bool = False,
                 distribution: Literal["auto", "binary", "python"] = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from local files, as ``(images, labels)``; nothing is ever downloaded.

    Args:
        root: the directory holding the extracted archive (``cifar-10-batches-bin/`` or
            ``cifar-10-batches-py/``), or that extracted directory itself.
        train: the 50,000 training images (``data_batch_1`` … ``data_batch_5``, in order) or the 10,000
            test images (``test_batch``).
        normalize: return float32 images scaled to [0, 1] and standardised per channel with
            :data:`CIFAR10_MEAN` and :data:`CIFAR10_STD`; otherwise the raw uint8 pixels.
        distribution: ``"binary"`` (``*.bin``: records of 1 label byte + 3072 image bytes, the R, G and B
            32×32 planes), ``"python"`` (pickled dicts, read through :class:`CifarUnpickler`, which refuses
            every global but NumPy's array reconstruction), or ``"auto"``: the binary files when the split
            is complete there, since they need no unpickling, else the python ones.

    Returns ``images`` ``(N, 3, 32, 32)`` (uint8, or float32 if ``normalize``) and ``labels`` ``(N,)`` int64
    in 0..9. Raises ``FileNotFoundError`` naming the expected files and directory when data is missing,
    ``ValueError`` for a file of the wrong size or content or a label out of range, and
    :class:`RefusedGlobalError` (a ``pickle.UnpicklingError``) for a python batch that names a forbidden global.
    """
    if distribution not in ("auto", "binary", "python"):
        raise ValueError(f"distribution must be 'auto', 'binary' or 'python', got {distribution!r}")
    directory, kind = _find_cifar_dir(Path(root), distribution, train)
    names = _cifar_files(kind, train)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 ({kind} distribution, {'train' if train else 'test'} split): missing "
                                f"{', '.join(missing)} in {directory} (expected {', '.join(names)}). "
                                f"llkern never downloads data: get the archive from {_SOURCE}")
    read = _read_cifar_binary if kind == "binary" else _read_cifar_python
    parts = [read(directory / name) for name in names]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        images = (images.to(torch.float32) / 255.0 - mean) / std
    return images, labels
