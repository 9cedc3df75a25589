"""load_cifar10 on tiny files written in both distribution formats, and every error it promises."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from llkern.data.images import CIFAR10_MEAN, CIFAR10_STD, CifarUnpickler, RefusedGlobalError, load_cifar10

TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
RECORD = 3073


def _records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def _split(seed: int, train: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    # Batches of different sizes, so that a reader that mixes up their order or lengths fails.
    return [_records(n, seed + n) for n in ((2, 3, 1, 4, 2) if train else (3,))]


def write_binary(directory: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
        (directory / f"{name}.bin").write_bytes(records.tobytes())


def _sbs(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING: a Python 2 str


def py2_pickle(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A batch pickled as the distribution's files are: Python 2 cPickle, protocol 2, NumPy 1's globals.

    Python 3 cannot write this (it would encode bytes through _codecs.encode), so the opcodes are laid
    out by hand: {'batch_label': str, 'labels': [int], 'data': ndarray uint8 (N, 3072), 'filenames': [str]}.
    """
    n = len(labels)
    data = images.reshape(n, -1).tobytes()
    out = b"\x80\x02}(" + _sbs(b"batch_label") + _sbs(b"training batch 1 of 5")
    out += _sbs(b"labels") + b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    # _reconstruct(ndarray, (0,), 'b'), then __setstate__((1, (n, 3072), dtype('u1'), False, raw bytes)).
    out += _sbs(b"data") + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _sbs(b"b") + b"\x87R"
    out += b"(K\x01K" + bytes([n]) + b"M\x00\x0c\x86"
    out += b"cnumpy\ndtype\n" + _sbs(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + _sbs(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<I", len(data)) + data + b"tb"
    out += _sbs(b"filenames") + b"](" + b"".join(_sbs(b"img_%d.png" % i) for i in range(n)) + b"e"
    return out + b"u."


def write_python(directory: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]], protocol: int | None = None
                 ) -> None:
    """Python 2 layout by default; with ``protocol``, a Python 3 re-save (str keys, NumPy 2's globals)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        if protocol is None:
            blob = py2_pickle(images, labels)
        else:
            blob = pickle.dumps({"batch_label": "x", "labels": [int(v) for v in labels],
                                 "data": images.reshape(len(labels), -1), "filenames": []}, protocol=protocol)
        (directory / name).write_bytes(blob)


def _named(split: list[tuple[np.ndarray, np.ndarray]], train: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return dict(zip(TRAIN if train else ["test_batch"], split, strict=True))


def _expected(split: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.concatenate([s[0] for s in split])),
            torch.from_numpy(np.concatenate([s[1] for s in split])))


@pytest.mark.parametrize("fmt", ["binary", "python", "python-p4", "python-p5"])
@pytest.mark.parametrize("train", [True, False])
def test_round_trip_exact(tmp_path: Path, fmt: str, train: bool) -> None:
    split = _split(1, train)
    if fmt == "binary":
        write_binary(tmp_path / "cifar-10-batches-bin", _named(split, train))
    else:
        protocol = {"python": None, "python-p4": 4, "python-p5": 5}[fmt]
        write_python(tmp_path / "cifar-10-batches-py", _named(split, train), protocol)
    images, labels = load_cifar10(tmp_path, train=train)
    want_images, want_labels = _expected(split)
    assert images.dtype == torch.uint8 and images.shape == (len(want_labels), 3, 32, 32)
    assert labels.dtype == torch.int64
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_binary_layout_is_channel_major(tmp_path: Path) -> None:
    # One record written byte by byte: label, then the R plane, G plane, B plane, each row-major.
    record = bytearray([7]) + bytes(range(256)) * 12
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    (d / "test_batch.bin").write_bytes(bytes(record))
    images, labels = load_cifar10(tmp_path, train=False)
    assert labels.tolist() == [7]
    flat = torch.tensor(list(record[1:]), dtype=torch.uint8)
    assert torch.equal(images[0, 1, 2, 5], flat[1024 + 2 * 32 + 5])
    assert torch.equal(images.flatten(), flat)


def test_root_may_be_the_extracted_directory_and_binary_wins(tmp_path: Path) -> None:
    split = _split(2, False)
    write_binary(tmp_path / "cifar-10-batches-bin", _named(split, False))
    # Python files with other content: "auto" must take the binary ones (no unpickling needed).
    write_python(tmp_path / "cifar-10-batches-py", _named(_split(3, False), False))
    want = _expected(split)
    for root, dist in [(tmp_path, "auto"), (tmp_path / "cifar-10-batches-bin", "auto"),
                       (str(tmp_path / "cifar-10-batches-bin"), "binary")]:
        images, labels = load_cifar10(root, train=False, distribution=dist)
        assert torch.equal(images, want[0]) and torch.equal(labels, want[1])
    images, _ = load_cifar10(tmp_path, train=False, distribution="python")
    assert torch.equal(images, _expected(_split(3, False))[0])


def test_auto_falls_back_to_a_complete_python_split(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-bin").mkdir()  # extracted elsewhere, or an interrupted copy
    split = _split(6, False)
    write_python(tmp_path / "cifar-10-batches-py", _named(split, False))
    images, labels = load_cifar10(tmp_path, train=False)
    assert torch.equal(images, _expected(split)[0]) and torch.equal(labels, _expected(split)[1])
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin"):  # binary asked for: reported missing
        load_cifar10(tmp_path, train=False, distribution="binary")


def test_normalize(tmp_path: Path) -> None:
    split = _split(4, False)
    write_binary(tmp_path / "cifar-10-batches-bin", _named(split, False))
    images, _ = load_cifar10(tmp_path, train=False, normalize=True)
    raw = _expected(split)[0].double() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, ((raw - mean.double()) / std.double()).float())


# --- errors -------------------------------------------------------------------------------------------------

def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")


def test_no_data_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    for part in ("cifar-10-batches-bin", "data_batch_1.bin", "test_batch.bin", "cifar-10-batches-py", str(tmp_path),
                 "never downloads"):
        assert part in message


@pytest.mark.parametrize("fmt", ["binary", "python"])
def test_missing_batch_files(tmp_path: Path, fmt: str) -> None:
    split = _split(5, True)
    named = _named(split, True)
    del named["data_batch_3"], named["data_batch_5"]
    d = tmp_path / ("cifar-10-batches-bin" if fmt == "binary" else "cifar-10-batches-py")
    (write_binary if fmt == "binary" else write_python)(d, named)
    suffix = ".bin" if fmt == "binary" else ""
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert f"data_batch_3{suffix}, data_batch_5{suffix} in {d}" in message
    assert f"data_batch_1{suffix}" in message  # the full expected list is given too
    # The train files do not make a test split.
    with pytest.raises(FileNotFoundError, match=f"test_batch{suffix}"):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize("size", [0, RECORD - 1, 2 * RECORD + 5])
def test_binary_wrong_size(tmp_path: Path, size: int) -> None:
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    (d / "test_batch.bin").write_bytes(bytes(size))
    with pytest.raises(ValueError, match=f"test_batch.bin: {size} bytes is not a whole"):
        load_cifar10(tmp_path, train=False)


def test_binary_label_out_of_range(tmp_path: Path) -> None:
    images, labels = _records(3, 6)
    labels[1] = 10
    write_binary(tmp_path / "cifar-10-batches-bin", {"test_batch": (images, labels)})
    with pytest.raises(ValueError, match=r"label 10 of record 1 is out of range 0\.\.9"):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize("bad", [10, -1, 2**70])
def test_python_label_out_of_range(tmp_path: Path, bad: int) -> None:
    images, _ = _records(3, 7)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    blob = pickle.dumps({b"data": images.reshape(3, -1), b"labels": [1, bad, 2]}, protocol=4)
    (d / "test_batch").write_bytes(blob)
    with pytest.raises(ValueError, match="out of range"):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize("batch, message", [
    ({b"labels": [1]}, "no 'data' entry"),
    ({b"data": np.zeros((1, 3072), np.uint8)}, "no 'labels' entry"),
    ({b"data": np.zeros((1, 3000), np.uint8), b"labels": [1]}, r"shape \(N, 3072\)"),
    ({b"data": np.zeros((1, 3072), np.float32), b"labels": [1]}, "must be a uint8 array"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "1 labels for 2 images"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1.0]}, "list of ints"),
    ([1, 2, 3], "expected a pickled dict"),
])
def test_python_bad_content(tmp_path: Path, batch: object, message: str) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(ValueError, match=message):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize("cut", [0, 10, 200, 3000])
def test_python_truncated(tmp_path: Path, cut: int) -> None:
    images, labels = _records(2, 8)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(py2_pickle(images, labels)[:cut])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 python batch"):
        load_cifar10(tmp_path, train=False)


class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


class _Marker:
    # Another class global: even a harmless-looking one from the file's own module must be refused.
    pass


# Protocol 2 from Python 3 writes bytes through _codecs.encode (refused too), so there the exploit comes first
# with str keys, to show that os.system itself is refused; with 4 and 5 also after a valid array.
@pytest.mark.parametrize("protocol, first", [(2, True), (4, True), (5, True), (4, False), (5, False)])
def test_forbidden_global_is_refused_without_running(tmp_path: Path, protocol: int, first: bool) -> None:
    marker = tmp_path / "ran"
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    images, labels = _records(1, 9)
    exploit = {"x": _Exploit(f"touch {marker}")}
    valid = {"data": images.reshape(1, -1), "labels": [int(labels[0])]}
    payload = {**exploit, **valid} if first else {**valid, **exploit}
    blob = pickle.dumps(payload, protocol=protocol)
    assert b"system" in blob  # the pickle really names os.system (posix.system on Linux)
    (d / "test_batch").write_bytes(blob)
    with pytest.raises(RefusedGlobalError, match=r"refusing global (os|posix)\.system") as info:
        load_cifar10(tmp_path, train=False)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert str(d / "test_batch") in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("_codecs", "encode"), ("numpy", "load"),
                                          ("numpy.core.multiarray", "scalar"), (__name__, "_Marker"),
                                          ("subprocess", "Popen")])
def test_find_class_allows_only_numpy_array_globals(module: str, name: str) -> None:
    import io

    unpickler = CifarUnpickler(io.BytesIO(b""))
    with pytest.raises(RefusedGlobalError):
        unpickler.find_class(module, name)
    assert unpickler.find_class("numpy", "ndarray") is np.ndarray
    dtype = unpickler.find_class("numpy", "dtype")
    assert dtype("u1", False, True) is np.dtype("u1")  # the shared built-in, never a copy


_FORGED_DTYPE_SCRIPT = """
import os, pickle, sys
import numpy as np
try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

