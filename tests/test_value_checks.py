"""Value checks (labels in range, finite inputs, ρ > 0): always on for CPU tensors, opt-in on GPUs where
each would be a host synchronisation. On the GPU: a forward and backward of every op makes no host sync
by default (so a local step can run ahead of its kernels and be captured in a CUDA graph), a bad value
gives NaN rather than an error or a wrong finite number, and with the checks on it raises as on the CPU."""

import os
import subprocess
import sys

import pytest
import torch

import llkern
import llkern._ext as ext
from llkern.compress.mean_kl import MeanKLNetwork
from llkern.ops.context import triton_available

CUDA = torch.cuda.is_available() and llkern.kernel_available("aux_head_loss", "cuda")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA kernels and a GPU")


def test_switch_and_context_manager():
    assert ext._value_checks is False  # the suite runs without LLKERN_VALUE_CHECKS
    with llkern.value_checks():
        assert ext._value_checks is True
        with llkern.value_checks(False):
            assert ext._value_checks is False
        assert ext._value_checks is True
    assert ext._value_checks is False
    with pytest.raises(RuntimeError, match="inside"), llkern.value_checks():
        raise RuntimeError("inside")
    assert ext._value_checks is False  # restored after an exception too
    llkern.set_value_checks(True)
    try:
        assert ext._value_checks is True
    finally:
        llkern.set_value_checks(False)
    with pytest.raises(TypeError, match="enabled"):
        llkern.set_value_checks(1)
    with pytest.raises(TypeError, match="enabled"), llkern.value_checks("yes"):
        pass


def test_environment_variable_turns_them_on():
    script = "import llkern._ext as e; print(e._value_checks)"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LLKERN_VALUE_CHECKS": value},
                             capture_output=True, text=True, timeout=120, check=True)
        assert out.stdout.strip() == expected


def test_cpu_tensors_are_always_checked_and_meta_tensors_never():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    for enabled in (False, True):
        with llkern.value_checks(enabled):
            assert ext.check_values(cpu) is True
            assert ext.check_values(meta) is False
    # so a bad CPU value raises with the checks off
    with pytest.raises(ValueError, match="NaN or infinite"):
        llkern.functional.info_nce(torch.randn(4, 3), torch.full((4, 3), float("nan")))


def test_meta_tensors_go_through_every_op():
    # shapes without values (meta tensors, as torch.compile's tracing and model sizing use): the value checks
    # and data-dependent defaults must not read them (four ops once called .item() on them)
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    labels = meta(4, dtype=torch.int64)
    outputs = {
        "aux_head_loss": llkern.aux_head_loss(meta(4, 3, 2, 2), meta(5, 3), meta(5), labels),
        "info_nce": llkern.functional.info_nce(meta(4, 3), meta(4, 3)),
        "supcon_loss": llkern.functional.supcon_loss(meta(4, 3), labels),
        "renyi_mutual_information": llkern.functional.renyi_mutual_information(meta(4, 3), labels),
        "transport_penalty": llkern.transport_penalty(meta(4, 3)),
        "context_add": llkern.context_add(meta(2, 3, 4, 4), meta(2, 3, 8, 8)),
        "mean_kl_sample": llkern.mean_kl_sample(meta(4, 3), meta(4, 3), meta(4, 3), meta(4, 3), seed=1),
    }
    shapes = {"context_add": (2, 3, 4, 4), "mean_kl_sample": (4, 3)}
    for name, out in outputs.items():
        assert out.device.type == "meta" and out.shape == shapes.get(name, ()), name


# --- on the GPU -------------------------------------------------------------------------------------------


def _op_steps(device):
    """(name, step) for every op: one forward and backward on fresh random inputs at an odd size."""
    g = torch.Generator(device=device).manual_seed(3)

    def rn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).requires_grad_()

    labels = torch.randint(0, 10, (97,), generator=g, device=device)
    steps = [
        ("transport_penalty", lambda: llkern.transport_penalty(rn(7, 33), rn(7, 33).detach(), 0.5)),
        ("aux_head_loss", lambda: llkern.aux_head_loss(rn(97, 13, 3, 5), rn(10, 13), rn(10), labels)),
        ("aux_head_loss (tokens)", lambda: llkern.aux_head_loss(rn(97, 70), rn(1000, 70, scale=0.1), None,
                                                                 labels * 97)),
        ("info_nce", lambda: llkern.functional.info_nce(rn(97, 7), rn(97, 7), 0.1)),
        ("supcon_loss", lambda: llkern.functional.supcon_loss(rn(97, 7), labels, 0.1)),
        ("renyi_mutual_information", lambda: llkern.functional.renyi_mutual_information(rn(97, 7), labels)),
    ]
    if triton_available(torch.device(device)):
        rho = (0.05 + torch.rand(97, 30, generator=g, device=device)).requires_grad_()
        steps += [
            ("context_add", lambda: llkern.context_add(rn(2, 3, 7, 5), rn(2, 3, 14, 10)).square().sum()),
            ("mean_kl_sample", lambda: llkern.mean_kl_sample(rn(97, 30), rn(97, 30), torch.zeros(97, 30, device=device),
                                                             rho, seed=1).square().sum()),
        ]
    return steps


