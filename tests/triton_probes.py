"""Small Triton kernels that expose the generator's device helpers to the tests (a Triton kernel can call
only module globals, so they live in a module of their own, imported when a test needs them)."""

import triton
import triton.language as tl
from llkern.triton_kernels.philox import _minus_two_log_u0


@triton.jit
def radius_squared(x0_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """out = −2 ln u0 of each x0 word (Box–Muller's radius squared)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    x0 = tl.load(x0_ptr + offsets, mask=mask, other=0).to(tl.uint32)
    tl.store(out_ptr + offsets, _minus_two_log_u0(x0), mask=mask)
