"""MIRACLE candidate selection on the GPU: score every block's 2^C candidates and keep one index per block.

What :func:`llkern.compress.miracle.encode` computes per coding block, as one op. Block ``b = first_block + i``
has posterior means ``mu[i]``, standard deviations ``sigma[i]`` and prior standard deviations
``rho[i]`` (the prior mean is 0). Candidate k's weights are ``w_kj = rho_ij · eps_kj``, eps_kj the
normal of draw ``k · block_size + j`` of llkern's Philox stream ``(seed, b)`` (docs/random.md), and
its score is ``log q(w_k) − log p(w_k)``::

    score_k = Σ_j −½ ((w_kj − mu_ij) / sigma_ij)² − ln sigma_ij + ½ eps_kj² + ln rho_ij

``choose="argmax"`` keeps ``argmax_k score_k``; ``choose="sample"`` keeps ``argmax_k score_k + g_k``
(the Gumbel-max trick: a draw from softmax(score)), ``g_k = −ln(−ln u_k)`` with
``u_k = ((x0_k >> 8) + 0.5) · 2^-24`` and x0_k word 0 of draw k of the stream
``(seed, num_blocks_total + b)``. Ties go to the lowest k (as ``numpy.argmax``).

The Triton kernel is triton_kernels/miracle_encode.py; ``torch.ops.llkern.miracle_select`` is a
``torch.library.triton_op``. Where Triton cannot run (:func:`llkern.ops.context.triton_available`),
``impl="auto"`` takes the NumPy float64 reference here, which computes the scores with the
encoder's formula and generator (``llkern.random``), candidate chunk by candidate chunk.

The kernel accumulates in float32 (float64 for float64 inputs, whose normals it then also computes
in float64), so where two candidates' scores are within float32 rounding of each other its choice
may differ from the float64 encoder's; elsewhere the two choose the same index.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from llkern._ext import check_values, device_guard
from llkern.ops.context import use_triton
from llkern.random import normals, stream_bits

__all__ = ["miracle_select", "miracle_select_reference"]

NAME = "llkern.miracle_select"
CHOICES = ("argmax", "sample")
MAX_BITS = 24
TILE_ELEMENTS = 4096  # candidates × (padded) weights per kernel tile
REFERENCE_CHUNK = 1 << 16  # candidate weights per chunk of the NumPy reference


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(mu, sigma, rho, seed, bits, first_block, num_blocks_total, choose) -> int:
    """Raise for bad arguments (naming the argument); returns num_blocks_total."""
    for arg, value in (("mu", mu), ("sigma", sigma), ("rho", rho)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{NAME}: expected {arg} to be a Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{NAME}: expected {arg} to be a floating-point tensor, got {value.dtype}")
    if mu.dim() != 2 or mu.numel() == 0:
        raise ValueError(f"{NAME}: expected mu of shape (blocks, block_size), non-empty, got {list(mu.shape)}")
    for arg, value in (("sigma", sigma), ("rho", rho)):
        if value.shape != mu.shape or value.dtype != mu.dtype or value.device != mu.device:
            raise ValueError(f"{NAME}: expected {arg} like mu ({list(mu.shape)}, {mu.dtype}, {mu.device}), got "
                             f"{list(value.shape)}, {value.dtype}, {value.device}")
    if choose not in CHOICES:
        raise ValueError(f"{NAME}: expected choose to be one of {CHOICES}, got {choose!r}")
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{NAME}: expected bits (per block) to be an int in [1, {MAX_BITS}], got {bits!r}")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"{NAME}: expected seed to be an int in [0, 2^32), got {seed!r}")
    blocks = mu.shape[0]
    if not _is_int(first_block) or first_block < 0:
        raise ValueError(f"{NAME}: expected first_block to be an int >= 0, got {first_block!r}")
    if num_blocks_total is None:
        num_blocks_total = first_block + blocks
    if not _is_int(num_blocks_total) or first_block + blocks > num_blocks_total:
        raise ValueError(f"{NAME}: expected num_blocks_total to be an int >= first_block + blocks = "
                         f"{first_block + blocks}, got {num_blocks_total!r}")
    # block streams are uint32; sampling also uses streams num_blocks_total + b
    last_stream = num_blocks_total + first_block + blocks - 1 if choose == "sample" else first_block + blocks - 1
    if last_stream >= 2**32:
        raise ValueError(f"{NAME}: expected the block streams to fit in uint32: first_block ({first_block}) + blocks "
                         f"({blocks}){' + num_blocks_total' if choose == 'sample' else ''} must be <= 2^32")
    if check_values(mu):  # (host syncs on a GPU: there only with llkern.value_checks() on)
        for arg, value in (("sigma", sigma), ("rho", rho)):
            if not bool(((value > 0) & torch.isfinite(value)).all()):
                raise ValueError(f"{NAME}: expected {arg} (a standard deviation) to be finite and > 0 everywhere")
        if not bool(torch.isfinite(mu).all()):
            raise ValueError(f"{NAME}: expected mu to be finite everywhere")
    return num_blocks_total


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def miracle_select(mu: torch.Tensor, sigma: torch.Tensor, rho: torch.Tensor, *, seed: int, bits: int,
                   first_block: int = 0, num_blocks_total: int | None = None, choose: str = "argmax",
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Score each block's 2^bits MIRACLE candidates and pick one index per block.

    Args:
        mu, sigma, rho: ``(blocks, block_size)`` posterior means, posterior standard deviations
            (> 0) and prior standard deviations (> 0) of blocks ``first_block .. first_block +
            blocks − 1``; one floating dtype and device, any strides.
        seed: the model's seed (uint32): candidates of block b come from the stream (seed, b).
        bits: C, bits per block (1 ≤ C ≤ 24): 2^C candidates.
        first_block: the global index of row 0 (to code a model a chunk of blocks at a time).
        num_blocks_total: the model's number of blocks (default ``first_block + blocks``); sampling
            draws its Gumbel noise from the streams ``(seed, num_blocks_total + b)``.
        choose: ``"argmax"`` (the best candidate) or ``"sample"`` (a draw from softmax(score)).
        impl: ``"auto"`` (Triton where it can run, else the NumPy reference), ``"kernel"`` or
            ``"reference"`` (float64 NumPy, the encoder's arithmetic).

    Returns:
        ``(indices, scores)``: int64 ``(blocks,)`` chosen candidate per block, and the chosen
        candidate's score ``log q − log p`` (without the Gumbel noise), float32 (float64 for
        float64 inputs), on mu's device.
    """
    num_blocks_total = _check(mu, sigma, rho, seed, bits, first_block, num_blocks_total, choose)
    if not use_triton(NAME, mu.device, impl):
        indices, scores = miracle_select_reference(mu, sigma, rho, seed=seed, bits=bits, first_block=first_block,
                                                   num_blocks_total=num_blocks_total, choose=choose)
        return indices.to(mu.device), scores.to(device=mu.device, dtype=_score_dtype(mu.dtype))
    return torch.ops.llkern.miracle_select(mu, sigma, rho, seed, bits, first_block, num_blocks_total,
                                           choose == "sample")


