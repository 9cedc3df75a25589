"""CPU benchmark of the fused auxiliary head, forward + backward, side by side with eager PyTorch,
torch.compile and ``F.linear_cross_entropy`` (when the installed torch has it).

Shape: features 1024×64×8×8 fp32 → 10 classes (a CIFAR-ResNet stage's head). Floor: read the
features once (16 MiB) and write their gradient once (16 MiB), each at the best rate measured
here: ``test_floor_read`` times ``features.sum()`` (a pure read), ``test_floor_write`` times
llkern's broadcast alone (a pure write with streaming stores). A plain 16 MiB copy is timed too;
it is no floor: its stores read each destination line before writing it (48 MiB of traffic).
Peak extra memory is measured per variant in a fresh process (resident set above the inputs).
Rows are appended to bench/results/results.jsonl.
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


def _time_part(benchmark, impl, fn, *args):
    benchmark.pedantic(fn, args=args, rounds=50, warmup_rounds=5)
    stats = benchmark.stats.stats
    append_result({"op": "aux_head_loss fwd+bwd", "shape": [*SHAPE, CLASSES], "dtype": "float32",
                   "impl": impl, "median_ms": 1e3 * stats.median, "iqr_ms": 1e3 * stats.iqr})


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
def test_floor_read(benchmark, inputs):
    _time_part(benchmark, "floor part: read 16 MiB (features.sum())", torch.sum, inputs[0].detach())


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
def test_floor_write(benchmark, inputs):
    grad_pooled, one = torch.randn(SHAPE[:2]), torch.ones(())
    _time_part(benchmark, "floor part: write 16 MiB (streaming stores)", torch.ops.llkern.aux_head_backward,
               one, grad_pooled, list(SHAPE), False, torch.float32)


@pytest.mark.benchmark(group="aux-head-1024x64x8x8-10")
def test_copy_16mib(benchmark, inputs):
    src = inputs[0].detach()
    _time_part(benchmark, "copy of the features (16 MiB; not a floor)", torch.empty_like(src).copy_, src)


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
