"""The binary header of a MIRACLE file (format version 2): every field in as few bytes as it needs,
because for a small model the header is a fair share of the file (the JSON of version 1 took
500 of a 2.8 kB file).

Layout after the 8-byte magic, integers little-endian, ``varint`` = unsigned LEB128:

* u8 format version, u8 generator code (1: ``philox4x32-10/box-muller-v1``), u32 seed;
* varint C (bits per block), varint block size, varint number of blocks;
* varint number of layers, then per layer a varint type code and its arguments (:data:`LAYERS`:
  ``u`` varint, ``s`` zigzag varint, ``p`` two varints, ``b`` one byte 0/1, ``d`` float64);
* float32 ρ of every coded tensor, in the model's parameter order (the weights and biases of
  its Conv2d and Linear layers: names and shapes follow from the layers);
* u8 dtype code of every uncompressed tensor (the other parameters, then the buffers, in the
  rebuilt model's order; their names and shapes follow from the layers too).

:func:`parse_header` rebuilds the version 1 dictionary (names, shapes, ρ, dtypes spelled out), so
the rest of the decoder reads one description.
"""

from __future__ import annotations

import math
import struct

import torch
from torch import nn

from llkern.compress.mean_kl import COMPRESSIBLE, MAX_WEIGHTS_PER_BIT
from llkern.random import GENERATOR_ID

__all__ = ["DTYPES", "GENERATORS", "LAYERS", "MAX_WEIGHTS_PER_BIT", "HeaderError", "build", "coded_and_uncompressed",
           "describe", "parse_header", "write_header"]

GENERATORS = {1: GENERATOR_ID}
# type code and (argument, kind) of every layer the header can describe
LAYERS: dict[str, tuple[int, tuple[tuple[str, str], ...]]] = {
    "Conv2d": (1, (("in_channels", "u"), ("out_channels", "u"), ("kernel_size", "p"), ("stride", "p"),
                   ("padding", "p"), ("dilation", "p"), ("groups", "u"), ("bias", "b"))),
    "Linear": (2, (("in_features", "u"), ("out_features", "u"), ("bias", "b"))),
    "BatchNorm2d": (3, (("num_features", "u"), ("eps", "d"), ("momentum", "d"), ("affine", "b"),
                        ("track_running_stats", "b"))),
    "BatchNorm1d": (4, (("num_features", "u"), ("eps", "d"), ("momentum", "d"), ("affine", "b"),
                        ("track_running_stats", "b"))),
    "ReLU": (5, ()),
    "MaxPool2d": (6, (("kernel_size", "p"), ("stride", "p"), ("padding", "p"), ("dilation", "p"),
                      ("ceil_mode", "b"))),
    "AvgPool2d": (7, (("kernel_size", "p"), ("stride", "p"), ("padding", "p"), ("ceil_mode", "b"),
                      ("count_include_pad", "b"))),
    "Flatten": (8, (("start_dim", "s"), ("end_dim", "s"))),
}
TYPE_OF_CODE = {code: kind for kind, (code, _) in LAYERS.items()}
DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.float16, 4: torch.bfloat16, 5: torch.int64}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPES.items()}


MAX_BLOCK_SIZE = 1 << 24  # far above any useful block


class HeaderError(ValueError):
    """The header cannot be read: cut short, or a value no encoder writes."""


# --- writing -----------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _argument(kind: str, value) -> bytes:
    if kind == "u":
        return _varint(int(value))
    if kind == "s":
        return _varint(2 * value if value >= 0 else -2 * value - 1)
    if kind == "p":
        pair = (value, value) if isinstance(value, int) else tuple(value)
        return _varint(pair[0]) + _varint(pair[1])
    if kind == "b":
        return bytes([bool(value)])
    return struct.pack("<d", math.nan if value is None else float(value))  # "d"; None (momentum) as NaN