# --- the float64 NumPy reference -----------------------------------------------------------------


def _as_float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def candidate_scores(mu: np.ndarray, sigma: np.ndarray, rho: np.ndarray, seed: int, block: int,
                     candidates: np.ndarray) -> np.ndarray:
    """Scores (float64) of ``candidates`` (uint64 array) of global block ``block``, one row's
    ``mu``, ``sigma``, ``rho`` (float64 arrays): the encoder's formula, term for term."""
    block_size = mu.shape[0]
    draws = candidates.astype(np.uint64)[:, None] * np.uint64(block_size) + np.arange(block_size, dtype=np.uint64)
    eps = normals(seed, block, draws)
    w = rho * eps
    log_q = -0.5 * ((w - mu) / sigma) ** 2 - np.log(sigma)
    log_p = -0.5 * eps**2 - np.log(rho)
    return (log_q - log_p).sum(axis=1)


def gumbel_noise(seed: int, stream: int, candidates: np.ndarray) -> np.ndarray:
    """−ln(−ln u_k) of ``candidates`` (uint64 array) from word 0 of their draws of ``(seed, stream)``."""
    x0, _ = stream_bits(seed, stream, candidates.astype(np.uint64))
    u = ((x0 >> np.uint32(8)).astype(np.float64) + 0.5) * 2.0**-24
    return -np.log(-np.log(u))


