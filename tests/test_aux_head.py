"""Fused auxiliary head op: values, gradients and correct counts against float64, opcheck, compile, bad input."""

import os
import subprocess
import sys

import pytest
import torch

from llkern._ext import kernel_available
from llkern.ops.aux_head import aux_head_loss
from llkern.reference.aux_head import aux_head_loss_reference

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not kernel_available("aux_head_loss", "cpu"), reason="llkern._C not built")


def make(shape, classes, device="cpu", dtype=torch.float32, bias=True, ignore_some=True):
    features = torch.randn(*shape, device=device).to(dtype).requires_grad_()
    channels = shape[1] if len(shape) == 4 else shape[-1]
    weight = (torch.randn(classes, channels, device=device) / channels**0.5).to(dtype).requires_grad_()
    b = torch.randn(classes, device=device).to(dtype).requires_grad_() if bias else None
    target_shape = shape[:2] if len(shape) == 3 else shape[:1]
    target = torch.randint(0, classes, target_shape, device=device)
    if ignore_some and target.numel() > 1:
        target.view(-1)[::3] = -100
    return features, weight, b, target


def reference64(features, weight, bias, target, **kwargs):
    inputs = [t.detach().double().requires_grad_() for t in (features, weight) + ((bias,) if bias is not None else ())]
    f, w = inputs[:2]
    b = inputs[2] if bias is not None else None
    loss, correct = aux_head_loss_reference(f, w, b, target, **kwargs)
    grads = torch.autograd.grad(loss, inputs) if loss.requires_grad else [torch.zeros_like(t) for t in inputs]
    return loss.detach(), correct, grads