class ObjectDtype:  # a copy of the object dtype, its flags then set by BUILD (__setstate__)
    def __reduce__(self):
        return (np.dtype, ("O", False, True), (3, "|", None, None, None, -1, -1, 1))

class Reconstructed:  # an ndarray of that dtype holding 8 bytes from the file as an object pointer
    def __reduce__(self):
        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), ObjectDtype(), False, b"A" * 8))

class FromBuffer:
    def __reduce__(self):
        return (_frombuffer, (b"A" * 8, ObjectDtype(), (1,), "C"))

from llkern.data import load_cifar10
for kind in (Reconstructed, FromBuffer):
    root = os.path.join(sys.argv[1], kind.__name__, "cifar-10-batches-py")
    os.makedirs(root)
    payload = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"filenames": kind()}
    with open(os.path.join(root, "test_batch"), "wb") as f:
        f.write(pickle.dumps(payload, protocol=4))
    try:
        load_cifar10(os.path.dirname(root), train=False)
    except ValueError as error:
        print(kind.__name__, "refused:", error)
    else:
        print(kind.__name__, "loaded")
"""


def test_a_forged_object_dtype_is_refused(tmp_path: Path) -> None:
    # With the real numpy.dtype allowed, a file could copy the object dtype, set its flags, and make an array of
    # raw file bytes read as object pointers: freeing it crashed the interpreter (SIGSEGV). A subprocess, so that
    # a crash fails this test instead of ending the test run.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FORGED_DTYPE_SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("refused:" in line and "numpy.dtype" in line for line in lines), result.stdout


def test_bad_distribution_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distribution"):
        load_cifar10(tmp_path, distribution="tar")  # type: ignore[arg-type]
