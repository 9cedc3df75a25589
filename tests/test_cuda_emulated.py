"""The CUDA kernels and CUDA bindings, run on the CPU through tests/cuda_emu.

``torch.ops.llkern_emu.<op>`` is ``csrc/bindings/<op>_cuda.cpp`` and ``csrc/cuda/<op>.cu``, compiled for
the CPU with every CUDA thread a fiber (see tests/cuda_emu/include/cuda_runtime.h). Each test feeds the
emulated CUDA op and llkern's CPU op the same inputs (odd sizes, vector tails, misaligned pointers,
channels_last, every dtype) and compares: bitwise where both compute each element the same way,
else within the dtype's rounding of the CPU result, which the op's own tests hold to the float64
reference. The emulated device has 2 multiprocessors, so the one-wave grids take many grid-stride
steps. Every test runs with a block's threads scheduled in order, in reverse, and warp by warp (each
warp running ahead), which turns a missing __syncthreads into a wrong value; and once more built with
AddressSanitizer, which stops at any access outside a tensor. opcheck holds the CUDA bindings' outputs
to llkern's fake kernels. This is no substitute for the GPU (no races, no timing, no approximate
intrinsics), but it runs the kernels' index arithmetic, tails, vector paths, warp shuffles and
shared-memory reductions in CI. Slow: the two builds take about two minutes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .cuda_emu import build
from .test_aux_head import make as make_aux_head_inputs
from .test_batch_norm_relu import stats as batch_norm_stats

pytestmark = pytest.mark.slow

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Largest difference to the CPU result, as a fraction of the CPU result's largest magnitude: a few
# roundings of the output dtype (sums are formed in another order on the two devices).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def emu_ops():
    build.load()
    with build.cpu_out_dtype_products():
        yield torch.ops.llkern_emu


@pytest.fixture(params=["forward", "reverse", "warps"])
def thread_order(request, monkeypatch):
    """How the emulator schedules a block's threads (see tests/cuda_emu/include/cuda_runtime.h)."""
    monkeypatch.setenv("LLKERN_EMU_ORDER", request.param)
    return request.param


@pytest.fixture
def emu(emu_ops, thread_order):
    """torch.ops.llkern_emu, each test run under every thread order."""
    return emu_ops


