"""MIRACLE coding of a trained :class:`llkern.compression.MeanKLNetwork`, and its file format.

Encoding: for every coding block b, the 2^C candidates ``w_k = ρ ε_k`` are drawn from the prior
N(0, ρ²) with llkern's Philox stream ``(seed, b)`` (draw ``k · block_size + j`` for weight j;
docs/random.md), scored by ``log q(w_k) − log p(w_k)`` under the trained posterior, and one index
per block is kept: the best (``choose="argmax"``) or one sampled from ``softmax_k(score)``
(``"sample"``, by the Gumbel-max trick on the stream ``(seed, b + num_blocks)``). Candidates are
generated and scored a chunk of blocks at a time, never all at once.

The file (no pickle), every integer little-endian:
``MAGIC`` (8 bytes) | u32 header length | header (UTF-8 JSON, zlib-compressed: for a small model the
header is a fair share of the file) | packed C-bit indices | raw bytes of the uncompressed tensors |
u32 CRC-32 of everything before it. The header holds the format
version, generator id, seed, C, block size, number of blocks, the architecture (an
``nn.Sequential`` of known layers, with their arguments), the coded tensors' names, shapes and ρ,
and the uncompressed tensors' names, dtypes and shapes (BatchNorm statistics and the like).
:func:`decode` rebuilds an ordinary ``nn.Module`` from the file alone.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from llkern.compression import MeanKLNetwork, coding_permutation
from llkern.random import GENERATOR_ID, normals, stream_bits
from llkern.reference.mean_kl import mean_kl_reference

__all__ = ["FORMAT_VERSION", "MAGIC", "EncodeReport", "chosen_weights", "decode", "encode", "read"]

MAGIC = b"LLKMIRA\x00"
FORMAT_VERSION = 1
CHOICES = ("argmax", "sample")
# Layers the architecture spec can name, with the constructor arguments it records.
LAYERS = {
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
    "Linear": ("in_features", "out_features"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "ReLU": (),
    "MaxPool2d": ("kernel_size", "stride", "padding"),
    "AvgPool2d": ("kernel_size", "stride", "padding"),
    "Flatten": ("start_dim", "end_dim"),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass
class EncodeReport:
    """What :func:`encode` wrote: file size, the float32 size of the coded tensors, and the ratio."""

    path: Path
    file_bytes: int
    float32_bytes: int
    num_blocks: int
    bits_per_block: int

    @property
    def ratio(self) -> float:
        return self.float32_bytes / self.file_bytes


def _architecture(model: nn.Module) -> list[dict]:
    if not isinstance(model, nn.Sequential):
        raise ValueError("llkern.miracle.encode: the file format describes nn.Sequential models only, got "
                         f"{type(model).__name__}")
    spec = []
    for i, layer in enumerate(model):
        kind = type(layer).__name__
        if kind not in LAYERS or type(layer) is not getattr(nn, kind):
            raise ValueError(f"llkern.miracle.encode: layer {i} ({kind}) is not one the file format can describe: "
                             f"{sorted(LAYERS)}")
        args = {name: getattr(layer, name) for name in LAYERS[kind]}
        if kind in ("Conv2d", "Linear"):
            args["bias"] = layer.bias is not None
        spec.append({"type": kind, "args": args})
    return spec


def _build(spec: list[dict]) -> nn.Sequential:
    layers = []
    for i, entry in enumerate(spec):
        kind = entry.get("type")
        if kind not in LAYERS:
            raise ValueError(f"llkern.miracle.decode: layer {i} has unknown type {kind!r}")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["args"].items()}
        layers.append(getattr(nn, kind)(**args))
    return nn.Sequential(*layers)


def _candidate_scores(mu, sigma, rho, seed, first_block, bits, block_size) -> np.ndarray:
    """Scores (blocks, 2^C) of this chunk's candidates: log q − log p summed over each block."""
    blocks = mu.shape[0]
    k = np.arange(2**bits, dtype=np.uint64)[:, None] * np.uint64(block_size) + np.arange(block_size, dtype=np.uint64)
    scores = np.empty((blocks, 2**bits))
    for i in range(blocks):
        eps = normals(seed, first_block + i, k)  # (2^C, block_size)
        w = rho[i] * eps
        log_q = -0.5 * ((w - mu[i]) / sigma[i]) ** 2 - np.log(sigma[i])
        log_p = -0.5 * eps**2 - np.log(rho[i])
        scores[i] = (log_q - log_p).sum(axis=1)
    return scores


