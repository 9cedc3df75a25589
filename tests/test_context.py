"""Context-supply add (Triton; on the CPU under TRITON_INTERPRET=1, set in conftest): values and
gradients against float64, odd sizes, layouts, opcheck, torch.compile, bad input."""

import pytest
import torch

from llkern.ops.context import context_add, context_add_reference, triton_available

pytestmark = pytest.mark.skipif(not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                                reason="needs triton (and a GPU or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(shape, scales, dtype=torch.float32, channels_last=False):
    b, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype, device=DEVICE).to(memory_format=fmt)
    contexts = [torch.randn(b, c, s * h, s * w, dtype=dtype, device=DEVICE).to(memory_format=fmt) for s in scales]
    return x, contexts


def check(x, contexts, tol):
    x = x.detach().requires_grad_()
    contexts = [c.detach().requires_grad_() for c in contexts]
    out = context_add(x, *contexts, impl="kernel")
    assert out.dtype == x.dtype and out.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    c64 = [c.detach().double().requires_grad_() for c in contexts]
    ref = context_add_reference(x64, *c64)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x, *contexts], g.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, [x64, *c64], g)
    for a, r, c in zip(grads, ref_grads, [x, *contexts], strict=True):
        assert a.dtype == c.dtype and a.shape == c.shape
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol)
    return out, grads


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 5), (1, 7, 97, 3), (3, 2, 1, 13)])
@pytest.mark.parametrize("scales", [(1,), (2,), (4,), (2, 1), (1, 2, 4)])
def test_float64_matches_reference(shape, scales):
    x, contexts = make(shape, scales, torch.float64)
    check(x, contexts, 1e-12)


@pytest.mark.parametrize("scales", [(2,), (2, 4, 1)])
def test_channels_last_and_mixed_layouts(scales):
    x, contexts = make((2, 5, 6, 3), scales, channels_last=True)
    out, grads = check(x, contexts, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads[1:])
    # NCHW h with channels_last contexts and the reverse
    check(x.contiguous(), contexts, 1e-6)
    check(x, [c.contiguous() for c in contexts], 1e-6)


def test_non_contiguous_inputs():
    base = torch.randn(2, 4, 9, 14, dtype=torch.float64, device=DEVICE)
    x = base[:, ::2, :, ::2]  # (2, 2, 9, 7), strided
    wide = torch.randn(2, 2, 18, 30, dtype=torch.float64, device=DEVICE)
    c = wide[..., 1:15].transpose(2, 3).transpose(2, 3)  # (2, 2, 18, 14), a strided view
    assert not x.is_contiguous() and not c.is_contiguous()
    check(x, [c], 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_relative_to_float64(dtype):
    # accumulated in float32, rounded once: error within one rounding of the output dtype
    x, contexts = make((2, 3, 5, 7), (2, 1), dtype)
    out = context_add(x, *contexts, impl="kernel")
    ref = context_add_reference(x.double(), *(c.double() for c in contexts))
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= torch.finfo(dtype).eps


def test_gradcheck_and_opcheck():
    x, contexts = make((2, 2, 3, 3), (2, 1), torch.float64)
    x.requires_grad_()
    contexts = [c.requires_grad_() for c in contexts]
    assert torch.autograd.gradcheck(lambda a, b, c: context_add(a, b, c, impl="kernel"), (x, *contexts))
    # AOT dispatch traces into a triton_op's body with fake tensors, and Triton's interpreter then
    # tries to run the kernel on them: that part of opcheck runs on a GPU only (torch.compile's
    # own tracing is tested below, and passes in the interpreter).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.llkern.context_add.default, (x, contexts), test_utils=utils)
    torch.library.opcheck(torch.ops.llkern.context_add_backward.default,
                          (torch.randn(2, 2, 3, 3, device=DEVICE), [2, 1], [False, True]), test_utils=utils)


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces into a triton_op's body, and Triton's interpreter "
                    "then runs the kernels on fake tensors: GPU only")