SHAPES = [  # (features shape, classes): odd sizes — 1 class, 7 channels, 97 tokens, 1025 classes
    ((6, 7, 3, 5), 11),
    ((5, 7), 1),
    ((1, 7), 3),
    ((2, 97, 7), 13),
    ((4, 9, 2, 2), 1025),
    ((3, 16), 1025),
    # vector paths: channels a multiple of 8 plus a tail, classes 4k + 2, rows over several blocks
    ((70, 64), 10),
    ((33, 27, 2, 2), 9),
    ((37, 45, 3, 3), 7),  # 45 channels = a 32-channel tile, an 8-wide chunk and 5 more; 7 classes
    # classes x channels > 65536: the chunked path (logits a chunk of rows at a time, BLAS products)
    ((3, 70, 2, 2), 1000),
    ((5, 70), 1025),
    ((2, 3, 70), 1025),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,classes", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_float64_reference(device, shape, classes, reduction, smoothing):
    features, weight, bias, target = make(shape, classes, device)
    kwargs = dict(ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
    loss, correct = aux_head_loss(features, weight, bias, target, **kwargs, return_correct=True, impl="kernel")
    grads = torch.autograd.grad(loss, [features, weight, bias])
    ref_loss, ref_correct, ref_grads = reference64(features, weight, bias, target, **kwargs)
    assert loss.dtype == torch.float32 and correct.dtype == torch.int64
    assert correct.item() == ref_correct.item()
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32 and g.shape == r.shape
        torch.testing.assert_close(g.double().cpu(), r.cpu(), rtol=1e-4, atol=1e-6)


def assert_kernel_matches_reference(features, weight, bias, target, grad_atol=1e-6, **kwargs):
    """The kernel's loss, correct count and gradients against the float64 reference."""
    loss, correct = aux_head_loss(features, weight, bias, target, return_correct=True, impl="kernel", **kwargs)
    grads = torch.autograd.grad(loss, [t for t in (features, weight, bias) if t is not None])
    ref_loss, ref_correct, ref_grads = reference64(features, weight, bias, target, **kwargs)
    assert correct.item() == ref_correct.item()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=grad_atol)


def test_chunked_path_across_several_chunks():
    # 4300 rows x 1000 classes: more logits than one 2^22-element chunk holds.
    features, weight, bias, target = make((4300, 66), 1000)
    assert_kernel_matches_reference(features, weight, bias, target, grad_atol=1e-7, label_smoothing=0.05)


IN_PASS_ROWS = 64 * torch.get_num_threads() + 5  # two 32-row blocks per CPU thread, and a partial one


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pooling_inside_the_head_pass(layout, dtype):
    # With at least two 32-row blocks per thread the CPU kernel pools each block just before
    # classifying it (fewer rows pool first, over all planes); 8x8 planes take the AVX2 loop.
    # (16-bit features: test_low_precision_error_relative_to_pytorch.)
    features, weight, bias, target = make((IN_PASS_ROWS, 24, 8, 8), 7, dtype=dtype, ignore_some=True)
    if layout == "channels_last":
        features = features.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert_kernel_matches_reference(features, weight, bias, target, label_smoothing=0.1)


def test_thread_count_changes_no_bit():
    # 70 rows = three 32-row blocks: one thread pools inside the row pass, two threads pool first
    # over all planes; the sums are the same either way, so the results are equal bit for bit.
    features, weight, bias, target = make((70, 24, 8, 8), 7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = aux_head_loss(features, weight, bias, target, label_smoothing=0.1, impl="kernel")
            results.append([loss, *torch.autograd.grad(loss, [features, weight, bias])])
            with torch.no_grad():  # the forward alone (no gradients formed) agrees too
                results[-1].append(aux_head_loss(features, weight, bias, target, label_smoothing=0.1, impl="kernel"))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(results[0][0], results[0][-1])


# (channels, classes): the CPU's fused path, and the chunked one (70 x 1000 > 65536) that CUDA always takes
HEAD_PATHS = [(16, 5), (70, 1000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels,classes", HEAD_PATHS)
def test_non_finite_features_of_ignored_rows_do_not_reach_the_gradients(device, channels, classes):
    features, weight, bias, target = make((40, channels), classes, device, ignore_some=False)
    target[[3, 35]] = -100
    with torch.no_grad():
        features[3, 2] = float("inf")
        features[35, 0] = float("nan")
    loss = aux_head_loss(features, weight, bias, target, impl="kernel")
    grads = torch.autograd.grad(loss, [features, weight, bias])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][[3, 35]], torch.zeros(2, channels, device=device))
    keep = target != -100
    ref_loss, _, ref_grads = reference64(features[keep], weight, bias, target[keep])
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1].double(), ref_grads[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2].double(), ref_grads[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_non_contiguous(device):
    features, weight, bias, target = make((4, 6, 5, 3), 9, device)
    cl = features.detach().to(memory_format=torch.channels_last).requires_grad_()
    loss = aux_head_loss(cl, weight, bias, target, impl="kernel")
    (d_cl,) = torch.autograd.grad(loss, cl)
    assert d_cl.is_contiguous(memory_format=torch.channels_last)
    _, _, (ref_df, *_) = reference64(cl, weight, bias, target)
    torch.testing.assert_close(d_cl.double().cpu(), ref_df.cpu(), rtol=1e-5, atol=1e-7)
    # channels_last on the chunked path (classes x channels > 65536).
    cl_big = torch.randn(3, 70, 3, 2, device=device).to(memory_format=torch.channels_last).requires_grad_()
    w_big = torch.randn(1000, 70, device=device, requires_grad=True)
    t_big = torch.randint(0, 1000, (3,), device=device)
    (d_big,) = torch.autograd.grad(aux_head_loss(cl_big, w_big, None, t_big, impl="kernel"), cl_big)
    _, _, (ref_big, _) = reference64(cl_big, w_big, None, t_big)
    torch.testing.assert_close(d_big.double().cpu(), ref_big.cpu(), rtol=1e-5, atol=1e-7)
    # A strided view (neither layout) and a transposed weight.
    base = torch.randn(4, 12, 5, 3, device=device)
    strided = base[:, ::2].requires_grad_()
    w_t = torch.randn(6, 9, device=device).t().requires_grad_()
    loss = aux_head_loss(strided, w_t, None, target, impl="kernel")
    d_f, d_w = torch.autograd.grad(loss, [strided, w_t])
    _, _, (ref_df, ref_dw) = reference64(strided, w_t, None, target)
    torch.testing.assert_close(d_f.double().cpu(), ref_df.cpu(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d_w.double().cpu(), ref_dw.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# 4-D features pooled before or inside the row pass; 2-D and 3-D ones converted block by block
@pytest.mark.parametrize("shape", [(64, 32, 4, 4), (IN_PASS_ROWS, 24, 8, 8), (IN_PASS_ROWS, 45), (3, 37, 40)])
def test_low_precision_error_relative_to_pytorch(device, dtype, shape):
    features, weight, bias, target = make(shape, 10, device, dtype)
    loss = aux_head_loss(features, weight, bias, target, impl="kernel")
    grads = torch.autograd.grad(loss, [features, weight, bias])
    ref_loss, _, ref_grads = reference64(features, weight, bias, target)
    # PyTorch eager in the same dtype.
    f, w, b = (t.detach().clone().requires_grad_() for t in (features, weight, bias))
    rows = f.mean((2, 3)) if f.dim() == 4 else f
    logits = torch.nn.functional.linear(rows, w, b).reshape(-1, w.shape[0])
    torch_loss = torch.nn.functional.cross_entropy(logits, target.reshape(-1))
    torch_grads = torch.autograd.grad(torch_loss, [f, w, b])

    def err(a, r):
        return ((a.double().cpu() - r.cpu()).norm() / r.norm().clamp_min(1e-30)).item()

    assert err(loss, ref_loss) <= max(2 * err(torch_loss, ref_loss), 1e-6)
    for g, t, r in zip(grads, torch_grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert err(g, r) <= 2 * err(t, r) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("channels,classes", HEAD_PATHS)
def test_autocast_casts_float32_weights_to_the_16_bit_features(device, impl, channels, classes):
    # (the chunked path once ran its products under autocast: 16-bit logits read as fp32, memory corrupted)
    features, weight, bias, target = make((16, channels, 3, 3), classes, device, torch.bfloat16)
    weight32, bias32 = (t.detach().float().requires_grad_() for t in (weight, bias))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = aux_head_loss(features, weight32, bias32, target, impl=impl)
    d_w32, d_b32 = torch.autograd.grad(loss, [weight32, bias32])
    # the same as the op in bf16 on bf16 parameters, with the gradients widened to the float32 parameters
    expected = aux_head_loss(features, weight, bias, target, impl=impl)
    d_w, d_b = torch.autograd.grad(expected, [weight, bias])
    assert torch.equal(loss, expected)
    assert d_w32.dtype == torch.float32 and torch.equal(d_w32, d_w.float()) and torch.equal(d_b32, d_b.float())
    # outside autocast the mismatch is an error that names it; so is a mismatch autocast would not make
    with pytest.raises(TypeError, match="dtype of features"):
        aux_head_loss(features, weight32, bias32, target, impl=impl)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16), \
            pytest.raises(TypeError, match="dtype of features"):
        aux_head_loss(features, weight32.double(), None, target, impl=impl)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    features, weight, bias, target = make((4, 5), 3)
    target.fill_(-100)
    loss, correct = aux_head_loss(features, weight, bias, target, return_correct=True, impl="kernel")
    assert loss.item() == 0.0 and correct.item() == 0
    for g in torch.autograd.grad(loss, [features, weight, bias]):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_custom_ignore_index_and_int32_target(impl):
    features, weight, bias, target = make((8, 5), 4, ignore_some=False)
    target[1] = 7
    loss = aux_head_loss(features, weight, bias, target.int(), ignore_index=7, impl=impl)
    ref_loss, _, _ = reference64(features, weight, bias, target, ignore_index=7)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [6, 70])  # the fused path, and the chunked one (70 x 1000 > 65536)
def test_correct_count_takes_the_first_of_tied_logits(channels):
    # Zero weights and bias: every class ties, so the prediction is class 0, as torch.argmax says.
    features = torch.randn(9, channels)
    weight, bias = torch.zeros(1000, channels), torch.zeros(1000)
    target = torch.tensor([0, 1, 0, 999, 0, 5, 0, 0, 2])
    _, correct = aux_head_loss(features, weight, bias, target, return_correct=True, impl="kernel")
    assert correct.item() == 5


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5), (6, 5, 2, 2)])
def test_retained_graph_backwards_accumulate(shape):
    features, weight, bias, target = make(shape, 4)
    loss = aux_head_loss(features, weight, bias, target, impl="kernel")
    for _ in range(3):
        loss.backward(retain_graph=True)
    _, _, ref = reference64(features, weight, bias, target)
    for param, r in zip((features, weight, bias), ref, strict=True):
        torch.testing.assert_close(param.grad.double(), 3 * r, rtol=1e-5, atol=1e-7)


