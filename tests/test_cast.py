"""cast_pooled: the same values as Tensor.to, any layout, a new tensor every time, opcheck, bad input."""

import pytest
import torch

from llkern._ext import kernel_available
from llkern.ops.cast import cast_pooled

pytestmark = pytest.mark.skipif(not kernel_available("cast_pooled", "cpu"), reason="llkern._C not built")

PAIRS = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
         (torch.float16, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float32)]


@pytest.mark.parametrize(("source", "target"), PAIRS)
@pytest.mark.parametrize("numel", [1, 7, 97, 1025, 1 << 20])  # the largest comes from the buffer pool
def test_matches_to(source, target, numel):
    x = (torch.randn(numel, dtype=torch.float64) * 100).to(source)
    x[0] = float("inf")
    out = cast_pooled(x, target)
    assert out.dtype == target and out.shape == x.shape
    assert torch.equal(out, x.to(target))
    assert out.data_ptr() != x.data_ptr()  # a new tensor even when the dtype is the same


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_layouts(layout):
    base = torch.randn(4, 6, 5, 7)
    x = {"transposed": base.transpose(1, 3), "channels_last": base.to(memory_format=torch.channels_last),
         "sliced": base[:, ::2, 1:]}[layout]
    out = cast_pooled(x, torch.bfloat16)
    assert torch.equal(out, x.to(torch.bfloat16))


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_sparse_tensors_are_converted_by_to(layout):
    dense = torch.randn(8, 9) * (torch.rand(8, 9) < 0.3)
    x = dense.to_sparse() if layout == torch.sparse_coo else dense.to_sparse_csr()
    out = cast_pooled(x, torch.bfloat16)
    assert out.layout == layout and torch.equal(out.to_dense(), dense.to(torch.bfloat16))


def test_pooled_buffers_are_reused_safely():
    # A freed pooled buffer serves the next call: values must never leak between calls.
    for step in range(3):
        x = torch.full((1 << 20,), float(step))
        out = cast_pooled(x, torch.bfloat16)
        assert torch.equal(out, torch.full((1 << 20,), float(step), dtype=torch.bfloat16))
        del out


def test_opcheck():
    x = torch.randn(3, 5, 7)
    torch.library.opcheck(torch.ops.llkern.cast_pooled.default, (x, torch.bfloat16))
    torch.library.opcheck(torch.ops.llkern.cast_pooled.default, (x.transpose(0, 2), torch.float16))


def test_bad_input():
    with pytest.raises(TypeError, match="expected x to be a Tensor"):
        cast_pooled([1.0], torch.float32)
    with pytest.raises(TypeError, match=r"expected dtype to be a torch\.dtype"):
        cast_pooled(torch.ones(3), "bfloat16")