def test_torch_compile():
    x, contexts = make((2, 3, 4, 4), (2,))
    contexts = [c.requires_grad_() for c in contexts]

    def f(a, c):
        return context_add(a, c, impl="kernel").square().sum()

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, contexts[0])
    (grad,) = torch.autograd.grad(out, contexts)
    ref = f(x, contexts[0])
    (ref_grad,) = torch.autograd.grad(ref, contexts)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_input(impl):
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="at least one context"):
        context_add(x, impl=impl)
    with pytest.raises(ValueError, match=r"contexts\[0\] of shape"):
        context_add(x, torch.randn(2, 3, 6, 8, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match=r"contexts\[1\] of shape"):
        context_add(x, torch.randn(2, 3, 8, 8, device=DEVICE), torch.randn(2, 4, 4, 4, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match="dtype and device"):
        context_add(x, torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        context_add(torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE), impl=impl)
    with pytest.raises(TypeError, match="floating-point"):
        context_add(x.long(), x.long(), impl=impl)
    with pytest.raises(ValueError, match="non-empty"):
        context_add(x[:0], x[:0], impl=impl)
    with pytest.raises(ValueError, match="impl"):
        context_add(x, x, impl="fast")


def test_three_or_more_contexts_accumulate_in_float32():
    # Two contexts per launch: with more, the partial sum between launches once went through the 16-bit
    # output, a second rounding. Now every value is rounded once: within half an ulp of the float64 sum
    # (+ float32 noise). (float16: Triton's interpreter truncates to bfloat16 where a GPU rounds.)
    x, contexts = make((2, 8, 24, 20), (1, 2, 4, 2, 1), torch.float16)
    out = context_add(x, *contexts, impl="kernel")
    ref = context_add_reference(x.double(), *(c.double() for c in contexts))
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 10)  # float16: 11 significant bits
    err = (out.double() - ref).abs()
    assert (err <= 0.5 * ulp + 1e-6 * ref.abs()).all(), (err / ulp).max()


def test_cpu_tensors_without_the_interpreter_take_the_reference():
    # Triton reads TRITON_INTERPRET when a kernel is defined: without it CPU tensors get the PyTorch reference
    # (silently: it is the CPU implementation); when it is set only after llkern's kernels were imported, with
    # one warning per op; impl="kernel" an error that says how to run it.
    import os
    import subprocess
    import sys

    script = """
import os, warnings
import torch, llkern
import llkern.triton_kernels.context_add  # imported with the interpreter off
h, c = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 8, 10)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    torch.testing.assert_close(llkern.context_add(h, c), llkern.ops.context.context_add_reference(h, c))
    llkern.mean_kl_sample(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, 4), torch.ones(3, 4), seed=1)
llkern.ops.context._warned.clear()
os.environ["TRITON_INTERPRET"] = "1"       # too late for the kernels already defined
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = llkern.context_add(h, c)
    llkern.context_add(h, c)
    w = llkern.mean_kl_sample(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, 4), torch.ones(3, 4), seed=1)
messages = [str(x.message) for x in caught if "PyTorch reference" in str(x.message)]
assert len(messages) == 2, messages  # once per op
assert "TRITON_INTERPRET=1" in messages[0], messages
torch.testing.assert_close(out, llkern.ops.context.context_add_reference(h, c))
assert torch.isfinite(w).all()
try:
    llkern.context_add(h, c, impl="kernel")
except RuntimeError as error:
    assert "TRITON_INTERPRET" in str(error), error
else:
    raise AssertionError("impl='kernel' ran")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


@pytest.mark.parametrize("channels_last", [False, True])
def test_rows_longer_than_one_launch(monkeypatch, channels_last):
    # CUDA's grid axis 1 holds 65535 tiles; longer rows (an 8192x8192 plane) take several launches. Here
    # a launch holds 2 tiles, so a 5-tile row takes three.
    from llkern.triton_kernels import context_add as kernels

    monkeypatch.setattr(kernels, "MAX_TILES", 2)
    x, contexts = make((2, 3, 50, 90) if not channels_last else (2, 60, 5, 80), (2, 1), channels_last=channels_last)
    check(x, contexts, 1e-6)
