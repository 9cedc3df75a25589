"""Variational weights for MIRACLE compression: Mean-KL (:class:`MeanKLNetwork`) and the
conventional mean/variance parameterisation with per-block KL annealing (:class:`GaussianNetwork`,
MIRACLE's own scheme, the baseline).

Both wrap an ordinary model. The weights and biases of its ``nn.Linear`` and ``nn.Conv2d`` layers
become variational; everything else (BatchNorm, its statistics) stays as it is. Every weight gets
a slot in coding blocks of ``block_size`` through a seeded permutation, and each block is coded
in ``bits_per_block`` bits. The prior is N(0, ρ²), with ρ one learnable value per tensor.
``forward`` samples the weights (new noise every training step) and calls the model with them;
``mean_weights()`` gives the posterior means.

Mean-KL meets each block's budget of ``bits_per_block · ln 2`` nats by construction
(:func:`llkern.ops.mean_kl.mean_kl_sample`), so its loss is the task loss alone. The Gaussian
baseline adds ``Σ_b β_b KL_b`` and moves each β_b up or down to steer KL_b to the budget.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from llkern._ext import IMPLS
from llkern.ops.mean_kl import mean_kl_sample
from llkern.random import stream_bits
from llkern.reference.mean_kl import mean_kl_mean

__all__ = ["GaussianNetwork", "MeanKLNetwork", "coding_permutation"]

COMPRESSIBLE = (nn.Linear, nn.Conv2d)
PERMUTATION_STREAM = 0xFFFFFFFF  # the Philox stream that orders the weights (docs/random.md)
# Mean-KL training noise: stream TRAINING_STREAMS + step mod (2^31 − 1), disjoint from MIRACLE's coding streams
# (block b's candidates: stream b; its Gumbel noise: num_blocks + b; both below 2^31) and from the permutation's.
# (Training on the noise that later served as block s's candidates made the two draws dependent.)
TRAINING_STREAMS = 2**31
MAX_BLOCKS = 2**30  # so that the coding streams stay below TRAINING_STREAMS


def coding_permutation(total: int, seed: int) -> np.ndarray:
    """The seeded order of ``total`` weights: positions sorted by their 64-bit Philox keys from
    stream ``(seed, 0xFFFFFFFF)``; slot i of the coding blocks holds weight ``permutation[i]``."""
    x0, x1 = stream_bits(seed, PERMUTATION_STREAM, np.arange(total, dtype=np.uint64))
    keys = (x0.astype(np.uint64) << np.uint64(32)) | x1.astype(np.uint64)
    return np.argsort(keys, kind="stable")


# Weights one coded bit may stand for (block size ≤ this × C): 8192× smaller than float32, far beyond any
# useful compression; the MIRACLE file reader enforces it too, so a header's bitstream bounds its weights.
MAX_WEIGHTS_PER_BIT = 256

class _Coded(nn.Module):
    """The shared part: which tensors are coded, the slot layout, ρ per tensor."""

    def __init__(self, model: nn.Module, bits_per_block: int, block_size: int, seed: int) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: expected model to be an nn.Module, got {type(model).__name__}")
        for arg, value in (("bits_per_block", bits_per_block), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: expected {arg} to be an int >= 1, got {value!r}")
        if block_size > MAX_WEIGHTS_PER_BIT * bits_per_block:
            raise ValueError(f"{type(self).__name__}: block_size {block_size} is more than {MAX_WEIGHTS_PER_BIT} "
                             f"weights per coded bit at bits_per_block={bits_per_block} (a MIRACLE file could not "
                             "hold it)")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"{type(self).__name__}: expected seed to be an int in [0, 2^32), got {seed!r}")
        self.model = model
        self.bits_per_block, self.block_size, self.seed = bits_per_block, block_size, seed
        self.names = [f"{module_name}.{param_name}" if module_name else param_name
                      for module_name, module in model.named_modules() if isinstance(module, COMPRESSIBLE)
                      for param_name, p in module.named_parameters(recurse=False) if p is not None]
        if not self.names:
            raise ValueError(f"{type(self).__name__}: the model has no nn.Linear or nn.Conv2d weights to code")
        params = dict(model.named_parameters())
        initial = [params[name].detach() for name in self.names]
        for p in (params[name] for name in self.names):
            p.requires_grad_(False)  # the variational parameters replace them
        self.shapes = [p.shape for p in initial]
        self.sizes = [p.numel() for p in initial]
        total = sum(self.sizes)
        self.num_blocks = -(-total // block_size)
        if self.num_blocks > MAX_BLOCKS:
            raise ValueError(f"{type(self).__name__}: {self.num_blocks} blocks of {block_size} weights; at most "
                             f"{MAX_BLOCKS} (the coding streams must stay below 2^31): use larger blocks")
        order = coding_permutation(total, seed)
        slot_of_weight = np.empty(total, dtype=np.int64)
        slot_of_weight[order] = np.arange(total)
        tensor_of_weight = np.repeat(np.arange(len(self.sizes)), self.sizes)
        tensor_of_slot = np.zeros(self.num_blocks * block_size, dtype=np.int64)  # padding slots: tensor 0
        tensor_of_slot[:total] = tensor_of_weight[order]
        self.register_buffer("slot_of_weight", torch.from_numpy(slot_of_weight), persistent=False)
        self.register_buffer("tensor_of_slot", torch.from_numpy(tensor_of_slot).view(self.num_blocks, block_size),
                             persistent=False)
        # ρ per tensor: the spread of its initial weights (a He/Kaiming-sized prior)
        self.log_rho = nn.Parameter(torch.tensor([math.log(max(float(p.std()) if p.numel() > 1 else 0.1, 1e-3))
                                                  for p in initial]))
        self.steps = 0

    @property
    def kappa_block(self) -> float:
        return self.bits_per_block * math.log(2)

    def rho_blocks(self) -> torch.Tensor:
        return self.log_rho.exp()[self.tensor_of_slot]

    def initial_blocks(self) -> torch.Tensor:
        """The model's current values of the coded tensors, in block layout (padding 0)."""
        params = dict(self.model.named_parameters())
        values = torch.cat([params[name].detach().reshape(-1) for name in self.names])
        flat = torch.zeros(self.num_blocks * self.block_size, dtype=values.dtype)
        flat[self.slot_of_weight] = values
        return flat.view(self.num_blocks, self.block_size)

    def unpack(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Block-layout weights → the model's named tensors."""
        flat = blocks.reshape(-1)[self.slot_of_weight]
        return {name: part.view(shape)
                for name, part, shape in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}

    def sample_blocks(self, stream: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean_blocks(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean_weights(self) -> dict[str, torch.Tensor]:
        return self.unpack(self.mean_blocks())

    def forward(self, x: torch.Tensor, *, sample: bool | None = None) -> torch.Tensor:
        """The model on sampled weights (training: new noise each call) or on the means (``sample=False``;
        the default in eval mode)."""
        if sample is None:
            sample = self.training
        if sample:
            blocks = self.sample_blocks(TRAINING_STREAMS + self.steps % (2**31 - 1))
            if self.training:
                self.steps += 1
        else:
            blocks = self.mean_blocks()
        return functional_call(self.model, self.unpack(blocks), (x,), strict=False)


class MeanKLNetwork(_Coded):
    """Mean-KL variational weights: each coding block's KL is exactly ``bits_per_block · ln 2``
    nats, whatever the parameters, so training minimises the task loss alone.

    Args:
        model: the network; its Linear/Conv2d weights and biases are coded.
        bits_per_block: C (default 10, as MIRACLE).
        block_size: weights per block (default 30, as MIRACLE).
        seed: names the permutation and the noise streams (uint32).
        delta: margin inside the mean's bound (see :func:`llkern.ops.mean_kl.mean_kl_sample`).
        impl: of the sampling op (``"auto"``, ``"kernel"``, ``"reference"``).
    """

    def __init__(self, model: nn.Module, *, bits_per_block: int = 10, block_size: int = 30, seed: int = 0,
                 delta: float = 0.05, impl: str = "auto") -> None:
        super().__init__(model, bits_per_block, block_size, seed)
        # checked here, not at the first training step (delta = 1 left θ infinite at once)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"MeanKLNetwork: expected delta in (0, 1), got {delta!r}")
        if impl not in IMPLS:
            raise ValueError(f"MeanKLNetwork: expected impl to be one of {IMPLS}, got {impl!r}")
        self.delta, self.impl = delta, impl
        # θ from the initial weights: μ = (1 − δ) ρ √(2κ_w) tanh θ with an even budget split
        bound = (1 - delta) * self.rho_blocks().detach() * math.sqrt(2 * self.kappa_block / block_size)
        self.theta = nn.Parameter(torch.atanh((self.initial_blocks() / bound).clamp(-0.95, 0.95)))
        self.gamma = nn.Parameter(torch.zeros(self.num_blocks, block_size))
        # Blocks already coded (llkern.compress.miracle.encode): their weights are ρ times the chosen
        # candidate's normals, whatever θ and γ say, so training the rest cannot move them.
        self.register_buffer("coded", torch.zeros(self.num_blocks, dtype=torch.bool))
        # Whether any block is coded, kept on the host: asking `coded` every forward would make the host
        # wait for the GPU. fix_blocks / release_blocks keep it; loading a state dict recomputes it.
        self._any_coded = False
        self.register_load_state_dict_post_hook(MeanKLNetwork._recount_coded)
        self.register_buffer("coded_normals", torch.zeros(self.num_blocks, block_size))

    def fix_blocks(self, first: int, normals: torch.Tensor) -> None:
        """Mark blocks ``first .. first + len(normals) − 1`` as coded, with weights ρ · ``normals``."""
        if normals.dim() != 2 or normals.shape[1] != self.block_size or not \
                0 <= first <= first + normals.shape[0] <= self.num_blocks:
            raise ValueError(f"MeanKLNetwork.fix_blocks: expected normals of shape (n, {self.block_size}) for blocks "
                             f"{first}.. within {self.num_blocks}, got {list(normals.shape)}")
        last = first + normals.shape[0]
        self.coded_normals[first:last] = normals.to(self.coded_normals)
        self.coded[first:last] = True
        self._any_coded = self._any_coded or last > first

    def release_blocks(self) -> None:
        """Forget every coded block: all weights are variational again."""
        self.coded.zero_()
        self._any_coded = False

    @staticmethod
    def _recount_coded(module: nn.Module, _incompatible_keys) -> None:
        module._any_coded = bool(module.coded.any())

    def _with_coded(self, blocks: torch.Tensor) -> torch.Tensor:
        if not self._any_coded:
            return blocks
        fixed = self.rho_blocks() * self.coded_normals
        return torch.where(self.coded[:, None], fixed.to(blocks.dtype), blocks)

    def sample_blocks(self, stream: int) -> torch.Tensor:
        # ν = 0: passed as None, so no zero tensor is made, read or kept for the backward
        return self._with_coded(mean_kl_sample(self.theta, self.gamma, None, self.rho_blocks(), seed=self.seed,
                                               stream=stream, kappa_block=self.kappa_block, delta=self.delta,
                                               impl=self.impl))

    def mean_blocks(self) -> torch.Tensor:
        theta, gamma, rho = (t.double() for t in (self.theta, self.gamma, self.rho_blocks()))
        mu = mean_kl_mean(theta, gamma, None, rho, self.kappa_block, self.delta)
        return self._with_coded(mu.to(self.theta.dtype))


class GaussianNetwork(_Coded):
    """The conventional parameterisation (MIRACLE's): per weight a mean and σ = softplus(s), the
    prior N(0, ρ²), and per block a penalty β_b KL_b whose β_b grows by ``anneal`` while KL_b is
    over the budget and shrinks while it is under (call :meth:`anneal_step` after each step).

    Args:
        model, bits_per_block, block_size, seed: as :class:`MeanKLNetwork`.
        beta: initial β_b (default 1e-8, MIRACLE's order of magnitude).
        anneal: the factor β_b moves by per step (default 1.01).
    """

    def __init__(self, model: nn.Module, *, bits_per_block: int = 10, block_size: int = 30, seed: int = 0,
                 beta: float = 1e-8, anneal: float = 1.01) -> None:
        super().__init__(model, bits_per_block, block_size, seed)
        self.mean = nn.Parameter(self.initial_blocks().clone())
        self.raw_sigma = nn.Parameter(torch.full((self.num_blocks, block_size), math.log(math.expm1(1e-3))))
        self.register_buffer("beta", torch.full((self.num_blocks,), float(beta)))
        self.anneal = anneal

    def sigma(self) -> torch.Tensor:
        return nn.functional.softplus(self.raw_sigma)

    def sample_blocks(self, stream: int) -> torch.Tensor:
        return self.mean + self.sigma() * torch.randn_like(self.mean)

    def mean_blocks(self) -> torch.Tensor:
        return self.mean

    def block_kl(self) -> torch.Tensor:
        """KL(q ‖ p) of each block, nats."""
        rho, sigma = self.rho_blocks(), self.sigma()
        kl = torch.log(rho / sigma) + (sigma**2 + self.mean**2) / (2 * rho**2) - 0.5
        return kl.sum(dim=1)

    def penalty(self) -> torch.Tensor:
        """Σ_b β_b KL_b, to add to the task loss."""
        return (self.beta * self.block_kl()).sum()

    @torch.no_grad()
    def anneal_step(self) -> None:
        over = self.block_kl() > self.kappa_block
        self.beta.mul_(torch.where(over, self.anneal, 1.0 / self.anneal))