def test_scaled_upstream_gradient():
    features, weight, bias, target = make((6, 7, 2, 2), 5)
    loss = aux_head_loss(features, weight, bias, target, impl="kernel")
    grads = torch.autograd.grad(2.5 * loss, [features, weight, bias])
    _, _, ref = reference64(features, weight, bias, target)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g.double(), 2.5 * r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5), (6, 5, 2, 2)])
def test_scaled_gradients_reuse_the_saved_memory_only_when_nothing_else_can_see_it(shape):
    # A scaled upstream gradient (a GPU one always counts as scaled) multiplies the saved gradients in
    # place on the graph's last backward, so d weight (and d rows) are not copied at the peak.
    features, weight, bias, target = make(shape, 4)
    _, _, ref = reference64(features, weight, bias, target)
    loss, _, grad_rows, grad_weight, grad_bias = torch.ops.llkern.aux_head_loss(
        features, weight, bias, target, -100, 0.0, "mean", True)
    pointer = grad_weight.data_ptr()
    del grad_rows, grad_weight, grad_bias
    (3.0 * loss).backward()
    assert weight.grad.data_ptr() == pointer
    for param, r in zip((features, weight, bias), ref, strict=True):
        torch.testing.assert_close(param.grad.double(), 3 * r, rtol=1e-5, atol=1e-7)
    # A retained graph keeps its saved gradients unscaled for the next backward.
    for p in (features, weight, bias):
        p.grad = None
    loss = aux_head_loss(features, weight, bias, target, impl="kernel")
    (3.0 * loss).backward(retain_graph=True)
    (5.0 * loss).backward()
    for param, r in zip((features, weight, bias), ref, strict=True):
        torch.testing.assert_close(param.grad.double(), 8 * r, rtol=1e-5, atol=1e-7)
    # Nor are tensors a saved-tensor hook kept (the hook may hand them to the caller).
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t), t)[1], lambda t: t):
        loss = aux_head_loss(features, weight, bias, target, impl="kernel")
    before = [t.clone() for t in kept]
    torch.autograd.grad(3.0 * loss, [features, weight, bias])
    assert kept and all(torch.equal(t, b) for t, b in zip(kept, before, strict=True))
    # Outputs the caller still holds are not scaled under them.
    loss, _, grad_rows, grad_weight, grad_bias = torch.ops.llkern.aux_head_loss(
        features, weight, bias, target, -100, 0.0, "mean", True)
    held = [t.clone() for t in (grad_rows, grad_weight, grad_bias)]
    torch.autograd.grad(2.0 * loss, [features, weight, bias])
    for t, h in zip((grad_rows, grad_weight, grad_bias), held, strict=True):
        assert torch.equal(t, h)


