"""CPU benchmark of the similarity-matrix losses, forward + backward, side by side with eager
PyTorch (the loss written over the whole N×N matrix, as users do) and torch.compile.

Shape: N = 4096 rows, d = 128, fp32 (issue 4's CPU shape); labels from 10 classes. Floor: the
matrix products. InfoNCE one-way and supervised contrastive need three N×N×d products (the
logits, then d rows and d columns), symmetric InfoNCE four (the logits twice: once for the row
and column statistics, once for the gradient), Rényi MI three. 2·N²·d = 4.3 GFLOP each, at the
GEMM rate ``test_gemm_rate`` measures on this machine. Peak extra memory is measured per variant
in a fresh process. Rows are appended to bench/results/results.jsonl.

Inf-CL (PyPI ``inf-cl``) is CUDA-only: it belongs to the GPU script.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from common import append_result, peak_rss_extra_mib

import llkern

N, D, CLASSES, TAU = 4096, 128, 10, 0.07
SETUP = (f"torch.manual_seed(0); a = torch.randn({N}, {D}, requires_grad=True); "
         f"b = torch.randn({N}, {D}, requires_grad=True); y = torch.randint(0, {CLASSES}, ({N},)); "
         f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
         "from bench_similarity import LOSSES")


def eager_info_nce(a, b, y):
    s = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / TAU
    return F.cross_entropy(s, torch.arange(a.shape[0]))


def eager_info_nce_symmetric(a, b, y):
    s = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / TAU
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))


def eager_supcon(a, b, y):
    z = F.normalize(a, dim=1)
    s = z @ z.T / TAU
    self_mask = torch.eye(z.shape[0], dtype=torch.bool)
    log_prob = s - torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    count = positive.sum(1)
    per_anchor = -(log_prob * positive).sum(1) / count.clamp_min(1)
    return per_anchor[count > 0].mean()


def eager_renyi(a, b, y):
    # MOLE's estimator as written over the full Gram matrices
    sigma = 8.0
    sq = (a * a).sum(1)
    k = torch.exp(-(sq[:, None] + sq[None, :] - 2 * a @ a.T).clamp_min(0) / (2 * sigma**2))
    same = (y[:, None] == y[None, :]).float()

    def entropy(m):
        m = m / m.diagonal().sum()
        return -torch.log2((m * m).sum())

    return entropy(k) + entropy(same) - entropy(k * same)


LOSSES = {
    "info_nce": (eager_info_nce, lambda a, b, y: llkern.functional.info_nce(a, b, TAU, impl="kernel")),
    "info_nce_symmetric": (eager_info_nce_symmetric,
                           lambda a, b, y: llkern.functional.info_nce(a, b, TAU, symmetric=True, impl="kernel")),
    "supcon": (eager_supcon, lambda a, b, y: llkern.functional.supcon_loss(a, y, TAU, impl="kernel")),
    "renyi_mi": (eager_renyi, lambda a, b, y: -llkern.functional.renyi_mutual_information(a, y, sigma=8.0,
                                                                                          impl="kernel")),
}


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    a = torch.randn(N, D, requires_grad=True)
    b = torch.randn(N, D, requires_grad=True)
    y = torch.randint(0, CLASSES, (N,))
    return a, b, y


def _run(benchmark, loss_name, impl, fn, inputs, step_code=None):
    a, b, y = inputs

    def step():
        fn(a, b, y).backward()
        a.grad = b.grad = None

    benchmark.pedantic(step, rounds=7, warmup_rounds=1)
    stats = benchmark.stats.stats
    row = {"op": f"{loss_name} fwd+bwd", "shape": [N, D], "dtype": "float32", "impl": impl,
           "median_ms": 1e3 * stats.median, "iqr_ms": 1e3 * stats.iqr}
    if step_code is not None:
        row["extra_MiB"] = peak_rss_extra_mib(SETUP, step_code, repeats=2)
    append_result(row)


@pytest.mark.benchmark(group="similarity-gemm")
def test_gemm_rate(benchmark, inputs):
    # one N×N×d product, into a block-sized output as the kernels use it: the floor's unit
    a = inputs[0].detach()
    out = torch.empty(256, N)

    def products():
        for r0 in range(0, N, 256):
            torch.mm(a[r0:r0 + 256], a.T, out=out)

    benchmark.pedantic(products, rounds=10, warmup_rounds=2)
    median = benchmark.stats.stats.median
    append_result({"op": "similarity floor: one N×N×d product", "shape": [N, D], "dtype": "float32",
                   "impl": "torch.mm (MKL)", "median_ms": 1e3 * median, "iqr_ms": 1e3 * benchmark.stats.stats.iqr,
                   "gflops": 2 * N * N * D / median / 1e9})


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.benchmark(group="similarity-4096x128")
def test_llkern(benchmark, inputs, loss_name):
    _run(benchmark, loss_name, "llkern", LOSSES[loss_name][1], inputs,
         f"LOSSES[{loss_name!r}][1](a, b, y).backward(); a.grad = b.grad = None")


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.benchmark(group="similarity-4096x128")
def test_eager(benchmark, inputs, loss_name):
    _run(benchmark, loss_name, "eager", LOSSES[loss_name][0], inputs,
         f"LOSSES[{loss_name!r}][0](a, b, y).backward(); a.grad = b.grad = None")


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.benchmark(group="similarity-4096x128")
def test_torch_compile(benchmark, inputs, loss_name):
    _run(benchmark, loss_name, "torch.compile", torch.compile(LOSSES[loss_name][0]), inputs)