def misaligned(t: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """t's values in a tensor whose data starts `offset` elements into its storage (not 16-byte aligned)."""
    flat = torch.empty(t.numel() + offset, dtype=t.dtype)[offset:]
    return flat.view(t.shape).copy_(t)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns, for bitwise comparison (NaN payloads and signed zeros included)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_outputs_close(names, emulated, cpu, dtype: torch.dtype, what: str = "") -> None:
    """assert_close on each floating output of an op (names: the outputs' names), equality on the rest."""
    for name, a, b in zip(names, emulated, cpu, strict=True):
        if a.is_floating_point():
            assert_close(a, b, dtype, f"{what} {name}")
        else:
            assert torch.equal(a, b), f"{what} {name}"


def assert_close(emulated: torch.Tensor, cpu: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert emulated.shape == cpu.shape and emulated.dtype == cpu.dtype, what
    a, b = emulated.double(), cpu.double()
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN in different places"
    a, b = a.nan_to_num(), b.nan_to_num()
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-30), f"{what}: max difference {err:.3g} at scale {scale:.3g}"


# --- the emulator itself -------------------------------------------------------------------------------


def test_emulator_runs_shuffles_ballots_and_barriers(emu):
    run = torch.ops.cuda_emu_selftest.run
    out = run("warp_ops", 2, 64).view(2, 2, 32, 4)  # block, warp, lane, (xor sum, down sum, ballot, lane 3)
    values = torch.arange(1, 65).view(2, 32)  # thread t holds t + 1
    sums = values.sum(1)
    for block in range(2):
        assert torch.equal(out[block, :, :, 0], sums[:, None].expand(2, 32).int())
        assert torch.equal(out[block, :, 0, 1], sums.int())
        assert (out[block, :, 1:, 1] == -7).all()
        assert (out[block, :, :, 2] == int(torch.tensor(0xAAAAAAAA).int())).all()
        assert torch.equal(out[block, :, :, 3], values[:, 3:4].expand(2, 32).int())
    neighbours = run("barrier", 3, 96).view(3, 96)
    expected = torch.arange(3)[:, None] * 1000 + (torch.arange(96) + 1) % 96
    assert torch.equal(neighbours, expected.int())


def test_emulator_exposes_a_missing_barrier(emu, thread_order):
    # Thread t reads thread t + 1's shared value without __syncthreads: in order, that value is not yet
    # written; in reverse, thread 95 reads thread 0's before it runs. Either way (and in every block,
    # shared memory being refilled with 0xff) the result is wrong.
    out = torch.ops.cuda_emu_selftest.run("missing_barrier", 3, 96).view(3, 96)
    expected = (torch.arange(3)[:, None] * 1000 + (torch.arange(96) + 1) % 96).int()
    wrong = out != expected
    assert wrong.any(1).all()
    assert (out[wrong] == -1).all()


def test_emulator_exposes_shared_memory_reused_without_a_barrier(emu, thread_order):
    warps = 3
    per_thread = sum(100 * r * r + r * w for r in (1, 2) for w in range(warps))
    assert (torch.ops.cuda_emu_selftest.run("reuse", 2, 32 * warps) == per_thread).all()
    out = torch.ops.cuda_emu_selftest.run("reuse_without_barrier", 2, 32 * warps)
    if thread_order == "warps":  # warp 0 writes round 2's slot before warps 1 and 2 read round 1's
        assert (out != per_thread).any()


@pytest.mark.parametrize("case,match", [
    ("exited_lane", "lane 16 named in the mask has exited"),
    ("divergent", "meet at different calls: (__shfl_xor_sync and __ballot_sync|__ballot_sync and __shfl_xor_sync)"),
    ("deadlock", "deadlock in block"),
    ("partial_mask", "masks naming part of a warp are not emulated"),
])
def test_emulator_reports_undefined_warp_synchronisation(emu, case, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.cuda_emu_selftest.run(case, 1, 64)
    # and the next launch runs normally
    assert torch.ops.cuda_emu_selftest.run("barrier", 1, 32).tolist() == [(t + 1) % 32 for t in range(32)]


def test_emulator_refuses_a_shuffle_from_a_lane_that_does_not_exist(emu):
    with pytest.raises(RuntimeError, match="does not exist in this block's last warp"):
        torch.ops.cuda_emu_selftest.run("warp_ops", 1, 40)


def test_launch_rewrite():
    src = "k<T, 2><<<blocks_for(n, 4), kThreads, 0, s>>>(a, f(b, c));\nfinish<<<1, 32>>>();"
    assert build.rewrite_launches(src) == (
        "::cuda_emu::launch(k<T, 2>, ::cuda_emu::Config(blocks_for(n, 4), kThreads, 0, s), a, f(b, c));\n"
        "::cuda_emu::launch(finish, ::cuda_emu::Config(1, 32));")
    assert build.rewrite_shared("  __shared__ long long parts[kWarps];") == (
        "  auto& parts = ::cuda_emu::shared_memory<long long[kWarps], 1>();")


def sanitized_env() -> dict[str, str]:
    preload = build.asan_preload()
    if not all(os.path.isfile(path) for path in preload.split()):
        pytest.skip(f"this compiler has no AddressSanitizer runtime ({preload})")
    return {**os.environ, "LLKERN_EMU_ASAN": "1", "LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=0",
            "LLKERN_EMU_ORDER": "forward"}


def test_address_sanitizer_reports_a_write_past_the_end():
    script = ("import sys; sys.path.insert(0, 'tests'); import torch; from cuda_emu import build; build.load(); "
              "run = torch.ops.cuda_emu_selftest.run; assert run('barrier', 2, 64)[0] == 1; "
              "run('past_the_end', 1, 64); print('not caught')")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], env=sanitized_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode != 0 and "not caught" not in result.stdout
    assert "heap-buffer-overflow" in result.stderr and "past_the_end" in result.stderr, result.stderr[-2000:]


def test_every_kernel_stays_inside_its_tensors_under_address_sanitizer():
    # This file's kernel tests again (threads in order), built with AddressSanitizer: every CPU tensor is
    # a malloc'd block with red zones around it, so a kernel reading or writing outside its tensors stops
    # the run with a report (compute-sanitizer's memcheck, for the index arithmetic).
    # (-s: a report goes to the real stderr; pytest's capture would swallow it with the aborted process)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:logging",
                             __file__, "-k", "forward and not sanitizer and not emulator"],
                            cwd=Path(__file__).parents[1], env=sanitized_env(), capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "AddressSanitizer" not in result.stderr  # (its one warning says "ASan")