@pytest.mark.parametrize("shape", [(IN_PASS_ROWS, 45), (3, 37, 40), (5, 70), (2, 3, 70)])
def test_low_memory_changes_nothing_on_the_cpu(shape):
    # (bfloat16 heads compute in float32 on the CPU; the GPU's low-memory head is in test_cuda_emulated)
    features, weight, bias, target = make(shape, 1000 if shape[-1] == 70 else 10, dtype=torch.bfloat16)
    outs = []
    for low_memory in (False, True):
        loss, correct = aux_head_loss(features, weight, bias, target, return_correct=True, low_memory=low_memory,
                                      impl="kernel")
        outs.append([loss, correct, *torch.autograd.grad(loss, [features, weight, bias])])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_low_memory_error_relative_to_pytorch(device):
    # 1000 tokens x 32000 classes: two chunks of bfloat16 logits on a GPU (768 rows each), so d weight is
    # rounded to bfloat16 twice; on the CPU the option changes nothing.
    features, weight, bias, target = make((1000, 24), 32000, device, torch.bfloat16)
    loss = aux_head_loss(features, weight, bias, target, low_memory=True, impl="kernel")
    grads = torch.autograd.grad(loss, [features, weight, bias])
    ref_loss, _, ref = reference64(features, weight, bias, target)
    f, w, b = (t.detach().clone().requires_grad_() for t in (features, weight, bias))
    torch_loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(f, w, b), target)
    torch_grads = torch.autograd.grad(torch_loss, [f, w, b])

    def err(a, r):
        return ((a.double().cpu() - r.cpu()).norm() / r.norm().clamp_min(1e-30)).item()

    assert err(loss, ref_loss) <= max(2 * err(torch_loss, ref_loss), 1e-6)
    for name, g, t, r in zip(("features", "weight", "bias"), grads, torch_grads, ref, strict=True):
        assert g.dtype == torch.bfloat16
        assert err(g, r) <= (1 + 2**0.5) * err(t, r) + 1e-6, name


