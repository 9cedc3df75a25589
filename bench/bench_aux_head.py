"""CPU benchmark of the fused auxiliary head, forward + backward, side by side with eager PyTorch,
torch.compile and ``F.linear_cross_entropy`` (when the installed torch has it).

Shape: features 1024×64×8×8 fp32 → 10 classes (a CIFAR-ResNet stage's head). Floor: read the
features once (16 MiB) and write their gradient once (16 MiB): the time of one 16 MiB copy,
measured by ``test_copy_16mib``. Peak extra memory is measured per variant in a fresh process
(resident set above the inputs). Rows are appended to bench/results/results.jsonl.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import append_result, peak_rss_extra_mib

import llkern

SHAPE, CLASSES = (1024, 64, 8, 8), 10
SETUP = (f"torch.manual_seed(0); f = torch.randn({SHAPE}, requires_grad=True); "
         f"w = torch.randn({CLASSES}, {SHAPE[1]}, requires_grad=True); b = torch.randn({CLASSES}, requires_grad=True); "
         f"t = torch.randint(0, {CLASSES}, ({SHAPE[0]},))")
STEPS = {
    "llkern": "llkern.functional.aux_head_loss(f, w, b, t, impl='kernel').backward(); f.grad = w.grad = b.grad = None",
    "eager": "F.cross_entropy(F.linear(f.mean((2, 3)), w, b), t).backward(); f.grad = w.grad = b.grad = None",
}


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    f = torch.randn(*SHAPE, requires_grad=True)
    w = torch.randn(CLASSES, SHAPE[1], requires_grad=True)
    b = torch.randn(CLASSES, requires_grad=True)
    t = torch.randint(0, CLASSES, (SHAPE[0],))
    return f, w, b, t


def eager_loss(f, w, b, t):
    return F.cross_entropy(F.linear(f.mean((2, 3)), w, b), t)


def _run(benchmark, impl, loss_fn, inputs, step_code=None):
    f, w, b, t = inputs

    def step():
        loss_fn(f, w, b, t).backward()
        f.grad = w.grad = b.grad = None

    benchmark.pedantic(step, rounds=50, warmup_rounds=5)
    stats = benchmark.stats.stats
    row = {"op": "aux_head_loss fwd+bwd", "shape": [*SHAPE, CLASSES], "dtype": "float32", "impl": impl,
           "median_ms": 1e3 * stats.median, "iqr_ms": 1e3 * stats.iqr}
    if step_code is not None:
        row["extra_MiB"] = peak_rss_extra_mib(SETUP, step_code)
    append_result(row)


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
def test_copy_16mib(benchmark, inputs):
    src = inputs[0].detach()
    dst = torch.empty_like(src)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=50, warmup_rounds=5)
    stats = benchmark.stats.stats
    append_result({"op": "aux_head_loss fwd+bwd", "shape": [*SHAPE, CLASSES], "dtype": "float32",
                   "impl": "copy of the features (floor)", "median_ms": 1e3 * stats.median, "iqr_ms": 1e3 * stats.iqr})


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
def test_llkern(benchmark, inputs):
    _run(benchmark, "llkern", lambda f, w, b, t: llkern.functional.aux_head_loss(f, w, b, t, impl="kernel"), inputs,
         STEPS["llkern"])


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
def test_eager(benchmark, inputs):
    _run(benchmark, "eager", eager_loss, inputs, STEPS["eager"])


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
def test_torch_compile(benchmark, inputs):
    _run(benchmark, "torch.compile", torch.compile(eager_loss), inputs)


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy")
def test_torch_linear_cross_entropy(benchmark, inputs):
    def loss(f, w, b, t):
        return F.linear_cross_entropy(f.mean((2, 3)), w, t, linear_bias=b)

    _run(benchmark, "F.linear_cross_entropy", loss, inputs)