def describe(model: nn.Module, where: str) -> list[dict]:
    """The layers of ``model`` as ``{"type", "args"}`` entries; ValueError for what the header cannot hold."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{where}: the file format describes nn.Sequential models only, got {type(model).__name__}")
    spec = []
    for i, layer in enumerate(model):
        kind = type(layer).__name__
        if kind not in LAYERS or type(layer) is not getattr(nn, kind):
            raise ValueError(f"{where}: layer {i} ({kind}) is not one the file format can describe: {sorted(LAYERS)}")
        unsupported = (kind == "Conv2d" and (isinstance(layer.padding, str) or layer.padding_mode != "zeros")) or \
            (kind == "MaxPool2d" and layer.return_indices) or \
            (kind == "AvgPool2d" and layer.divisor_override is not None)
        if unsupported:
            raise ValueError(f"{where}: layer {i} ({layer}) uses an option the file format cannot describe")
        args = {name: (layer.bias is not None if name == "bias" else getattr(layer, name)) for name, _ in
                LAYERS[kind][1]}
        spec.append({"type": kind, "args": args})
    return spec


def write_header(*, version: int, seed: int, bits: int, block_size: int, num_blocks: int, spec: list[dict],
                 rho: list[float], dtypes: list[torch.dtype]) -> bytes:
    out = bytearray([version, 1]) + struct.pack("<I", seed)
    out += _varint(bits) + _varint(block_size) + _varint(num_blocks) + _varint(len(spec))
    for entry in spec:
        code, arguments = LAYERS[entry["type"]]
        out += _varint(code)
        for name, kind in arguments:
            out += _argument(kind, entry["args"][name])
    out += struct.pack(f"<{len(rho)}f", *rho)
    out += bytes(CODE_OF_DTYPE[dtype] for dtype in dtypes)
    return bytes(out)


# --- reading -----------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise HeaderError("it ends inside the header")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value
            if shift > 63:
                raise HeaderError("a number in the header is too long")

    def argument(self, kind: str):
        if kind == "u":
            return self.varint()
        if kind == "s":
            z = self.varint()
            return z // 2 if z % 2 == 0 else -(z + 1) // 2
        if kind == "p":
            return (self.varint(), self.varint())
        if kind == "b":
            byte = self.take(1)[0]
            if byte > 1:
                raise HeaderError(f"a flag in the header is {byte}, not 0 or 1")
            return bool(byte)
        (value,) = struct.unpack("<d", self.take(8))
        return None if math.isnan(value) else value


def build(spec: list[dict]) -> nn.Sequential:
    """The model a layer description names, with fresh parameters."""
    try:
        return nn.Sequential(*(getattr(nn, entry["type"])(**entry["args"]) for entry in spec))
    except (TypeError, ValueError, RuntimeError) as error:
        raise HeaderError(f"its layers cannot be built ({error})") from error


def coded_and_uncompressed(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """The model's coded tensors (Conv2d/Linear weights and biases) and the rest (other parameters,
    then buffers), each in the model's order."""
    coded_names = {f"{module_name}.{param_name}" if module_name else param_name
                   for module_name, module in model.named_modules() if isinstance(module, COMPRESSIBLE)
                   for param_name, _ in module.named_parameters(recurse=False)}
    params = list(model.named_parameters())
    return ([(n, p) for n, p in params if n in coded_names],
            [(n, p) for n, p in params if n not in coded_names] + list(model.named_buffers()))


def parse_header(blob: bytes, offset: int) -> tuple[dict, int]:
    """The header starting at ``offset`` (after the magic), as a dictionary, and where it ends.

    Only the version and generator are checked here; the caller turns HeaderError into its message.
    """
    reader = _Reader(blob, offset)
    version, generator = reader.take(2)
    header = {"format_version": version, "generator": GENERATORS.get(generator, f"unknown code {generator}")}
    if version != 2 or generator not in GENERATORS:
        return header, reader.offset
    (header["seed"],) = struct.unpack("<I", reader.take(4))
    header["bits_per_block"], header["block_size"], header["num_blocks"] = (reader.varint() for _ in range(3))
    if not 1 <= header["bits_per_block"] <= 32 or not 1 <= header["block_size"] <= MAX_BLOCK_SIZE:
        raise HeaderError(f"C = {header['bits_per_block']} bits per block of {header['block_size']}")
    # (so the weights a file asks a decoder to make are bounded by its bitstream, blocks × C bits: a forged
    # header cannot turn 45 bytes into a 4096×4096 layer)
    if header["block_size"] > MAX_WEIGHTS_PER_BIT * header["bits_per_block"]:
        raise HeaderError(f"blocks of {header['block_size']} weights for {header['bits_per_block']} bits each: more "
                          f"than {MAX_WEIGHTS_PER_BIT} weights per coded bit")
    spec = []
    for _ in range(reader.varint()):
        code = reader.varint()
        if code not in TYPE_OF_CODE:
            raise HeaderError(f"unknown layer type code {code}")
        kind = TYPE_OF_CODE[code]
        spec.append({"type": kind, "args": {name: reader.argument(k) for name, k in LAYERS[kind][1]}})
    header["architecture"] = spec
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation, no draw from torch's RNG
        coded, uncompressed = coded_and_uncompressed(build(spec))
    rho = struct.unpack(f"<{len(coded)}f", reader.take(4 * len(coded)))
    if not all(r > 0 and math.isfinite(r) for r in rho):
        raise HeaderError("a prior standard deviation ρ is not a finite positive number")
    header["coded"] = [{"name": n, "shape": list(p.shape), "rho": r} for (n, p), r in zip(coded, rho, strict=True)]
    total = sum(p.numel() for _, p in coded)
    if total == 0:  # (decode then failed inside NumPy with "need at least one array to stack")
        raise HeaderError("the layers have no coded weights")
    if -(-total // header["block_size"]) != header["num_blocks"]:
        raise HeaderError(f"{header['num_blocks']} blocks of {header['block_size']} do not hold {total} weights")
    codes = reader.take(len(uncompressed))
    if any(code not in DTYPES for code in codes):
        raise HeaderError(f"unknown dtype code in {list(codes)}")
    header["uncompressed"] = [{"name": n, "dtype": DTYPES[code], "shape": list(t.shape)}
                              for (n, t), code in zip(uncompressed, codes, strict=True)]
    header["uncompressed_bytes"] = sum(math.prod(t.shape) * DTYPES[code].itemsize
                                       for (_, t), code in zip(uncompressed, codes, strict=True))
    return header, reader.offset