def test_bfloat16_gradients_leave_the_op_in_bfloat16():
    # d rows and d weight of bfloat16 features come out of the op in bfloat16 (the GPU writes them so);
    # d pooled of image features, which the broadcast reads, stays float32, as does d bias.
    for shape, rows_dtype in (((5, 7), torch.bfloat16), ((2, 3, 7), torch.bfloat16), ((5, 7, 2, 2), torch.float32)):
        features, weight, bias, target = make(shape, 6, dtype=torch.bfloat16)
        _, _, d_rows, d_weight, d_bias = torch.ops.llkern.aux_head_loss(
            features, weight, bias, target, -100, 0.0, "mean", True)
        assert (d_rows.dtype, d_weight.dtype, d_bias.dtype) == (rows_dtype, torch.bfloat16, torch.float32)
    features, weight, bias, target = make((5, 7), 6, dtype=torch.float16)
    outs = torch.ops.llkern.aux_head_loss(features, weight, bias, target, -100, 0.0, "mean", True)
    assert [t.dtype for t in outs[2:]] == [torch.float32] * 3


def test_extreme_logit_range_matches_reference():
    # Logits spread over hundreds of units: exp(z - max) underflows for most classes (the
    # vectorised exponential clamps its argument at -87); loss and gradients must still match.
    features, weight, bias, target = make((40, 16), 21)
    with torch.no_grad():
        weight.mul_(60.0)
    loss = aux_head_loss(features, weight, bias, target, impl="kernel")
    grads = torch.autograd.grad(loss, [features, weight, bias])
    ref_loss, _, ref = reference64(features, weight, bias, target)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_gradients_handed_over_without_copy(shape):
    # The forward's gradients become .grad as they are once the graph is freed (no copy, no
    # scaling by an upstream 1).
    features, weight, bias, target = make(shape, 4)
    loss, _, grad_rows, grad_weight, grad_bias = torch.ops.llkern.aux_head_loss(
        features, weight, bias, target, -100, 0.0, "mean", True)
    pointers = [t.data_ptr() for t in (grad_rows, grad_weight, grad_bias)]
    del grad_rows, grad_weight, grad_bias
    loss.backward()
    assert [p.grad.data_ptr() for p in (features, weight, bias)] == pointers
    _, _, ref = reference64(features, weight, bias, target)
    for param, r in zip((features, weight, bias), ref, strict=True):
        torch.testing.assert_close(param.grad.double(), r, rtol=1e-5, atol=1e-7)


def test_baseline_isa_path_matches_reference():
    # The float kernels have AVX2+FMA copies chosen at run time; LLKERN_CPU_BASELINE=1 forces the
    # baseline ones, which run in a fresh process here (the choice is made once per process).
    script = (
        "import torch, llkern\n"
        "from llkern.reference.aux_head import aux_head_loss_reference\n"
        "torch.manual_seed(0)\n"
        "for shape, classes in [((70, 64), 10), ((33, 24, 2, 2), 9), ((37, 45, 3, 3), 7), ((5, 7), 1),\n"
        "                       ((64 * torch.get_num_threads() + 5, 20, 4, 4), 6)]:\n"
        "    f = torch.randn(*shape, requires_grad=True)\n"
        "    c = shape[1] if len(shape) == 4 else shape[-1]\n"
        "    w = torch.randn(classes, c, requires_grad=True)\n"
        "    b = torch.randn(classes, requires_grad=True)\n"
        "    t = torch.randint(0, classes, shape[:1])\n"
        "    t[::4] = -100\n"
        "    loss = llkern.functional.aux_head_loss(f, w, b, t, label_smoothing=0.1, impl='kernel')\n"
        "    g = torch.autograd.grad(loss, [f, w, b])\n"
        "    f64, w64, b64 = (x.detach().double().requires_grad_() for x in (f, w, b))\n"
        "    ref, _ = aux_head_loss_reference(f64, w64, b64, t, -100, 0.1, 'mean')\n"
        "    r = torch.autograd.grad(ref, [f64, w64, b64])\n"
        "    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)\n"
        "    for a, b in zip(g, r):\n"
        "        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LLKERN_CPU_BASELINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_double_backward_raises():
    features, weight, bias, target = make((4, 5), 3)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(aux_head_loss(features, weight, bias, target, impl="kernel"), features, create_graph=True)


def test_gradcheck_float64():
    for shape in [(3, 4, 2, 3), (3, 4), (2, 3, 4)]:
        features, weight, bias, target = make(shape, 5, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda f, w, b, t=target: aux_head_loss(f, w, b, t, label_smoothing=0.2, impl="kernel"),
            (features, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4, 2, 3), (3, 4), (2, 3, 4)])
