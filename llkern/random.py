"""llkern's counter-based random stream, in NumPy: the reference and the CPU decoder's generator.

Specification (part of the MIRACLE file format): docs/random.md. Philox-4x32-10 keyed by
``(seed, stream)``, draw n at counter ``(n mod 2^32, n div 2^32, 0, 0)``, normals by Box–Muller's
cosine branch from output words 0 and 1. The Triton implementation (triton_kernels/philox.py)
produces the same bits; tests/test_random.py checks both against each other and the known answers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GENERATOR_ID", "normals", "philox4x32", "stream_bits"]

GENERATOR_ID = "philox4x32-10/box-muller-v1"

_MASK = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_SHIFT = np.uint64(32)


def _uint32(name: str, value, shape=None) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "ui" or (array.size and (array.min() < 0 or array.max() > 0xFFFFFFFF)):
        raise ValueError(f"llkern.random: expected {name} to be integers in [0, 2^32), got {value!r}")
    return array.astype(np.uint64) if shape is None else np.broadcast_to(array.astype(np.uint64), shape)


def philox4x32(counter: tuple, key: tuple, rounds: int = 10) -> tuple[np.ndarray, ...]:
    """Philox-4x32 of ``counter = (c0, c1, c2, c3)`` under ``key = (k0, k1)``: four uint32 arrays.

    Entries may be scalars or arrays (broadcast together); every value must be in [0, 2^32).
    """
    c0, c1, c2, c3 = (_uint32(f"counter[{i}]", c) for i, c in enumerate(counter))
    k0, k1 = (_uint32(f"key[{i}]", k) for i, k in enumerate(key))
    c0, c1, c2, c3, k0, k1 = np.broadcast_arrays(c0, c1, c2, c3, k0, k1)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = _M0 * c0, _M1 * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (p1 >> _SHIFT) ^ c1 ^ k0, p1 & _MASK, (p0 >> _SHIFT) ^ c3 ^ k1, p0 & _MASK
    return tuple(np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3))


def stream_bits(seed: int, stream: int, draws) -> tuple[np.ndarray, np.ndarray]:
    """Output words 0 and 1 of draws ``n`` (uint64 array) of stream ``(seed, stream)``."""
    n = np.asarray(draws)
    if n.dtype.kind not in "ui" or (n.size and n.min() < 0):
        raise ValueError(f"llkern.random: expected draws to be non-negative integers, got dtype {n.dtype}")
    n = n.astype(np.uint64)
    words = philox4x32((n & _MASK, n >> _SHIFT, 0, 0), (seed, stream))
    return words[0], words[1]


def normals(seed: int, stream: int, draws) -> np.ndarray:
    """Standard normals (float64) of draws ``n`` of stream ``(seed, stream)`` (docs/random.md)."""
    x0, x1 = stream_bits(seed, stream, draws)
    u0 = ((x0 >> np.uint32(8)).astype(np.float64) + 0.5) * 2.0**-24
    u1 = (x1 >> np.uint32(8)).astype(np.float64) * 2.0**-24
    return np.sqrt(-2.0 * np.log(u0)) * np.cos(2.0 * np.pi * u1)