def _pack(indices: np.ndarray, bits: int) -> bytes:
    as_bits = ((indices[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)  # least significant first
    return np.packbits(as_bits, bitorder="little").tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    as_bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count * bits]
    return (as_bits.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def encode(net: MeanKLNetwork, path: str | Path, *, choose: str = "argmax", chunk_blocks: int = 64,
           progress: bool = True) -> EncodeReport:
    """Code ``net``'s weights (one C-bit index per block) and write the file to ``path``.

    Args:
        net: a trained :class:`MeanKLNetwork` whose model is an ``nn.Sequential`` of Conv2d, Linear,
            BatchNorm, ReLU, pooling and Flatten layers.
        path: where to write.
        choose: ``"argmax"`` (the best candidate) or ``"sample"`` (MIRACLE's choice by the scores).
        chunk_blocks: blocks scored together.
        progress: a progress bar over the blocks.
    """
    if not isinstance(net, MeanKLNetwork):
        raise TypeError(f"llkern.miracle.encode: expected a MeanKLNetwork, got {type(net).__name__}")
    if choose not in CHOICES:
        raise ValueError(f"llkern.miracle.encode: expected choose to be one of {CHOICES}, got {choose!r}")
    spec = _architecture(net.model)
    with torch.no_grad():
        zeros = torch.zeros_like(net.theta, dtype=torch.float64)
        rho = net.rho_blocks().double()
        _, mu, sigma = mean_kl_reference(net.theta, net.gamma, zeros, rho, zeros, net.kappa_block, net.delta)
    mu, sigma, rho = mu.numpy(), sigma.numpy(), rho.numpy()
    bits, block_size, num_blocks = net.bits_per_block, net.block_size, net.num_blocks
    indices = np.empty(num_blocks, dtype=np.int64)
    for first in tqdm(range(0, num_blocks, chunk_blocks), desc="MIRACLE encode", unit="chunk", disable=not progress):
        last = min(first + chunk_blocks, num_blocks)
        scores = _candidate_scores(mu[first:last], sigma[first:last], rho[first:last], net.seed, first, bits,
                                      block_size)
        if choose == "sample":  # Gumbel-max: argmax of score + Gumbel noise = a draw from softmax(score)
            for i in range(last - first):
                x0, _ = stream_bits(net.seed, num_blocks + first + i, np.arange(2**bits, dtype=np.uint64))
                u = ((x0 >> np.uint32(8)).astype(np.float64) + 0.5) * 2.0**-24
                scores[i] += -np.log(-np.log(u))
        indices[first:last] = scores.argmax(axis=1)
    params = dict(net.model.named_parameters())
    buffers = dict(net.model.named_buffers())
    raw, uncompressed = bytearray(), []
    for name, tensor in [*((n, p) for n, p in params.items() if n not in net.names), *buffers.items()]:
        data = tensor.detach().cpu().contiguous()
        dtype = str(data.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"llkern.miracle.encode: cannot store {name} of dtype {data.dtype}")
        uncompressed.append({"name": name, "dtype": dtype, "shape": list(data.shape)})
        raw += data.reshape(-1).view(torch.uint8).numpy().tobytes()
    header = {
        "format_version": FORMAT_VERSION, "generator": GENERATOR_ID, "seed": net.seed, "bits_per_block": bits,
        "block_size": block_size, "num_blocks": num_blocks, "architecture": spec,
        "coded": [{"name": n, "shape": list(s), "rho": float(r)}
                  for n, s, r in zip(net.names, net.shapes, net.log_rho.detach().exp().tolist(), strict=True)],
        "uncompressed": uncompressed,
    }
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + _pack(indices, bits) + bytes(raw)
    blob = body + struct.pack("<I", zlib.crc32(body))
    path = Path(path)
    path.write_bytes(blob)
    float32_bytes = 4 * sum(net.sizes)
    return EncodeReport(path, len(blob), float32_bytes, num_blocks, bits)


def chosen_weights(header: dict, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """The coded tensors of a file: candidate ``indices[b]`` of every block, regenerated."""
    block_size, num_blocks = header["block_size"], header["num_blocks"]
    seed = header["seed"]
    coded = header["coded"]
    sizes = [math.prod(c["shape"]) for c in coded]
    total = sum(sizes)
    rho_of_weight = np.repeat([c["rho"] for c in coded], sizes)
    order = coding_permutation(total, seed)  # slot i holds weight order[i]
    rho_of_slot = np.ones(num_blocks * block_size)
    rho_of_slot[:total] = rho_of_weight[order]
    j = np.arange(block_size, dtype=np.uint64)
    blocks = np.empty((num_blocks, block_size))
    for b in range(num_blocks):
        blocks[b] = normals(seed, b, np.uint64(indices[b]) * np.uint64(block_size) + j)
    flat_slots = blocks.reshape(-1) * rho_of_slot
    weights = np.empty(total)
    weights[order] = flat_slots[:total]
    out, start = {}, 0
    for c, size in zip(coded, sizes, strict=True):
        out[c["name"]] = torch.from_numpy(weights[start:start + size].reshape(c["shape"])).float()
        start += size
    return out


def read(path: str | Path) -> tuple[dict, np.ndarray, bytes]:
    """A file's header, its block indices and the raw bytes of its uncompressed tensors (checked)."""
    blob = Path(path).read_bytes()
    name = "llkern.miracle.decode"
    if len(blob) < len(MAGIC) + 8 or blob[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{name}: {path} is not an llkern MIRACLE file (bad magic or too short)")
    body, stored = blob[:-4], struct.unpack("<I", blob[-4:])[0]
    (header_length,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if start + header_length > len(body):
        raise ValueError(f"{name}: {path} is truncated (the header runs past the end of the file)")
    if zlib.crc32(body) != stored:
        raise ValueError(f"{name}: {path} is corrupted or truncated (checksum mismatch)")
    try:
        header = json.loads(zlib.decompress(body[start:start + header_length]))
    except (zlib.error, ValueError) as error:
        raise ValueError(f"{name}: {path} has an unreadable header ({error})") from error
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{name}: {path} has format version {header.get('format_version')!r}; this llkern reads "
                         f"version {FORMAT_VERSION}")
    if header.get("generator") != GENERATOR_ID:
        raise ValueError(f"{name}: {path} uses generator {header.get('generator')!r}; this llkern has {GENERATOR_ID}")
    bits, count = header["bits_per_block"], header["num_blocks"]
    index_bytes = (count * bits + 7) // 8
    offset = start + header_length
    if offset + index_bytes > len(body):
        raise ValueError(f"{name}: {path} is truncated (the indices run past the end of the file)")
    indices = _unpack(body[offset:offset + index_bytes], count, bits)
    return header, indices, body[offset + index_bytes:]


def decode(path: str | Path) -> nn.Module:
    """The model a MIRACLE file describes, with its coded weights regenerated: an ordinary module."""
    header, indices, raw = read(path)
    model = _build(header["architecture"])
    state = chosen_weights(header, indices)
    offset = 0
    for entry in header["uncompressed"]:
        dtype = DTYPES[entry["dtype"]]
        nbytes = math.prod(entry["shape"]) * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(raw):
            raise ValueError(f"llkern.miracle.decode: {path} is truncated (tensor {entry['name']})")
        data = torch.frombuffer(bytearray(raw[offset:offset + nbytes]), dtype=torch.uint8) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
        state[entry["name"]] = data.view(dtype).reshape(entry["shape"]).clone()
        offset += nbytes
    model.load_state_dict(state, strict=True)
    return model