def test_opcheck(device, shape):
    features, weight, bias, target = make(shape, 5, device)
    for with_grad in (False, True):
        torch.library.opcheck(torch.ops.llkern.aux_head_loss.default,
                              (features, weight, bias, target, -100, 0.1, "mean", with_grad))
        torch.library.opcheck(torch.ops.llkern.aux_head_loss.default,
                              (features, weight, None, target, -100, 0.0, "sum", with_grad))
        low = [t.detach().bfloat16().requires_grad_() for t in (features, weight, bias)]
        torch.library.opcheck(torch.ops.llkern.aux_head_loss.default,
                              (*low, target, -100, 0.0, "mean", with_grad, True))
    grad_pooled = torch.randn(3, 4, device=device)
    grad = torch.tensor(1.5, device=device)
    torch.library.opcheck(torch.ops.llkern.aux_head_backward.default,
                          (grad, grad_pooled, [3, 4, 2, 3], False, torch.float32))
    torch.library.opcheck(torch.ops.llkern.aux_head_backward.default,
                          (grad, grad_pooled, [3, 4, 2, 3], True, torch.bfloat16))


def test_torch_compile_fullgraph():
    features, weight, bias, target = make((4, 6, 3, 3), 7)

    def f(x, w, b, t):
        return aux_head_loss(x, w, b, t, label_smoothing=0.1, impl="kernel") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(features, weight, bias, target)
    grads = torch.autograd.grad(out, [features, weight, bias])
    ref_loss, _, ref_grads = reference64(features, weight, bias, target, label_smoothing=0.1)
    torch.testing.assert_close(out.double(), 2.0 * ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), 2.0 * r, rtol=1e-4, atol=1e-6)


def test_logits_are_not_saved_for_backward():
    from llkern.local.memory import MemoryMeter

    features, weight, bias, target = make((64, 16, 4, 4), 1000)
    with MemoryMeter(exclude=[weight, bias]) as meter:
        aux_head_loss(features, weight, bias, target, impl="kernel").backward()
    # Saved: d pooled (64x16), d weight (1000x16) and d bias in fp32; never the 64x1000 logits
    # nor the features.
    assert meter.peak_saved_bytes == 4 * (64 * 16 + 1000 * 16 + 1000)


BAD = [
    (lambda f, w, b, t: (f.int(), w, b, t), TypeError, "features to be float32"),
    (lambda f, w, b, t: (f[0, 0, 0], w, b, t), ValueError, "expected features of shape"),
    (lambda f, w, b, t: (f[:0], w, b, t[:0]), ValueError, "non-empty batch"),
    (lambda f, w, b, t: (f, w[:, :3], b, t), ValueError, "weight of shape"),
    (lambda f, w, b, t: (f, w.double(), b, t), TypeError, "dtype of features"),
    (lambda f, w, b, t: (f, w, b[:2], t), ValueError, "bias of shape"),
    (lambda f, w, b, t: (f, w, b, t.float()), TypeError, "target of dtype"),
    (lambda f, w, b, t: (f, w, b, t[:2]), ValueError, "target of shape"),
    (lambda f, w, b, t: (f, w, b, t.to("meta")), ValueError, "device"),
    (lambda f, w, b, t: (f, w, b, torch.full_like(t, 5)), ValueError, "out of range"),
    (lambda f, w, b, t: (f, w, b, torch.full_like(t, -1)), ValueError, "out of range"),
]


@pytest.mark.parametrize("mutate,error,match", BAD)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_input(mutate, error, match, impl):
    features, weight, bias, target = make((4, 6, 2, 2), 5, ignore_some=False)
    with pytest.raises(error, match=match):
        aux_head_loss(*mutate(features, weight, bias, target), impl=impl)