@needs_cuda
def test_no_host_sync_in_a_forward_and_backward():
    steps = _op_steps("cuda")
    for _, step in steps:  # warm up: kernel loads, cuBLAS handles and Triton compiles may sync once
        torch.autograd.backward(step())
    torch.cuda.synchronize()
    for name, step in steps:
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.autograd.backward(step())
        except RuntimeError as error:
            raise AssertionError(f"{name} synchronised with the host: {error}") from error
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.skipif(not triton_available(torch.device("cuda")), reason="needs triton")
def test_no_host_sync_in_a_mean_kl_network_step_or_selection():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    net = MeanKLNetwork(model, bits_per_block=6, block_size=10, seed=4).cuda()
    net.fix_blocks(0, torch.randn(2, 10))
    x = torch.randn(5, 12, device="cuda")
    mu, sigma = torch.randn(7, 10, device="cuda") * 0.1, 0.05 + torch.rand(7, 10, device="cuda")
    rho = sigma * 1.5

    def step():
        net(x, sample=True).square().sum().backward()
        llkern.miracle_select(mu, sigma, rho, seed=2, bits=6)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda
def test_bad_values_on_the_gpu_give_nan_or_raise_with_the_checks_on():
    labels = torch.randint(0, 5, (9,), device="cuda")
    labels[4] = 7  # out of range for 5 classes
    features, weight = torch.randn(9, 6, 2, 2, device="cuda", requires_grad=True), torch.randn(5, 6, device="cuda")
    loss = llkern.aux_head_loss(features, weight, None, labels)
    (grad,) = torch.autograd.grad(loss, features)
    assert torch.isnan(loss) and torch.isnan(grad).any()
    bad_z = torch.randn(6, 3, device="cuda")
    bad_z[2, 1] = float("inf")
    assert torch.isnan(llkern.functional.info_nce(torch.randn(6, 3, device="cuda"), bad_z))
    # Rényi: the blocked op (float32) and the fused one (bfloat16); a NaN distance once became 0 there (K² = 1,
    # and a finite value of 0 bits)
    six_labels = torch.tensor([0, 1, 0, 1, 2, 2], device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.isnan(llkern.functional.renyi_mutual_information(bad_z.to(dtype), six_labels)), dtype
    # the fused Triton losses (bfloat16): a NaN or inf row must not vanish in a max (PTX max drops NaN)
    for bad in (float("nan"), float("inf")):
        z = torch.randn(6, 3, device="cuda", dtype=torch.bfloat16)
        z[2, 1] = bad
        other = torch.randn(6, 3, device="cuda", dtype=torch.bfloat16)
        for symmetric in (False, True):
            assert torch.isnan(llkern.functional.info_nce(other, z, 0.1, symmetric=symmetric)), (bad, symmetric)
        assert torch.isnan(llkern.functional.supcon_loss(z, six_labels, 0.1)), bad
    with llkern.value_checks():
        with pytest.raises(ValueError, match="target 7 is out of range"):
            llkern.aux_head_loss(features, weight, None, labels)
        with pytest.raises(ValueError, match="NaN or infinite"):
            llkern.functional.info_nce(torch.randn(6, 3, device="cuda"), bad_z)
    if triton_available(torch.device("cuda")):
        theta = torch.randn(4, 6, device="cuda")
        w = llkern.mean_kl_sample(theta, theta, theta, -torch.ones_like(theta), seed=0)
        assert torch.isnan(w).all()
        with llkern.value_checks(), pytest.raises(ValueError, match="rho"):
            llkern.mean_kl_sample(theta, theta, theta, -torch.ones_like(theta), seed=0)
