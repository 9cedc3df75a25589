"""CPU benchmark of the transport penalty, forward + backward, against eager PyTorch and torch.compile.

Run: ``make bench`` (or ``pytest bench/bench_transport.py``). Each result is appended to
bench/results/results.jsonl.

Floor (r given, fp32, N elements): on the CPU llkern reads r and writes dr in the forward's
one pass and the backward hands dr over: 8N bytes, 134 MB at N = 16M, the bytes of one copy
of r. ``test_copy_bandwidth`` measures that copy, so its time is the floor.
"""

from __future__ import annotations

import pytest
import torch
from common import append_result

import llkern
from llkern.reference.transport import transport_penalty_reference

N = 16 * 2**20


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    return torch.randn(N, requires_grad=True)


def _record(benchmark, impl: str, bytes_moved: int | None = None) -> None:
    stats = benchmark.stats.stats
    row = {"op": "transport_penalty fwd+bwd", "shape": [N], "dtype": "float32", "impl": impl,
           "median_ms": 1e3 * stats.median, "iqr_ms": 1e3 * stats.iqr}
    if bytes_moved:
        row["GB_per_s"] = bytes_moved / stats.median / 1e9
    append_result(row)


def _step(fn, y):
    def run():
        loss = fn(y)
        loss.backward()
        y.grad = None
    return run


@pytest.mark.benchmark(group="transport-16M-fp32")
def test_copy_bandwidth(benchmark):
    src, dst = torch.randn(N), torch.empty(N)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=20, warmup_rounds=3)
    _record(benchmark, "copy (bandwidth reference)", bytes_moved=8 * N)


@pytest.mark.benchmark(group="transport-16M-fp32")
def test_llkern(benchmark, residual):
    benchmark.pedantic(_step(lambda y: llkern.transport_penalty(y, impl="kernel"), residual), rounds=20,
                       warmup_rounds=3)
    _record(benchmark, "llkern", bytes_moved=8 * N)


@pytest.mark.benchmark(group="transport-16M-fp32")
def test_eager(benchmark, residual):
    benchmark.pedantic(_step(lambda y: transport_penalty_reference(y), residual), rounds=20, warmup_rounds=3)
    _record(benchmark, "eager")


@pytest.mark.benchmark(group="transport-16M-fp32")
def test_torch_compile(benchmark, residual):
    compiled = torch.compile(lambda y: transport_penalty_reference(y))
    benchmark.pedantic(_step(compiled, residual), rounds=20, warmup_rounds=3)
    _record(benchmark, "torch.compile")