def miracle_select_reference(mu: torch.Tensor, sigma: torch.Tensor, rho: torch.Tensor, *, seed: int, bits: int,
                             first_block: int = 0, num_blocks_total: int | None = None,
                             choose: str = "argmax") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`miracle_select` in float64 NumPy, a chunk of candidates at a time (CPU tensors out:
    int64 indices and float64 scores)."""
    num_blocks_total = _check(mu, sigma, rho, seed, bits, first_block, num_blocks_total, choose)
    mu, sigma, rho = _as_float64(mu), _as_float64(sigma), _as_float64(rho)
    blocks, block_size = mu.shape
    num_candidates = 2**bits
    chunk = min(num_candidates, max(1, REFERENCE_CHUNK // block_size))
    indices = np.empty(blocks, dtype=np.int64)
    scores = np.empty(blocks)
    for i in range(blocks):
        block = first_block + i
        best_key, best_index, best_score = -np.inf, 0, 0.0
        for start in range(0, num_candidates, chunk):
            k = np.arange(start, min(start + chunk, num_candidates), dtype=np.uint64)
            score = candidate_scores(mu[i], sigma[i], rho[i], seed, block, k)
            key = score + gumbel_noise(seed, num_blocks_total + block, k) if choose == "sample" else score
            top = int(key.argmax())  # the lowest index among equal maxima, and earlier chunks win ties
            if key[top] > best_key:
                best_key, best_index, best_score = key[top], start + top, score[top]
        indices[i], scores[i] = best_index, best_score
    return torch.from_numpy(indices), torch.from_numpy(scores)


# --- the op torch.library sees -------------------------------------------------------------------


@torch.library.triton_op("llkern::miracle_select", mutates_args=())
def _miracle_select_op(mu: torch.Tensor, sigma: torch.Tensor, rho: torch.Tensor, seed: int, bits: int,
                       first_block: int, num_blocks_total: int, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    from llkern.triton_kernels import miracle_encode as kernels

    blocks, block_size = mu.shape
    if blocks == 0:  # (the op called directly: the wrapper refuses empty input; the split count divides by blocks)
        return (torch.empty(0, dtype=torch.int64, device=mu.device),
                torch.empty(0, dtype=_score_dtype(mu.dtype), device=mu.device))
    block = triton.next_power_of_2(block_size)
    num_candidates = 2**bits
    tile = min(num_candidates, max(1, TILE_ELEMENTS // block))
    splits = _candidate_splits(mu.device, blocks, num_candidates // tile)
    shape = (blocks, splits) if splits > 1 else (blocks,)  # (one program per block writes the outputs)
    indices = torch.empty(shape, dtype=torch.int64, device=mu.device)
    scores = torch.empty(shape, dtype=_score_dtype(mu.dtype), device=mu.device)
    key_dtype = torch.float64 if sample or mu.dtype == torch.float64 else torch.float32
    keys = torch.empty(blocks, splits, dtype=key_dtype, device=mu.device) if splits > 1 else scores
    # 8 warps for full tiles: 16 elements a thread, ~80 registers (sm_90, no spills) where 4 warps need ~150
    num_warps = 8 if tile * block >= TILE_ELEMENTS else 4
    with device_guard(mu):
        torch.library.wrap_triton(kernels.miracle_select)[(blocks, splits)](
            mu, sigma, rho, indices, scores, keys, block_size, *mu.stride(), *sigma.stride(), *rho.stride(),
            seed, first_block, num_blocks_total + first_block, NUM_CANDIDATES=num_candidates, SPLITS=splits,
            SAMPLE=sample, F64=mu.dtype == torch.float64, TILE=tile, BLOCK=block, num_warps=num_warps)
    if splits == 1:
        return indices, scores
    best = keys.argmax(dim=1, keepdim=True)  # the first split at the maximum: the lowest candidate index
    return indices.gather(1, best).squeeze(1), scores.gather(1, best).squeeze(1)


def _candidate_splits(device: torch.device, blocks: int, max_splits: int) -> int:
    """Programs per block: a power of two that gives the GPU about four programs per multiprocessor (one
    program per block left most of an H200 idle in chunks of 64 blocks), never less than a tile each."""
    if device.type != "cuda":
        return 1
    wanted = -(-4 * torch.cuda.get_device_properties(device).multi_processor_count // blocks)
    splits = 1
    while splits * 2 <= min(wanted, max_splits):
        splits *= 2
    return splits


# Shapes only: under fake tensors (opcheck, torch.compile's tracing) no kernel may launch.
@_miracle_select_op.register_fake
def _miracle_select_fake(mu, sigma, rho, seed, bits, first_block, num_blocks_total, sample):
    blocks = mu.shape[0]
    return (torch.empty(blocks, dtype=torch.int64, device=mu.device),
            torch.empty(blocks, dtype=_score_dtype(mu.dtype), device=mu.device))