def test_per_token_features_with_one_label_per_sequence_are_told_to_pool():
    features, weight, bias, target = make((4, 7, 6), 5, ignore_some=False)  # (B, T, C) features, target (B, T)
    with pytest.raises(ValueError, match=r"expected target of shape \[4, 7\], got \[4\].*pool=True"):
        aux_head_loss(features, weight, bias, target[:, 0])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(low_memory="yes"), TypeError, "low_memory"),
])
def test_bad_options(kwargs, error, match):
    features, weight, bias, target = make((4, 6), 5)
    with pytest.raises(error, match=match):
        aux_head_loss(features, weight, bias, target, **kwargs)


def test_bad_input_reaching_the_op_directly():
    features, weight, bias, target = make((4, 6), 5, ignore_some=False)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.llkern.aux_head_loss(features, weight, bias, torch.full_like(target, 9), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="weight of shape"):
        torch.ops.llkern.aux_head_loss(features, weight[:, :2], bias, target, -100, 0.0, "mean", False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("args,error,match", [
    # grad_pooled of another dtype than the features' accumulation type once read past its end
    (lambda g, p: (g, p.double(), [7, 5, 3, 2], False, torch.float32), TypeError, "grad_pooled of dtype"),
    (lambda g, p: (g, p.half(), [7, 5, 3, 2], False, torch.bfloat16), TypeError, "grad_pooled of dtype"),
    (lambda g, p: (g, p, [7, 5, 3, 2], False, torch.int32), TypeError, "dtype to be float32"),
    (lambda g, p: (g, p, [7, 5, 3], False, torch.float32), ValueError, "4-D sizes"),
    (lambda g, p: (g, p, [7, 5, 0, 2], False, torch.float32), ValueError, "positive sizes"),
    (lambda g, p: (g, p[:6], [7, 5, 3, 2], False, torch.float32), ValueError, "does not match"),
    (lambda g, p: (g.expand(2), p, [7, 5, 3, 2], False, torch.float32), ValueError, "scalar grad_loss"),
])
def test_backward_op_checks_its_inputs(device, args, error, match):
    grad_loss, grad_pooled = torch.tensor(1.0, device=device), torch.randn(7, 5, device=device)
    with pytest.raises(error, match=match):
        torch.ops.llkern.aux_head_backward(*args(grad_loss, grad_pooled))
    # the same call with the right inputs works, in the features' dtype and layout
    out = torch.ops.llkern.aux_head_backward(grad_loss, grad_pooled, [7, 5, 3, 2], True, torch.bfloat16)
    expected = (grad_pooled / 6)[:, :, None, None].expand(7, 5, 3, 2).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-8, atol=0)


def test_random_configurations_match_the_reference():
    # Fixed-seed sweep over layouts, sizes and options, both CPU paths (fused and chunked).
    gen = torch.Generator().manual_seed(7)

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=gen).item()]

    for _ in range(40):
        layout = pick(["2d", "3d", "4d", "4d_cl"])
        batch, channels = pick([1, 2, 7, 33]), pick([1, 3, 16, 70])
        classes = pick([1, 2, 10, 257, 1025])
        shape = {"2d": (batch, channels), "3d": (batch, pick([1, 5]), channels),
                 "4d": (batch, channels, pick([1, 3]), pick([1, 4])),
                 "4d_cl": (batch, channels, pick([2, 3]), pick([1, 4]))}[layout]
        features, weight, bias, target = make(shape, classes, dtype=pick([torch.float32, torch.float64]),
                                              bias=pick([True, False]), ignore_some=pick([True, False]))
        if layout == "4d_cl":
            features = features.detach().to(memory_format=torch.channels_last).requires_grad_()
        kwargs = dict(label_smoothing=pick([0.0, 0.3]), reduction=pick(["mean", "sum"]))
        loss, correct = aux_head_loss(features, weight, bias, target, return_correct=True, impl="kernel", **kwargs)
        inputs = [t for t in (features, weight, bias) if t is not None]
        grads = torch.autograd.grad(loss, inputs)
        ref_loss, ref_correct, ref_grads = reference64(features, weight, bias, target, **kwargs)
        context = f"{layout} {shape} classes={classes} bias={bias is not None} {kwargs} {features.dtype}"
        assert correct.item() == ref_correct.item(), context
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6, msg=context)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6, msg=context)