# --- relu_with_mask / relu_mask_backward ---------------------------------------------------------------

RELU_SIZES = [1, 7, 31, 32, 33, 97, 255, 256, 257, 1025, 4097, 70_001]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", RELU_SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_relu_mask_bitwise_equal_to_the_cpu_kernel(emu, dtype, numel, offset):
    x = torch.randn(numel).to(dtype)
    x[::5] = 0.0
    if numel > 3:
        x[1], x[2] = float("nan"), float("-inf")
    x = misaligned(x, offset) if offset else x  # offset: the scalar path (x not 16-byte aligned)
    y, mask = emu.relu_with_mask(x)
    y_cpu, mask_cpu = torch.ops.llkern.relu_with_mask(x)
    assert torch.equal(mask, mask_cpu)
    assert torch.equal(bits(y), bits(y_cpu))  # NaN payloads included
    grad = torch.randn(numel).to(dtype)
    grad[::7] = float("inf")
    for grad_offset, mask_offset in [(0, 0), (offset, 0), (0, 1), (1, 3)]:
        g = misaligned(grad, grad_offset) if grad_offset else grad
        m = torch.empty(mask.numel() + mask_offset, dtype=torch.uint8)[mask_offset:].copy_(mask)
        gx = emu.relu_mask_backward(g, m, [1])
        gx_cpu = torch.ops.llkern.relu_mask_backward(g, m, [1])
        assert torch.equal(bits(gx), bits(gx_cpu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_mask_layouts(emu, dtype):
    x = torch.randn(3, 5, 7, 9).to(dtype)
    for t in (x, x.to(memory_format=torch.channels_last), x.transpose(1, 3), x[:, :, ::2]):
        y, mask = emu.relu_with_mask(t)
        y_cpu, mask_cpu = torch.ops.llkern.relu_with_mask(t)
        assert torch.equal(y, y_cpu) and y.stride() == y_cpu.stride() and torch.equal(mask, mask_cpu)
        grad = torch.randn(t.shape).to(dtype)
        assert torch.equal(emu.relu_mask_backward(grad, mask, y.stride()),
                           torch.ops.llkern.relu_mask_backward(grad, mask, y.stride()))


# --- batch_norm_relu / batch_norm_relu_backward ---------------------------------------------------------

# The (batch, channels, inner) walk with one and several slices a channel, the (rows, channels) walk
# (channels_last, or inner 1) with one and two channel tiles, and a single channel.
BN_SHAPES = [(2, 1, 7), (3, 7, 5, 5), (4, 97, 1, 1), (5, 6), (2, 3, 1025), (8, 3, 33, 35), (300, 5),
             (2, 3, 2, 3, 5)]
BN_CHANNELS_LAST = [(4, 37, 20, 30), (3, 1100, 2, 2), (2, 9, 1, 3)]


def bn_inputs(shape, dtype, training, affine=True, channels_last=False):
    x = (torch.randn(shape) * 2 + 0.3).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, invstd = batch_norm_stats(x, training)
    channels = shape[1]
    weight = (torch.rand(channels) + 0.5).to(dtype) if affine else None
    bias = (torch.randn(channels) * 0.3).to(dtype) if affine else None
    return x, weight, bias, mean, invstd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last", [(s, False) for s in BN_SHAPES] + [(s, True) for s in BN_CHANNELS_LAST])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_relu_matches_the_cpu_kernel(emu, dtype, shape, channels_last, training):
    x, weight, bias, mean, invstd = bn_inputs(shape, dtype, training, channels_last=channels_last)
    y = emu.batch_norm_relu(x, weight, bias, mean, invstd, training)
    y_cpu = torch.ops.llkern.batch_norm_relu(x, weight, bias, mean, invstd, training)
    assert torch.equal(y, y_cpu) and y.stride() == y_cpu.stride()  # the same roundings, element by element
    grad = torch.randn(shape).to(dtype)
    out = emu.batch_norm_relu_backward(grad, x, weight, bias, mean, invstd, training)
    out_cpu = torch.ops.llkern.batch_norm_relu_backward(grad, x, weight, bias, mean, invstd, training)
    assert_outputs_close(("grad_input", "grad_weight", "grad_bias"), out, out_cpu, dtype)
    # The CUDA sums do not depend on the pointers' alignment (scalar and vector loads add the same
    # elements in the same order): bitwise equal when every tensor starts one element off.
    if not channels_last:
        x_off, grad_off = misaligned(x), misaligned(grad)
        assert torch.equal(emu.batch_norm_relu(x_off, weight, bias, mean, invstd, training), y)
        shifted = emu.batch_norm_relu_backward(grad_off, x_off, weight, bias, mean, invstd, training)
        for a, b in zip(shifted, out, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_batch_norm_relu_without_affine_or_input_grad(emu, training, input_grad):
    x, _, _, mean, invstd = bn_inputs((4, 6, 9, 11), torch.float32, training)
    grad = torch.randn(x.shape)
    for weight, bias in [(None, None), (torch.rand(6) + 0.5, None), (None, torch.randn(6))]:
        args = (grad, x, weight, bias, mean, invstd, training, input_grad)
        assert_outputs_close(("grad_input", "grad_weight", "grad_bias"), emu.batch_norm_relu_backward(*args),
                             torch.ops.llkern.batch_norm_relu_backward(*args), torch.float32)


# --- transport_penalty -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 97), (2, 1025), (3, 70_001)])
@pytest.mark.parametrize("reduction", ["mean", "sum_per_sample"])
@pytest.mark.parametrize("with_x", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
def test_transport_matches_the_cpu_kernel(emu, dtype, shape, reduction, with_x, offset):
    y = torch.randn(shape).to(dtype)
    x = torch.randn(shape).to(dtype) if with_x else None
    if offset:
        y = misaligned(y, offset)
    loss, dy = emu.transport_penalty(y, x, 0.7, reduction, True)
    loss_cpu, dy_cpu = torch.ops.llkern.transport_penalty(y, x, 0.7, reduction, True)
    assert_close(loss, loss_cpu, torch.float64 if dtype == torch.float64 else torch.float32, "loss")
    assert_close(dy, dy_cpu, dtype, "d y")
    grad = torch.tensor(1.7, dtype=loss.dtype)
    assert_close(emu.transport_penalty_backward(grad, y, x, 0.7, reduction),
                 torch.ops.llkern.transport_penalty_backward(grad, y, x, 0.7, reduction), dtype, "backward")


# --- aux_head_loss / aux_head_backward -------------------------------------------------------------------

# The emulator's build takes the logits AUX_HEAD_CHUNK_ELEMENTS at a time: one chunk for the small heads,
# several for 1000 / 1025 classes and for 300 rows x 33 classes.
AUX_SHAPES = [((6, 7, 3, 5), 11), ((5, 7), 1), ((1, 7), 3), ((2, 97, 7), 13), ((4, 9, 2, 2), 1025),
              ((70, 64), 10), ((37, 45, 3, 3), 7), ((3, 70, 2, 2), 1000), ((5, 70), 1025), ((300, 8), 5),
              ((300, 8), 33)]


def aux_inputs(shape, classes, dtype):
    """test_aux_head's inputs (every third target ignored), detached: the emulated ops have no autograd."""
    features, weight, bias, target = make_aux_head_inputs(shape, classes, dtype=dtype)
    return features.detach(), weight.detach(), bias.detach(), target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,classes", AUX_SHAPES)
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1)])
def test_aux_head_matches_the_cpu_kernel(emu, dtype, shape, classes, reduction, smoothing):
    features, weight, bias, target = aux_inputs(shape, classes, dtype)
    args = (features, weight, bias, target, -100, smoothing, reduction, True)
    out, out_cpu = emu.aux_head_loss(*args), torch.ops.llkern.aux_head_loss(*args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # (bfloat16 features: the device path multiplies bfloat16 operands, the CPU path float32 ones)
    assert_outputs_close(("loss", "correct", "d rows", "d weight", "d bias"), out, out_cpu,
                         acc if dtype != torch.bfloat16 else torch.bfloat16)
    if len(shape) == 4:
        sizes = list(shape)
        grad_pooled = out[2].view(shape[0], shape[1])
        for channels_last in (False, True):
            grad_loss = torch.tensor(0.3, dtype=acc)
            a = emu.aux_head_backward(grad_loss, grad_pooled, sizes, channels_last, dtype)
            b = torch.ops.llkern.aux_head_backward(grad_loss, grad_pooled, sizes, channels_last, dtype)
            assert a.stride() == b.stride()
            assert_close(a, b, dtype, "d features")


def test_aux_head_channels_last_features(emu):
    features, weight, bias, target = aux_inputs((33, 27, 3, 2), 9, torch.float32)
    features = features.to(memory_format=torch.channels_last)
    args = (features, weight, bias, target, -100, 0.0, "mean", True)
    assert_outputs_close(("loss", "correct", "d rows", "d weight", "d bias"), emu.aux_head_loss(*args),
                         torch.ops.llkern.aux_head_loss(*args), torch.float32)


def test_aux_head_target_out_of_range_poisons_its_row_on_the_device(emu):
    # The CUDA path does not synchronise to check targets: the row's loss and gradients become NaN
    # (the Python wrapper raises instead when value checks are on); the CPU op raises.
    features, weight, bias, target = aux_inputs((6, 8), 5, torch.float32)
    target[2] = 5
    loss, _correct, d_rows, _, _ = emu.aux_head_loss(features, weight, bias, target, -100, 0.0, "sum", True)
    assert loss.isnan()
    assert d_rows[2].isnan().all() and not d_rows[[0, 1, 3, 4, 5]].isnan().any()
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        torch.ops.llkern.aux_head_loss(features, weight, bias, target, -100, 0.0, "sum", True)


# The low-memory head (bfloat16 logits, d weight summed over the row chunks in bfloat16): chunks of
# 3 * AUX_HEAD_CHUNK_ELEMENTS logits, so 25 chunks for 300 rows at 1025 classes, 4 for 194 tokens at 200.
LOW_MEMORY_SHAPES = [((300, 8), 1025), ((2, 97, 7), 200), ((300, 8), 33), ((3, 70, 2, 2), 1000), ((200, 64), 500)]


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape,classes", LOW_MEMORY_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_aux_head_low_memory_against_float64(emu, shape, classes, with_bias):
    # Judged as the op's bfloat16 tests judge it: error against the float64 reference relative to PyTorch's
    # own bfloat16 error (F.linear + F.cross_entropy in bfloat16), d weight allowed one rounding a chunk.
    from .test_aux_head import reference64

    features, weight, bias, target = make_aux_head_inputs(shape, classes, dtype=torch.bfloat16)
    bias = bias if with_bias else None
    ref_loss, _, ref = reference64(features, weight, bias, target, label_smoothing=0.1)
    channels = shape[1] if len(shape) == 4 else shape[-1]
    ref_rows = (ref[0].sum((2, 3)) if len(shape) == 4 else ref[0]).reshape(-1, channels)
    f, w, b = (t.detach().clone().requires_grad_() if t is not None else None for t in (features, weight, bias))
    rows = f.mean((2, 3)) if f.dim() == 4 else f
    eager_loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(rows, w, b).reshape(-1, classes),
                                                   target.reshape(-1), label_smoothing=0.1)
    eager = torch.autograd.grad(eager_loss, [rows, w] + ([b] if with_bias else []))
    args = (features.detach(), weight.detach(), bias.detach() if with_bias else None, target, -100, 0.1, "mean", True)
    loss, correct, d_rows, d_weight, d_bias = emu.aux_head_loss(*args, True)
    assert (d_rows.dtype, d_weight.dtype) == (torch.float32 if len(shape) == 4 else torch.bfloat16, torch.bfloat16)
    rows_per_chunk = 3 * build.AUX_HEAD_CHUNK_ELEMENTS // classes
    chunks = -(-ref_rows.shape[0] // (rows_per_chunk // 64 * 64 if rows_per_chunk >= 128 else rows_per_chunk))
    assert relative_error(loss, ref_loss) <= 2 * relative_error(eager_loss, ref_loss)
    eager_rows = eager[0].reshape(ref_rows.shape)
    assert relative_error(d_rows.reshape(ref_rows.shape), ref_rows) <= 2 * relative_error(eager_rows, ref_rows)
    assert relative_error(d_weight, ref[1]) <= (1 + chunks**0.5) * relative_error(eager[1], ref[1])
    if with_bias:
        assert relative_error(d_bias, ref[2]) <= 2 * relative_error(eager[2], ref[2])
    assert torch.equal(correct, emu.aux_head_loss(*args, False)[1])


@pytest.mark.parametrize("low_memory", [False, True])
def test_aux_head_loss_without_gradients_is_the_loss_with_them(emu, low_memory):
    # Without with_grad (evaluation, or the forward of a recomputing backward) the head must take the same
    # logits: bfloat16 ones only with low_memory.
    features, weight, bias, target = aux_inputs((300, 8), 1025, torch.bfloat16)
    args = (features, weight, bias, target, -100, 0.1, "mean")
    with_grad = emu.aux_head_loss(*args, True, low_memory)
    without = emu.aux_head_loss(*args, False, low_memory)
    assert torch.equal(with_grad[0], without[0]) and torch.equal(with_grad[1], without[1])
    assert [t.numel() for t in without[2:]] == [0, 0, 0]


def test_aux_head_low_memory_keeps_non_finite_ignored_rows_out_of_d_weight(emu):
    features, weight, bias, target = aux_inputs((300, 8), 1025, torch.bfloat16)
    features[target == -100] = float("inf")
    _, _, d_rows, d_weight, d_bias = emu.aux_head_loss(features, weight, bias, target, -100, 0.0, "mean", True, True)
    assert d_weight.isfinite().all() and d_bias.isfinite().all() and d_rows.isfinite().all()


# --- info_nce / supcon_loss / renyi_mutual_information ---------------------------------------------------


def test_renyi_holds_two_half_blocks_and_two_spreads(emu_ops):
    # With gradients the CUDA op keeps t, the two spreads L(K²) and L(K² [same]) (one is the gradient it
    # returns) and two blocks of half the block size each (32 MiB together on a GPU); nothing else of N×d
    # size: ~2 float32 N×d values beyond its output, where it once held 4.1 (a widened copy of a bfloat16
    # input, a temporary in the last sum, blocks kept to the end).
    from .allocations import peak_allocated_bytes

    n, d = 1024, 128
    for dtype in (torch.bfloat16, torch.float32):
        t, labels = torch.randn(n, d).to(dtype), torch.randint(0, 10, (n,))
        peak, (_, grad) = peak_allocated_bytes(
            lambda t=t, labels=labels: emu_ops.renyi_mutual_information(t, labels, None, 0.5, True))
        beyond_output = peak - grad.numel() * grad.element_size()
        blocks = build.SIMILARITY_BLOCK_ELEMENTS * 4  # two halves
        assert beyond_output <= 2.2 * n * d * 4 + blocks + 64 * n, (dtype, beyond_output / (n * d * 4))

# One block of rows of the N x N matrix up to N = 45, several above (SIMILARITY_BLOCK_ELEMENTS values a block).
SIM_SIZES = [(1, 3), (7, 1), (7, 3), (97, 129), (150, 5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", SIM_SIZES)
def test_similarity_ops_match_the_cpu_kernels(emu, dtype, n, d):
    z1 = torch.randn(n, d).to(dtype)
    z2 = (z1.float() + 0.5 * torch.randn(n, d)).to(dtype)
    labels = torch.randint(0, 5, (n,))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = acc if dtype != torch.bfloat16 else torch.bfloat16  # the device path multiplies bfloat16 operands
    for symmetric in (False, True):
        for normalize in (True, False):
            args = (z1, z2, 0.2, symmetric, normalize, True)
            assert_outputs_close(("loss", "d z1", "d z2"), emu.info_nce(*args), torch.ops.llkern.info_nce(*args), tol,
                                 f"info_nce {symmetric=} {normalize=}")
    for normalize in (True, False):
        args = (z1, labels, 0.2, normalize, True)
        assert_outputs_close(("loss", "d z"), emu.supcon_loss(*args), torch.ops.llkern.supcon_loss(*args), tol,
                             f"supcon {normalize=}")
    for sigma, label_sigma in [(None, None), (float((2.0 * d) ** 0.5), None), (None, 0.5)]:
        args = (z1, labels, sigma, label_sigma, True)
        assert_outputs_close(("mi", "d t"), emu.renyi_mutual_information(*args),
                             torch.ops.llkern.renyi_mutual_information(*args), tol, f"renyi {sigma=} {label_sigma=}")


# --- the CUDA bindings against the fake kernels ----------------------------------------------------------


def opcheck_cases() -> dict[str, tuple[str, tuple]]:
    """name -> (op, args): the layouts and dtypes whose outputs' shapes, strides and dtypes the CUDA
    bindings choose (channels_last and permuted inputs, 16-bit features, each op's optional arguments)."""
    x = torch.randn(3, 5, 7, 9)
    x_cl = x.to(memory_format=torch.channels_last)
    y, mask = torch.ops.llkern.relu_with_mask(x_cl)
    bn_x, weight, bias, mean, invstd = bn_inputs((4, 6, 5, 7), torch.float32, True, channels_last=True)
    feats, w, b, target = aux_inputs((6, 7, 3, 5), 11, torch.float32)
    tokens, tw, tb, ttarget = aux_inputs((2, 97, 7), 13, torch.bfloat16)
    z1, z2 = torch.randn(9, 4), torch.randn(9, 4)
    labels = torch.randint(0, 3, (9,))
    return {
        "relu": ("relu_with_mask", (x,)),
        "relu channels_last": ("relu_with_mask", (x_cl,)),
        "relu permuted": ("relu_with_mask", (x.transpose(1, 3),)),
        "relu strided bf16": ("relu_with_mask", (x.bfloat16()[:, :, ::2],)),
        "relu backward": ("relu_mask_backward", (torch.randn(x.shape), mask, y.stride())),
        "bn-relu channels_last": ("batch_norm_relu", (bn_x, weight, bias, mean, invstd, True)),
        "bn-relu no affine": ("batch_norm_relu", (bn_x.contiguous(), None, None, mean, invstd, False)),
        "bn-relu backward": ("batch_norm_relu_backward", (torch.randn(bn_x.shape), bn_x, weight, bias, mean,
                                                          invstd, True, True)),
        "bn-relu backward, no input grad": ("batch_norm_relu_backward", (torch.randn(bn_x.shape), bn_x, None, bias,
                                                                         mean, invstd, False, False)),
        "transport": ("transport_penalty", (torch.randn(3, 7), torch.randn(3, 7), 0.5, "mean", True)),
        "transport bf16": ("transport_penalty", (torch.randn(3, 7).bfloat16(), None, 0.5, "sum_per_sample", False)),
        "transport backward": ("transport_penalty_backward", (torch.tensor(2.0), torch.randn(3, 7), None, 0.5,
                                                              "mean")),
        "aux head": ("aux_head_loss", (feats, w, b, target, -100, 0.1, "mean", True)),
        "aux head channels_last": ("aux_head_loss", (feats.to(memory_format=torch.channels_last), w, None, target,
                                                     -100, 0.0, "sum", False)),
        "aux head tokens bf16": ("aux_head_loss", (tokens, tw, tb, ttarget, -100, 0.0, "mean", True)),
        "aux head tokens low memory": ("aux_head_loss", (tokens, tw, None, ttarget, -100, 0.1, "sum", True, True)),
        "aux head pooled low memory": ("aux_head_loss", (feats.bfloat16(), w.bfloat16(), b.bfloat16(), target, -100,
                                                         0.0, "mean", True, True)),
        "aux head backward": ("aux_head_backward", (torch.tensor(0.5), torch.randn(6, 7), [6, 7, 3, 5], True,
                                                    torch.bfloat16)),
        "info_nce": ("info_nce", (z1, z2, 0.2, True, True, True)),
        "info_nce bf16": ("info_nce", (z1.bfloat16(), z2.bfloat16(), 0.2, False, False, False)),
        "supcon": ("supcon_loss", (z1, labels, 0.2, True, True)),
        "renyi": ("renyi_mutual_information", (z1, labels, None, 0.5, True)),
    }


OPCHECK_CASES = ["relu", "relu channels_last", "relu permuted", "relu strided bf16", "relu backward",
                 "bn-relu channels_last", "bn-relu no affine", "bn-relu backward", "bn-relu backward, no input grad",
                 "transport", "transport bf16", "transport backward", "aux head", "aux head channels_last",
                 "aux head tokens bf16", "aux head tokens low memory", "aux head pooled low memory",
                 "aux head backward", "info_nce", "info_nce bf16", "supcon", "renyi"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_cuda_bindings_agree_with_the_fake_kernels(emu_ops, case):
    # The fake (meta) kernels are llkern's own (registered for llkern_emu by build.py): torch.compile and
    # every tracer take the outputs' metadata from them, so the CUDA binding must produce exactly that.
    cases = opcheck_cases()
    assert sorted(cases) == sorted(OPCHECK_CASES)
    op, args = cases[case]
    torch.library.opcheck(getattr(emu_ops, op).default, args, test_utils=("test_schema", "test_faketensor"))
