"""Activation-memory options (llkern/nn/activation_memory.py) against their exact counterparts, on the
compiled ops and on PyTorch ops.

Exact options (1-bit ReLU masks, BN+ReLU recomputation, the converter) are compared with plain PyTorch in
float64: values, input and parameter gradients, running statistics; gradcheck. Reduced-precision storage
is judged by the size of its gradient error against bfloat16's / float16's unit roundoff. Saved bytes are
measured with MemoryMeter, and the reductions asserted are the ones the layers' saving rules justify.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llkern
from llkern.local.memory import MemoryMeter
from llkern.models import PreActBlock, digits_resnet, vgg
from llkern.nn.activation_memory import (
    BatchNormReLU,
    BitMaskReLU,
    RecomputeInputConv2d,
    batch_norm_relu,
    bitmask_relu,
    convert,
    pack_bits,
    saved_tensors_in,
    unpack_bits,
)

F64 = torch.float64


@pytest.fixture(autouse=True, params=["kernels", "pytorch"])
def path(request, monkeypatch):
    """Every test runs on both paths: the compiled ops (relu_with_mask, batch_norm_relu) where llkern._C has
    them, and the same computation in PyTorch ops, which a build without the extension takes."""
    if request.param == "kernels" and not llkern.kernel_available("batch_norm_relu", "cpu"):
        pytest.skip("llkern._C not built")
    if request.param == "pytorch":
        monkeypatch.setattr("llkern.nn.activation_memory.kernel_available", lambda op, device_type: False)
    return request.param


def _away_from_zero(*shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Random values with |v| >= 0.1: never zero, so no ReLU sits on its kink in gradcheck."""
    x = torch.randn(*shape, dtype=dtype)
    return x.sign() * (x.abs() + 0.1)


def _saved_bytes(fn, params=()) -> int:
    with MemoryMeter(exclude=params) as meter:
        fn()
    return meter.peak_saved_bytes


# --- bit packing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 1, 1, 13)])
def test_pack_bits_round_trip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-mask.numel() // 8),)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_pack_bits_layout_and_non_contiguous():
    mask = torch.tensor([True, False, True, True, False, False, False, False, True])
    assert pack_bits(mask).tolist() == [1 + 4 + 8, 1]
    strided = (torch.rand(6, 10) > 0.5).t()  # logical order, whatever the strides
    assert torch.equal(unpack_bits(pack_bits(strided), strided.shape), strided)
    base = torch.rand(100) > 0.5
    original = base.clone()
    for start, stop in ((3, 51), (8, 24), (1, 2)):  # unaligned starts, whole words
        view = base[start:stop]
        assert torch.equal(unpack_bits(pack_bits(view), view.shape), view)
    assert torch.equal(base, original)  # the input is never written


def test_pack_bits_errors():
    with pytest.raises(TypeError, match="mask to be a bool tensor"):
        pack_bits(torch.ones(3))
    with pytest.raises(TypeError, match="packed to be a 1-D uint8"):
        unpack_bits(torch.ones(3), (3,))
    with pytest.raises(ValueError, match="expected 2 bytes for shape"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), (9,))


# --- 1-bit ReLU masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
def test_bitmask_relu_matches_relu(layout):
    x = _away_from_zero(3, 5, 7, 9)
    if layout == "transposed":
        x = x.transpose(1, 3)
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape, dtype=F64)
    ya, yb = torch.relu(a), bitmask_relu(b)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    assert torch.autograd.gradcheck(bitmask_relu, (x[:2, :2].clone().requires_grad_(),))


def test_bitmask_relu_gradient_edge_values():
    # PyTorch's ReLU backward: 0 where the output is <= 0 (even for an infinite gradient), passed where
    # the output is NaN.
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan"), 3.0], requires_grad=True)
    g = torch.tensor([float("inf"), 5.0, 7.0, 11.0, float("-inf")])
    x2 = x.detach().clone().requires_grad_()
    torch.relu(x).backward(g)
    BitMaskReLU()(x2).backward(g)
    assert torch.equal(x.grad, x2.grad)


