"""MIRACLE coding of a trained :class:`llkern.compress.mean_kl.MeanKLNetwork`, and its file format.

Encoding: for every coding block b, the 2^C candidates ``w_k = ρ ε_k`` are drawn from the prior
N(0, ρ²) with llkern's Philox stream ``(seed, b)`` (draw ``k · block_size + j`` for weight j;
docs/random.md), scored by ``log q(w_k) − log p(w_k)`` under the trained posterior, and one index
per block is kept: the best (``choose="argmax"``) or one sampled from ``softmax_k(score)``
(``"sample"``, by the Gumbel-max trick on the stream ``(seed, b + num_blocks)``). Candidates are
generated and scored by :func:`llkern.ops.miracle_encode.miracle_select` (a Triton kernel, or its
float64 NumPy reference), a tile of candidates at a time, never all at once.

The file (no pickle), every integer little-endian:
``MAGIC`` (8 bytes) | header (binary, llkern/compress/header.py: format version, generator, seed, C,
block size, number of blocks, the layers of the ``nn.Sequential`` with their arguments, ρ of every
coded tensor, the dtypes of the uncompressed ones) | packed C-bit indices | raw bytes of the
uncompressed tensors (BatchNorm statistics and the like) | u32 CRC-32 of everything before it.
The coded and uncompressed tensors' names and shapes follow from the layers. A coded weight is
``float32(z) · ρ`` computed in float32 (ρ is stored as a float32), z its chosen candidate's float64 normal:
what the encoder's network computes, bit for bit; the uncompressed tensors keep their stored dtypes.
:func:`decode` rebuilds an ordinary ``nn.Module`` from the file alone.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from llkern._ext import value_checks
from llkern.compress.header import (
    CODE_OF_DTYPE,
    HeaderError,
    build,
    coded_and_uncompressed,
    describe,
    parse_header,
    write_header,
)
from llkern.compress.mean_kl import MeanKLNetwork, coding_permutation
from llkern.ops.miracle_encode import miracle_select
from llkern.random import GENERATOR_ID, normals
from llkern.reference.mean_kl import mean_kl_reference

__all__ = ["FORMAT_VERSION", "MAGIC", "EncodeReport", "chosen_weights", "decode", "encode", "read"]

MAGIC = b"LLKMIRA\x00"
FORMAT_VERSION = 2
CHOICES = ("argmax", "sample")


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


def _pack(indices: np.ndarray, bits: int) -> bytes:
    as_bits = ((indices[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)  # least significant first
    return np.packbits(as_bits, bitorder="little").tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    as_bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count * bits]
    return (as_bits.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def _chosen_normals(seed: int, first_block: int, indices: np.ndarray, block_size: int) -> np.ndarray:
    """The normals of candidate ``indices[i]`` of block ``first_block + i``: ``(len(indices), block_size)``."""
    j = np.arange(block_size, dtype=np.uint64)
    return np.stack([normals(seed, first_block + i, np.uint64(k) * np.uint64(block_size) + j)
                     for i, k in enumerate(indices)])


def encode(net: MeanKLNetwork, path: str | Path, *, choose: str = "argmax", chunk_blocks: int = 64,
           retrain: Callable[[MeanKLNetwork], None] | None = None, impl: str = "auto",
           progress: bool = True) -> EncodeReport:
    """Code ``net``'s weights (one C-bit index per block) and write the file to ``path``.

    Blocks are coded in order, ``chunk_blocks`` at a time. Each coded block is fixed in ``net``
    (:meth:`~llkern.compress.mean_kl.MeanKLNetwork.fix_blocks`), so afterwards ``net`` computes exactly
    what :func:`decode` will rebuild. With ``retrain``, the blocks not yet coded are trained after
    every chunk to make up for the ones just fixed (MIRACLE's retraining); ``retrain(net)`` runs
    the caller's training steps on ``net`` (the coded blocks no longer move) and returns.

    Args:
        net: a trained :class:`MeanKLNetwork` whose model is an ``nn.Sequential`` of Conv2d, Linear,
            BatchNorm, ReLU, pooling and Flatten layers.
        path: where to write.
        choose: ``"argmax"`` (the best candidate) or ``"sample"`` (MIRACLE's choice by the scores).
        chunk_blocks: blocks coded between two retraining calls (and scored together).
        retrain: optional training callback, called after every chunk but the last.
        impl: of the candidate scoring, :func:`llkern.ops.miracle_encode.miracle_select` (``"auto"``:
            the Triton kernel where Triton runs, else the float64 NumPy reference).
        progress: a progress bar over the blocks.
    """
    if not isinstance(net, MeanKLNetwork):
        raise TypeError(f"llkern.compress.miracle.encode: expected a MeanKLNetwork, got {type(net).__name__}")
    if choose not in CHOICES:
        raise ValueError(f"llkern.compress.miracle.encode: expected choose to be one of {CHOICES}, got {choose!r}")
    if isinstance(chunk_blocks, bool) or not isinstance(chunk_blocks, int) or chunk_blocks < 1:
        raise ValueError(f"llkern.compress.miracle.encode: expected chunk_blocks to be an int >= 1, "
                         f"got {chunk_blocks!r}")
    if retrain is not None and not callable(retrain):
        raise TypeError(f"llkern.compress.miracle.encode: expected retrain to be callable or None, "
                        f"got {type(retrain).__name__}")
    spec = describe(net.model, "llkern.compress.miracle.encode")
    coded, uncompressed = coded_and_uncompressed(net.model)
    with torch.device("meta"):
        rebuilt_coded, rebuilt = coded_and_uncompressed(build(spec))
    # what the decoder will rebuild from the layers alone must be what is coded and stored (a layer used
    # twice in the Sequential, or an extra buffer, would write a file that cannot be read back)
    if [(n, t.shape) for n, t in coded] != [(n, t.shape) for n, t in rebuilt_coded] or \
            [n for n, _ in coded] != list(net.names):
        raise ValueError("llkern.compress.miracle.encode: the model's coded tensors differ from those its layers "
                         "create (a layer used twice?); the file cannot describe them")
    if [(n, t.shape) for n, t in uncompressed] != [(n, t.shape) for n, t in rebuilt]:
        raise ValueError("llkern.compress.miracle.encode: the model's tensors other than the coded ones differ from "
                         "those its layers create; the file cannot describe them")
    for name, tensor in uncompressed:  # before coding: a failure here must not leave blocks half coded
        if tensor.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"llkern.compress.miracle.encode: cannot store {name} of dtype {tensor.dtype}")
        if tensor.is_floating_point() and tensor.dtype != torch.float32:  # (decoded beside float32 weights)
            raise ValueError(f"llkern.compress.miracle.encode: the file's network is float32, and {name} is "
                             f"{tensor.dtype}; convert it (net.float())")
    if net.theta.dtype != torch.float32:  # (a float64 net's coded weights would not be what decode rebuilds)
        raise ValueError(f"llkern.compress.miracle.encode: the file holds float32 coded weights, and net is "
                         f"{net.theta.dtype}; code a float32 MeanKLNetwork (net.float())")
    bits, block_size, num_blocks = net.bits_per_block, net.block_size, net.num_blocks
    indices = np.empty(num_blocks, dtype=np.int64)
    net.release_blocks()
    bar = tqdm(total=num_blocks, desc="MIRACLE encode", unit="block", disable=not progress)
    for first in range(0, num_blocks, chunk_blocks):
        last = min(first + chunk_blocks, num_blocks)
        with torch.no_grad():  # the posterior now: retraining moves it between chunks
            rho = net.rho_blocks()[first:last].double()
            zeros = torch.zeros_like(rho)
            _, mu, sigma = mean_kl_reference(net.theta[first:last], net.gamma[first:last], zeros, rho, zeros,
                                             net.kappa_block, net.delta)
        # The chunk's indices come to the host anyway: the posterior's values are checked on a GPU too
        # (a NaN or negative σ would otherwise give finite, meaningless indices in the file).
        with value_checks():
            chosen = miracle_select(mu.to(net.theta.dtype), sigma.to(net.theta.dtype), rho.to(net.theta.dtype),
                                    seed=net.seed, bits=bits, first_block=first, num_blocks_total=num_blocks,
                                    choose=choose, impl=impl)[0]
        indices[first:last] = chosen.cpu().numpy()
        net.fix_blocks(first, torch.from_numpy(_chosen_normals(net.seed, first, indices[first:last], block_size)))
        bar.update(last - first)
        if retrain is not None and last < num_blocks:
            retrain(net)
    bar.close()
    raw, dtypes = bytearray(), []
    for _, tensor in uncompressed:
        data = tensor.detach().cpu().contiguous()
        dtypes.append(data.dtype)
        raw += data.reshape(-1).view(torch.uint8).numpy().tobytes()
    rho = net.log_rho.detach().exp().float().tolist()
    header = write_header(version=FORMAT_VERSION, seed=net.seed, bits=bits, block_size=block_size,
                          num_blocks=num_blocks, spec=spec, rho=rho, dtypes=dtypes)
    body = MAGIC + header + _pack(indices, bits) + bytes(raw)
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
    rho_of_slot = np.ones(num_blocks * block_size, dtype=np.float32)
    rho_of_slot[:total] = rho_of_weight[order]
    blocks = _chosen_normals(seed, 0, indices, block_size)
    # w = float32(z) · ρ in float32, the product the encoder's network computes (MeanKLNetwork: ρ times its
    # float32 coded normals): the decoded weights equal the encoder's bit for bit (a float64 product rounded
    # once differed in the last bit for a quarter of them)
    flat_slots = blocks.reshape(-1).astype(np.float32) * rho_of_slot
    weights = np.empty(total, dtype=np.float32)
    weights[order] = flat_slots[:total]
    out, start = {}, 0
    for c, size in zip(coded, sizes, strict=True):
        out[c["name"]] = torch.from_numpy(weights[start:start + size].reshape(c["shape"]).copy())
        start += size
    return out


def read(path: str | Path) -> tuple[dict, np.ndarray, bytes]:
    """A file's header, its block indices and the raw bytes of its uncompressed tensors (checked)."""
    name = "llkern.compress.miracle.decode"
    file = Path(path)
    if file.exists() and not file.is_file():  # a device or a pipe would be read without end
        raise ValueError(f"{name}: {path} is not a regular file")
    with open(file, "rb") as f:  # the magic first: a large file of something else is not read whole
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{name}: {path} is not an llkern MIRACLE file (bad magic or too short)")
        blob = MAGIC + f.read()
    if len(blob) < len(MAGIC) + 4:
        raise ValueError(f"{name}: {path} is not an llkern MIRACLE file (bad magic or too short)")
    body, stored = blob[:-4], struct.unpack("<I", blob[-4:])[0]
    if zlib.crc32(body) != stored:
        raise ValueError(f"{name}: {path} is corrupted or truncated (checksum mismatch)")
    try:
        header, offset = parse_header(body, len(MAGIC))
    except HeaderError as error:
        raise ValueError(f"{name}: {path} has an unreadable header ({error})") from error
    if header["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{name}: {path} has format version {header['format_version']}; this llkern reads "
                         f"version {FORMAT_VERSION}")
    if header["generator"] != GENERATOR_ID:
        raise ValueError(f"{name}: {path} uses generator {header['generator']!r}; this llkern has {GENERATOR_ID}")
    bits, count = header["bits_per_block"], header["num_blocks"]
    index_bytes = (count * bits + 7) // 8
    if offset + index_bytes > len(body):
        raise ValueError(f"{name}: {path} is truncated (the indices run past the end of the file)")
    # Everything the header asks for is paid for in the file: the indices (blocks × C bits) and the
    # uncompressed tensors' bytes, exactly. Checked before anything is allocated.
    payload = index_bytes + header["uncompressed_bytes"]
    if offset + payload != len(body):
        raise ValueError(f"{name}: {path} holds {len(body) - offset} bytes after its header, but the header describes "
                         f"{payload} ({count} blocks of {bits} bits and {header['uncompressed_bytes']} bytes of "
                         "uncompressed tensors)")
    indices = _unpack(body[offset:offset + index_bytes], count, bits)
    return header, indices, body[offset + index_bytes:]


def decode(path: str | Path) -> nn.Module:
    """The model a MIRACLE file describes, with its coded weights regenerated: an ordinary module."""
    header, indices, raw = read(path)
    with torch.random.fork_rng(devices=[]):  # decoding leaves torch's random state as it was
        model = build(header["architecture"])
    state = chosen_weights(header, indices)
    offset = 0
    for entry in header["uncompressed"]:
        dtype = entry["dtype"]
        nbytes = math.prod(entry["shape"]) * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(raw):
            raise ValueError(f"llkern.compress.miracle.decode: {path} is truncated (tensor {entry['name']})")
        data = torch.frombuffer(bytearray(raw[offset:offset + nbytes]), dtype=torch.uint8) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
        state[entry["name"]] = data.view(dtype).reshape(entry["shape"]).clone()
        offset += nbytes
    if offset != len(raw):
        raise ValueError(f"llkern.compress.miracle.decode: {path} has {len(raw) - offset} bytes after its last tensor")
    # assign: each tensor keeps the dtype the file stored (copying into the built float32 module rounded a
    # float64 statistic to float32)
    model.load_state_dict(state, strict=True, assign=True)
    return model