def test_bitmask_relu_saves_one_bit_when_nothing_else_saves_the_output():
    # ReLU → global mean: the mean keeps nothing of its input, so the ReLU's own saving is all there is.
    x = _away_from_zero(4, 6, 5, 7).requires_grad_()
    plain = _saved_bytes(lambda: torch.relu(x).mean((2, 3)).sum().backward())
    masked = _saved_bytes(lambda: bitmask_relu(x).mean((2, 3)).sum().backward())
    assert plain == x.numel() * 8
    assert masked == -(-x.numel() // 8)


def test_bitmask_relu_before_conv_saves_nothing_more():
    # ReLU → conv: the conv saves the ReLU's output, so the mask is an addition (numel / 8 bytes).
    x = _away_from_zero(4, 6, 5, 7).requires_grad_()
    conv = nn.Conv2d(6, 3, 3).double()
    plain = _saved_bytes(lambda: conv(torch.relu(x)).sum().backward(), conv.parameters())
    masked = _saved_bytes(lambda: conv(bitmask_relu(x)).sum().backward(), conv.parameters())
    assert masked == plain + -(-x.numel() // 8)


def test_bitmask_relu_rejects_integer_input():
    with pytest.raises(TypeError, match="bitmask_relu: expected a floating-point input"):
        bitmask_relu(torch.arange(3))


# --- BatchNormReLU ----------------------------------------------------------------------------------------


def _bn_pair(channels: int, momentum: float | None = 0.1, affine: bool = True, track: bool = True):
    bn = nn.BatchNorm2d(channels, momentum=momentum, affine=affine, track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(bn, nn.ReLU()), BatchNormReLU.from_batch_norm(copy.deepcopy(bn))


def _make_input(shape, layout):
    x = torch.randn(*shape, dtype=F64) * 2 + 0.3
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        n, c, h, w = shape
        return (torch.randn(n, c, w + 2, h, dtype=F64) * 2 + 0.3).transpose(2, 3)[:, :, :, 1:w + 1]
    return x


def _same_forward_backward(ref, new, x, *, rtol_out, rtol_grad):
    """Run ``ref`` and ``new`` on copies of ``x`` with one random upstream gradient; their outputs and input
    gradients must agree. Returns ``new``'s output."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), new(xb)
    g = torch.randn(ya.shape, dtype=F64)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(yb, ya, rtol=rtol_out, atol=1e-12)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=rtol_grad, atol=1e-12)
    return yb


def _compare_steps(ref, new, shape, layout, steps, train):
    ref.train(train)
    new.train(train)
    ref_bn = ref[0] if isinstance(ref, nn.Sequential) else ref
    for _ in range(steps):
        _same_forward_backward(ref, new, _make_input(shape, layout), rtol_out=1e-12, rtol_grad=1e-10)
    for (name, p), q in zip(ref_bn.named_parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ref_bn, name), getattr(new, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize(("shape", "layout"), [
    ((8, 7, 5, 3), "contiguous"), ((4, 1, 5, 3), "contiguous"), ((16, 7, 1, 1), "contiguous"),
    ((3, 7, 5, 3), "channels_last"), ((3, 7, 5, 3), "non_contiguous"),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_relu_train_matches_bn_then_relu(shape, layout, momentum):
    ref, new = _bn_pair(shape[1], momentum)
    _compare_steps(ref, new, shape, layout, steps=3, train=True)


@pytest.mark.parametrize(("shape", "layout"), [((1, 7, 5, 3), "contiguous"), ((1, 1, 1, 1), "contiguous"),
                                               ((2, 7, 5, 3), "channels_last"), ((2, 7, 5, 3), "non_contiguous")])
def test_batch_norm_relu_eval_matches_bn_then_relu(shape, layout):
    ref, new = _bn_pair(shape[1])
    _compare_steps(ref, new, (6, *shape[1:]), "contiguous", steps=2, train=True)  # non-trivial running stats
    _compare_steps(ref, new, shape, layout, steps=2, train=False)


@pytest.mark.parametrize(("affine", "track"), [(False, True), (True, False), (False, False)])
def test_batch_norm_relu_without_affine_or_running_stats(affine, track):
    ref, new = _bn_pair(5, affine=affine, track=track)
    _compare_steps(ref, new, (4, 5, 3, 2), "contiguous", steps=2, train=True)
    _compare_steps(ref, new, (2, 5, 3, 2), "contiguous", steps=1, train=False)


def test_batch_norm_relu_gradcheck():
    x = _away_from_zero(3, 2, 3, 2).requires_grad_()
    w = (torch.rand(2, dtype=F64) + 0.5).requires_grad_()
    b = (torch.rand(2, dtype=F64) - 0.5).requires_grad_()
    rm, rv = torch.randn(2, dtype=F64) * 0.1, torch.rand(2, dtype=F64) + 0.5
    # Batch statistics: the running statistics are updated on every call and do not enter the output.
    assert torch.autograd.gradcheck(lambda x, w, b: batch_norm_relu(x, None, None, w, b, training=True), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: batch_norm_relu(x, rm, rv, w, b, training=False), (x, w, b))


def test_batch_norm_relu_state_dict_and_parameters():
    bn = nn.BatchNorm2d(6)
    fused = BatchNormReLU.from_batch_norm(bn)
    assert fused.weight is bn.weight and fused.bias is bn.bias and fused.running_mean is bn.running_mean
    assert list(fused.state_dict()) == list(bn.state_dict())
    fresh = BatchNormReLU(6)
    assert list(fresh.state_dict()) == list(nn.BatchNorm2d(6).state_dict())
    fresh.load_state_dict(bn.state_dict())
    nn.BatchNorm2d(6).load_state_dict(fresh.state_dict())
    assert not isinstance(fused, nn.BatchNorm2d)  # BN-swapping utilities must not drop its ReLU


def test_batch_norm_relu_saves_only_its_input_and_statistics():
    x = _away_from_zero(4, 6, 5, 3).requires_grad_()
    ref, new = _bn_pair(6)
    # BN → ReLU → mean: BN saves x and the ReLU saves its output; the fused node saves x only.
    plain = _saved_bytes(lambda: ref(x).mean().backward(), ref.parameters())
    fused = _saved_bytes(lambda: new(x).mean().backward(), new.parameters())
    stats = 2 * 6 * 8
    assert fused == x.numel() * 8 + stats
    assert plain >= 2 * x.numel() * 8


def test_batch_norm_relu_errors():
    bn = BatchNormReLU(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match="expected input of dtype float16, bfloat16, float32 or float64"):
        bn(torch.ones(2, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="BatchNormReLU: expected 4D input"):
        bn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected weight of shape \\[3\\]"):
        batch_norm_relu(torch.randn(2, 3, 2, 2), None, None, torch.ones(4), training=True)
    with pytest.raises(ValueError, match="training=False needs running_mean"):
        batch_norm_relu(torch.randn(2, 3, 2, 2), None, None)


def test_batch_norm_relu_bfloat16_close_to_float32():
    ref, new = _bn_pair(4)
    ref.float()
    new.float()
    x = torch.randn(6, 4, 5, 5)
    a, b = x.clone().requires_grad_(), x.bfloat16().requires_grad_()
    ya, yb = ref(a), new(b)
    assert yb.dtype == torch.bfloat16
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.bfloat16())
    torch.testing.assert_close(yb.float(), ya, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b.grad.float(), a.grad, rtol=5e-2, atol=5e-2)


# --- BatchNorm → ReLU → Conv with the conv's input recomputed --------------------------------------------


@pytest.mark.parametrize("conv_kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, bias=True),
                                         dict(kernel_size=1, groups=7, dilation=2, bias=True)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_relu_conv_matches_plain(conv_kwargs, layout):
    torch.manual_seed(3)
    kwargs = {"bias": False, **conv_kwargs}
    ref = nn.Sequential(nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 14, **kwargs)).double()
    with torch.no_grad():
        ref[0].weight.uniform_(0.5, 1.5)
        ref[0].bias.uniform_(-0.5, 0.5)
    new = convert(copy.deepcopy(ref), bn_relu_recompute=True)
    assert isinstance(new[0], BatchNormReLU) and isinstance(new[2], RecomputeInputConv2d)
    for train in (True, False):
        ref.train(train)
        new.train(train)
        yb = _same_forward_backward(ref, new, _make_input((3, 7, 6, 5), layout), rtol_out=1e-12, rtol_grad=1e-10)
        assert yb.grad_fn is not None and "BatchNormReLUConv2d" in type(yb.grad_fn).__name__
        for (name, p), q in zip(ref.named_parameters(), new.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(new[0].running_var, ref[0].running_var, rtol=1e-12, atol=1e-12)


def test_bn_relu_conv_gradcheck():
    bn = BatchNormReLU(3).double()
    conv = RecomputeInputConv2d(3, 2, 3, padding=1, bias=True).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = _away_from_zero(2, 3, 4, 3).requires_grad_()
    for train in (True, False):
        bn.train(train)
        params = (bn.weight, bn.bias, conv.weight, conv.bias)

        def fn(x, *params):
            return conv(bn(x))

        assert torch.autograd.gradcheck(fn, (x, *params))


def test_bn_relu_conv_saves_only_the_bn_input():
    x = _away_from_zero(4, 6, 5, 3).requires_grad_()
    ref = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, bias=False)).double()
    new = convert(copy.deepcopy(ref), bn_relu_recompute=True)
    plain = _saved_bytes(lambda: ref(x).sum().backward(), ref.parameters())
    fused = _saved_bytes(lambda: new(x).sum().backward(), new.parameters())
    activation, stats = x.numel() * 8, 2 * 6 * 8
    assert plain >= 2 * activation  # BN's input, and the ReLU output saved by ReLU and conv (one storage)
    assert fused == activation + stats


def test_recompute_conv_falls_back_to_plain_conv():
    bn, conv = BatchNormReLU(3).double(), RecomputeInputConv2d(3, 2, 3).double()
    x = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True)
    # An input modified in place since BatchNormReLU made it, or any other input: nn.Conv2d's own path.
    a = bn(x)
    a.mul_(2)
    assert "Convolution" in type(conv(a).grad_fn).__name__
    assert "Convolution" in type(conv(x * 1).grad_fn).__name__
    with torch.no_grad():  # no autograd, no recipe
        assert not hasattr(bn(x), "_llkern_bn_relu_recipe")


# --- reduced-precision saved tensors ----------------------------------------------------------------------


def test_saved_tensors_in_linear_uses_rounded_input():
    x = torch.randn(64, 48, requires_grad=True)
    lin = nn.Linear(48, 32)
    g = torch.randn(64, 32)
    with saved_tensors_in(torch.bfloat16):
        y = lin(x)
    y.backward(g)
    # nn.Linear saves its input for the weight gradient: that input is now bf16-rounded, the weight is not.
    torch.testing.assert_close(lin.weight.grad, g.t() @ x.detach().bfloat16().float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, g @ lin.weight.detach(), rtol=1e-6, atol=1e-6)


def _relative_error(grads, reference):
    num = sum(float((a.double() - b).pow(2).sum()) for a, b in zip(grads, reference, strict=True))
    den = sum(float(b.pow(2).sum()) for b in reference)
    return (num / den) ** 0.5


def _block_grads(model, x, y, dtype=None):
    model.zero_grad(set_to_none=True)
    if dtype is None:
        F.cross_entropy(model(x), y).backward()
    else:
        with saved_tensors_in(dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_saved_tensors_in_error_follows_unit_roundoff():
    torch.manual_seed(0)
    model = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 16, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.randn(32, 8, 6, 6), torch.randint(0, 10, (32,))
    reference = _block_grads(copy.deepcopy(model).double(), x.double(), y)
    errors = {dtype: _relative_error(_block_grads(model, x, y, dtype), reference)
              for dtype in (None, torch.bfloat16, torch.float16)}
    # Each saved activation carries a relative rounding error below the unit roundoff u (bf16 2^-8, fp16
    # 2^-11), independent from element to element: the gradients' relative error is a fraction of u, and
    # far above float32's own.
    u_bf16, u_fp16 = 2.0**-8, 2.0**-11
    assert 0.02 * u_bf16 < errors[torch.bfloat16] < u_bf16
    assert 0.02 * u_fp16 < errors[torch.float16] < u_fp16
    assert 3 < errors[torch.bfloat16] / errors[torch.float16] < 20  # u_bf16 / u_fp16 = 8
    assert errors[None] < 0.01 * errors[torch.float16]


def test_saved_tensors_in_composes_with_memory_meter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(8, 4, 10, 10)
    activation = 8 * 16 * 10 * 10 * 4  # float32 bytes of one conv output

    def step():
        model(x).sum().backward()

    full = _saved_bytes(step, model.parameters())

    def low_step():
        with saved_tensors_in(torch.bfloat16):
            loss = model(x).sum()
        loss.backward()

    low = _saved_bytes(low_step, model.parameters())
    # Saved: x (conv 1's input, 6400 elements) and two ReLU outputs, each shared by the ReLU and the
    # next conv; stored once each in bf16 because saved_tensors_in converts a shared tensor once.
    assert full == x.numel() * 4 + 2 * activation
    assert low == full // 2


@pytest.mark.parametrize("order", ["alone", "inside a meter", "around a meter", "in identity hooks",
                                   "meter in identity hooks", "both in identity hooks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_tensors_in_frees_a_graph_whose_op_saved_its_own_output(order, dtype):
    # a tensor it keeps as it is (small, or not wider than the storage dtype: a bf16 model's activations) used to
    # be held by its own graph through the handle (tensor -> grad_fn -> handle -> tensor), a cycle gc cannot
    # break: every such graph leaked ("alone"); hooks outside that keep what they are given (identity hooks) must
    # get a detached alias from it and from a meter for the same reason
    import contextlib
    import gc
    import weakref

    def contexts() -> list:
        low, meter = saved_tensors_in(torch.bfloat16), MemoryMeter()
        identity = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        return {"alone": [low], "inside a meter": [meter, low], "around a meter": [low, meter],
                "in identity hooks": [identity, low], "meter in identity hooks": [identity, meter],
                "both in identity hooks": [identity, low, meter]}[order]

    size = 10 if dtype == torch.float32 else 4096  # (too small to convert; bf16 already)
    a = torch.randn(size, dtype=dtype, requires_grad=True)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with contextlib.ExitStack() as stack:
            for context in contexts():
                stack.enter_context(context)
            b = a.exp()  # exp saves its output
        ref = weakref.ref(b)
        b.sum().backward()
        torch.testing.assert_close(a.grad, a.detach().exp())
        del b
        assert ref() is None
        with contextlib.ExitStack() as stack:  # and without a backward
            for context in contexts():
                stack.enter_context(context)
            b = a.exp()
        ref = weakref.ref(b)
        del b
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


def test_saved_tensors_in_converts_one_memory_once_whatever_tensor_object_saves_it():
    # BatchNormReLU saves x and the RecomputeInputConv2d after it saves x.detach(): another tensor object over
    # the same memory. One bfloat16 copy (two made the 'recompute + bf16' option no smaller than recompute alone)
    torch.manual_seed(0)
    block = convert(nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
                    bn_relu_recompute=True)
    assert isinstance(block[2], RecomputeInputConv2d)
    x = torch.randn(8, 16, 10, 10, requires_grad=True)

    def step():
        block(x).sum().backward()

    def low_step():
        with saved_tensors_in(torch.bfloat16):
            loss = block(x).sum()
        loss.backward()

    full, low = _saved_bytes(step, [*block.parameters(), x]), _saved_bytes(low_step, block.parameters())
    assert full < 1024  # x excluded: only per-channel statistics
    assert low - full <= x.numel() * 2  # x once, in bfloat16
    y = torch.randn(8, 16, 10, 10)
    pair = [y, y.detach()]
    with saved_tensors_in(torch.bfloat16) as context:
        assert context._pack(pair[0]) is context._pack(pair[1])
        z = y.clone()
        first = context._pack(z)
        z.add_(1)  # changed in place: a new copy
        assert context._pack(z) is not first
        assert context._pack(y[:, :8]) is not context._pack(y)  # another view of the memory: not the same values


def test_saved_tensors_in_keeps_parameters_integers_and_small_tensors():
    seen: list[torch.Tensor] = []

    def pack(t):
        seen.append(t)
        return t

    x = torch.randn(16, 32, 8, 8, requires_grad=True)
    bn, lin = nn.BatchNorm2d(32), nn.Linear(8, 8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), saved_tensors_in(torch.float16):
        out = lin(bn(x))
        idx = torch.randint(0, 8, (16, 32, 8, 4))
        out = out.gather(3, idx).sum()
    dtypes = {(tuple(t.shape), t.dtype, isinstance(t, nn.Parameter)) for t in seen}
    assert ((16, 32, 8, 8), torch.float16, False) in dtypes  # BN's input
    assert ((8, 8), torch.float32, False) in dtypes  # the Linear's weight.t(), a view of a parameter: untouched
    assert ((16, 32, 8, 4), torch.int64, False) in dtypes  # gather's index
    assert ((32,), torch.float32, False) in dtypes  # BN's per-channel statistics: below min_numel
    assert ((4096, 8), torch.float16, False) in dtypes  # the Linear's input, BN's output as (N, 8)
    out.backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_saved_tensors_in_keeps_a_sparse_tensor(layout):
    # a GCN's sparse adjacency, saved by torch.sparse.mm for the dense side's gradient, used to reach cast_pooled
    # (strided only) and fail the forward
    torch.manual_seed(0)
    dense = torch.rand(64, 64) * (torch.rand(64, 64) < 0.1)
    adjacency = dense.to_sparse() if layout == torch.sparse_coo else dense.to_sparse_csr()
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    with MemoryMeter() as meter, saved_tensors_in(torch.bfloat16, min_numel=0):
        y = torch.sparse.mm(adjacency.double(), x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, dense.double().t() @ torch.ones(64, 32, dtype=torch.float64))
    assert meter.peak_saved_bytes > 0


def test_saved_tensors_in_errors():
    with pytest.raises(TypeError, match=r"saved_tensors_in: expected dtype to be a torch\.dtype, got 'bf16'"):
        saved_tensors_in("bf16")
    with pytest.raises(ValueError, match=r"expected dtype to be torch\.bfloat16, torch\.float16 or torch\.float32, "
                                         r"got torch\.int8"):
        saved_tensors_in(torch.int8)
    with pytest.raises(ValueError, match="expected min_numel to be a non-negative int"):
        saved_tensors_in(min_numel=-1)
    context = saved_tensors_in()
    with context, pytest.raises(RuntimeError, match="not reentrant"), context:
        pass


# --- convert on digits_resnet -----------------------------------------------------------------------------


OPTIONS = [dict(relu_masks=True), dict(bn_relu_recompute=True), dict(relu_masks=True, bn_relu_recompute=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=["masks", "recompute", "both"])
def test_convert_digits_resnet_is_exact(options):
    torch.manual_seed(0)
    reference = nn.Sequential(*digits_resnet(4, width=4)).double()
    converted = convert(copy.deepcopy(reference), **options)
    names = {type(m).__name__ for m in converted.modules()}
    assert "ReLU" not in names if options.get("relu_masks") else "ReLU" in names or "BatchNormReLU" in names
    if options.get("bn_relu_recompute"):
        assert {"BatchNormReLU", "RecomputeInputConv2d"} <= names and "BatchNorm2d" not in names
    assert list(converted.state_dict()) == list(reference.state_dict())
    for train, batch in ((True, 12), (True, 5), (False, 3)):
        reference.train(train)
        converted.train(train)
        _same_forward_backward(reference, converted, torch.randn(batch, 1, 8, 8, dtype=F64), rtol_out=1e-10,
                               rtol_grad=1e-9)
    for (name, p), q in zip(reference.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), b in zip(reference.named_buffers(), converted.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


def test_convert_keeps_parameter_objects_and_optimizer():
    blocks = digits_resnet(2, width=4)
    before = [id(p) for b in blocks for p in b.parameters()]
    converted = [convert(b, relu_masks=True, bn_relu_recompute=True) for b in blocks]
    assert converted[0] is blocks[0]
    assert [id(p) for b in converted for p in b.parameters()] == before
    # The global RNG is untouched, so modules made after a conversion get the same weights as without it.
    model = nn.Sequential(*digits_resnet(2, width=4))
    state = torch.random.get_rng_state()
    convert(model, bn_relu_recompute=True, relu_masks=True)
    assert torch.equal(torch.random.get_rng_state(), state)


def _local_step_bytes(blocks, x, y, low=None) -> int:
    torch.manual_seed(0)
    net = llkern.LocalNet(blocks, num_classes=10, example_input=x[:2])
    net.local_step(x, y)  # first step sizes everything

    def step():
        if low is None:
            net.local_step(x, y)
        else:
            with saved_tensors_in(low):
                net.local_step(x, y)

    return _saved_bytes(step, net.parameters())


def test_convert_reduces_saved_bytes_of_local_step():
    torch.manual_seed(0)
    blocks = digits_resnet(4, width=8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    none = _local_step_bytes(copy.deepcopy(blocks), x, y)
    masks = _local_step_bytes([convert(copy.deepcopy(b), relu_masks=True) for b in blocks], x, y)
    recompute = _local_step_bytes([convert(copy.deepcopy(b), bn_relu_recompute=True) for b in blocks], x, y)
    low = _local_step_bytes(copy.deepcopy(blocks), x, y, torch.bfloat16)
    # The peak is module 0: the stem's input and two pre-activation blocks, each saving x, ReLU(BN(x))
    # (shared by the ReLU and conv 1), conv 1's output and the second ReLU output (shared likewise):
    # 4 activations per block. Recomputation keeps x and conv 1's output: 2 of 4, plus statistics.
    act = 32 * 8 * 8 * 8 * 4
    assert none == pytest.approx(32 * 64 * 4 + 8 * act, abs=4096)  # + per-channel statistics
    assert recompute < 0.52 * none
    # Masks do not help inside pre-activation blocks (each conv saves the ReLU output anyway): the masks
    # add 1/32 of the ReLU outputs.
    assert none < masks <= none + 4 * act // 32 + 64
    assert low < 0.52 * none


def test_convert_errors_and_edge_cases():
    with pytest.raises(TypeError, match=r"convert: expected module to be an nn\.Module, got list"):
        convert([nn.ReLU()])
    with pytest.raises(TypeError, match="expected relu_masks to be a bool"):
        convert(nn.ReLU(), relu_masks=1)
    assert isinstance(convert(nn.ReLU(), relu_masks=True), BitMaskReLU)

    class Custom(nn.Sequential):  # its own forward: entries may not run in order, so nothing is fused
        def forward(self, x):
            return self[1](self[0](x))

    custom = convert(Custom(nn.BatchNorm2d(3), nn.ReLU()), bn_relu_recompute=True)
    assert type(custom[0]) is nn.BatchNorm2d
    holder = nn.Module()
    holder.act = nn.ReLU()
    assert isinstance(convert(holder, relu_masks=True).act, BitMaskReLU)


def test_compile_fullgraph():
    # One compiled graph through all three modules (RecomputeInputConv2d takes the plain conv path under
    # compile; the compiler's partitioner makes its own recomputation choices).
    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    converted = convert(copy.deepcopy(ref), relu_masks=True, bn_relu_recompute=True)
    compiled = torch.compile(converted, fullgraph=True)
    x = torch.randn(4, 3, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), compiled(xb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(converted[0].running_var, ref[0].running_var)


def test_bn_relu_output_used_twice():
    # The conv recomputes its input; another consumer of the same output goes through BatchNormReLU's own
    # node. The gradients of both paths add up as for the plain modules.
    torch.manual_seed(0)
    ref_bn, ref_conv = nn.BatchNorm2d(3).double(), nn.Conv2d(3, 2, 3, padding=1).double()
    bn, conv = BatchNormReLU.from_batch_norm(copy.deepcopy(ref_bn)), RecomputeInputConv2d.from_conv(
        copy.deepcopy(ref_conv))
    x = _away_from_zero(4, 3, 5, 4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = torch.relu(ref_bn(xa))
    (ref_conv(a).pow(2).sum() + a.pow(3).sum()).backward()
    b = bn(xb)
    (conv(b).pow(2).sum() + b.pow(3).sum()).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-12)
    for p, q in zip([*ref_bn.parameters(), *ref_conv.parameters()], [*bn.parameters(), *conv.parameters()],
                    strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_bn_relu_conv_gradient_reaches_the_bn_output():
    # The conv hands its input's gradient to the BatchNormReLU output's node: retain_grad, hooks and
    # autograd.grad on that output see the same gradient as on a plain ReLU output.
    torch.manual_seed(1)
    ref_bn, ref_conv = nn.BatchNorm2d(3).double(), nn.Conv2d(3, 2, 3, padding=1).double()
    bn, conv = BatchNormReLU.from_batch_norm(copy.deepcopy(ref_bn)), RecomputeInputConv2d.from_conv(
        copy.deepcopy(ref_conv))
    x = _away_from_zero(4, 3, 5, 4).requires_grad_()
    a_ref = torch.relu(ref_bn(x))
    (expected,) = torch.autograd.grad(ref_conv(a_ref).pow(2).sum(), a_ref)
    a = bn(x)
    out = conv(a)
    assert "BatchNormReLUConv2d" in type(out.grad_fn).__name__
    (got,) = torch.autograd.grad(out.pow(2).sum(), a, retain_graph=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    seen = []
    a.register_hook(seen.append)
    a.retain_grad()
    out.pow(2).sum().backward()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, expected, rtol=1e-10, atol=1e-12)


def test_bn_relu_conv_in_place_change_of_the_bn_input_fails_the_backward():
    # As for BatchNorm2d → ReLU → Conv2d: the backward would recompute the conv's input from the changed x.
    bn, conv = BatchNormReLU(3).double(), RecomputeInputConv2d(3, 2, 3).double()
    plain_bn, plain_conv = nn.BatchNorm2d(3).double(), nn.Conv2d(3, 2, 3).double()
    leaf = _away_from_zero(2, 3, 5, 5).requires_grad_()
    for first, second in ((plain_bn, plain_conv), (bn, conv)):
        x = leaf * 1.0
        a = torch.relu(first(x)) if first is plain_bn else first(x)
        x.mul_(-1)  # after the BN, before the conv saves anything
        out = second(a)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_bn_relu_conv_weight_gradient_after_an_in_place_change_of_the_bn_input():
    # Only the conv's weight gradient asked for: the BN node's check never runs, so the conv itself must not
    # recompute its input from the changed x (it takes nn.Conv2d's path and keeps the input it was given).
    bn, conv = BatchNormReLU(3).double(), RecomputeInputConv2d(3, 2, 3).double()
    x = _away_from_zero(2, 3, 5, 5).requires_grad_()
    h = x * 1.0
    a = bn(h)
    h.mul_(2)
    out = conv(a)
    assert "Convolution" in type(out.grad_fn).__name__
    (got,) = torch.autograd.grad(out.square().sum(), conv.weight)
    plain = F.conv2d(a.detach(), conv.weight, conv.bias)
    (expected,) = torch.autograd.grad(plain.square().sum(), conv.weight)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F64])
def test_batch_norm_relu_gradient_passes_at_nan(dtype):
    # ReLU's backward (threshold_backward) passes the gradient where its output is NaN; so do both paths.
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    new = BatchNormReLU.from_batch_norm(copy.deepcopy(bn).to(F64 if dtype == F64 else torch.float32)).eval()
    bn.double()  # parameters in float32 for 16-bit inputs, as nn.BatchNorm2d under autocast
    x = _away_from_zero(3, 2, 2, 3).abs()
    x[1, 0, 1, 2] = float("nan")
    xd = x.to(dtype).requires_grad_()
    new(xd).sum().backward()
    xr = x.to(dtype).double().requires_grad_()
    torch.relu(bn(xr)).sum().backward()
    assert xr.grad[1, 0, 1, 2] != 0
    torch.testing.assert_close(xd.grad.double(), xr.grad, rtol=1e-2, atol=0)


def test_convert_vgg_chains_units():
    # VGG units are (conv, BN, ReLU) Sequentials inside a Sequential: the BN-ReLU ending one unit feeds the
    # next unit's conv, which then recomputes its input. Before a max-pool (which saves its input) the ReLU
    # output stays saved; before the head's global average pool (a mean: it saves nothing) it goes too.
    torch.manual_seed(0)
    reference = vgg((8, 16, "M", 16), num_classes=10, in_channels=3).double()
    converted = convert(copy.deepcopy(reference), bn_relu_recompute=True)
    assert isinstance(converted.conv_1[0], RecomputeInputConv2d) and type(converted.conv_0[0]) is nn.Conv2d
    assert type(converted.conv_3[0]) is nn.Conv2d  # after the pool
    assert list(converted.state_dict()) == list(reference.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain = _saved_bytes(lambda: reference(xa).pow(2).sum().backward(), reference.parameters())
    fused = _saved_bytes(lambda: converted(xb).pow(2).sum().backward(), converted.parameters())
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-12)
    for (name, p), q in zip(reference.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    first_relu, last_relu = 4 * 8 * 6 * 6 * 8, 4 * 16 * 3 * 3 * 8  # float64 bytes
    running_stats = 2 * (8 + 16 + 16) * 8  # PyTorch's BN node also saves running_mean and running_var
    assert fused == plain - first_relu - last_relu - running_stats


def test_modules_take_the_path_of_the_build(path):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    relu_node = type(bitmask_relu(x).grad_fn).__name__
    bn_node = type(BatchNormReLU(3)(x).grad_fn).__name__
    if path == "kernels":
        assert "llkern_relu_with_mask" in relu_node and "llkern_batch_norm_relu" in bn_node
    else:
        assert relu_node == "_BitMaskReLUFunctionBackward" and bn_node == "_BatchNormReLUFunctionBackward"


def test_convert_reaches_resnet_block_entries():
    from llkern.models import resnet32

    model = resnet32(width=4).double()
    converted = convert(copy.deepcopy(model), relu_masks=True, bn_relu_recompute=True)
    assert not any(type(m) is nn.ReLU for m in converted.modules())
    # Each post-activation block has its entry ReLU and one inside its branch; the head starts with one.
    assert sum(isinstance(m, BitMaskReLU) for m in converted.modules()) == 15 + 1
    assert sum(isinstance(m, BatchNormReLU) for m in converted.modules()) == 15
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    model.train()
    converted.train()
    out, out_converted = model(x), converted(x)
    torch.testing.assert_close(out_converted, out, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    grads_converted = torch.autograd.grad(out_converted.square().sum(), list(converted.parameters()))
    for g, h in zip(grads, grads_converted, strict=True):
        torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("track", [True, False])
def test_batch_norm_relu_all_bfloat16(track):
    # Input, parameters and running statistics in bfloat16 (model.bfloat16()): statistics still in float32.
    bn = nn.BatchNorm2d(5, track_running_stats=track)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.2, 0.2)
    new = BatchNormReLU.from_batch_norm(copy.deepcopy(bn)).bfloat16()
    x = torch.randn(6, 5, 4, 4) * 3 + 1
    xb = x.bfloat16().requires_grad_()
    y = new(xb)
    assert y.dtype == torch.bfloat16
    ref = torch.relu(bn.double()(xb.detach().double()))
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn(6, 5, 4, 4)
    y.backward(g.bfloat16())
    xr = xb.detach().double().requires_grad_()
    torch.relu(bn(xr)).backward(g.bfloat16().double())
    torch.testing.assert_close(xb.grad.double(), xr.grad, rtol=5e-2, atol=5e-2)


def test_memory_profile_reports_bytes_freed_per_module():
    torch.manual_seed(0)
    blocks = digits_resnet(4, width=8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    plain = llkern.LocalNet(copy.deepcopy(blocks), num_classes=10, example_input=x[:2])
    rows = plain.memory_profile(x, y)
    assert [r.module for r in rows] == [0, 1, 2, 3]
    assert all(0 < r.freed_bytes <= r.peak_saved_bytes for r in rows)
    assert "freed by its backward" in str(rows[0])
    # The same step under one meter: its peak is the largest module's, as local training promises.
    plain.zero_grad()
    with MemoryMeter(exclude=plain.parameters()) as meter:
        plain.local_step(x, y)
    assert meter.peak_saved_bytes == max(r.peak_saved_bytes for r in rows)
    # Recomputing BN+ReLU frees less after each backward because less was saved.
    converted = llkern.LocalNet([convert(copy.deepcopy(b), bn_relu_recompute=True) for b in blocks], num_classes=10,
                                example_input=x[:2])
    smaller = converted.memory_profile(x, y)
    assert all(s.freed_bytes < r.freed_bytes for s, r in zip(smaller, rows, strict=True))
    with pytest.raises(TypeError, match="backward option"):
        plain.memory_profile(x, y, backward=lambda k, loss: loss.backward())


def test_batch_norm_relu_empty_batch_in_eval():
    # nn.BatchNorm2d accepts an empty batch in eval mode, forward and backward; so must BatchNormReLU.
    module = BatchNormReLU(3).eval()
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = module(x)
    assert y.shape == (0, 3, 4, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 3, 4, 4) and module.weight.grad.abs().sum() == 0
