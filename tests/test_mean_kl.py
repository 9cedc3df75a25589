"""Mean-KL reparameterised sampling (Triton; on the CPU in Triton's interpreter): values and
gradients against the float64 reference with the kernel's own noise, the exact KL per block,
stability at the bounds, layouts, gradcheck, opcheck, bad input."""

import math

import pytest
import torch

import llkern
from llkern.ops.context import triton_available
from llkern.ops.mean_kl import mean_kl_noise, mean_kl_sample
from llkern.reference.mean_kl import kl_normal, mean_kl_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(torch.device(DEVICE)),
                                reason="needs triton (and a GPU or TRITON_INTERPRET=1)")
BITS10 = 10 * math.log(2)


def kernel_noise(shape, seed, stream):
    """The kernel's ε: draws block · block_size + j of the stream, as the Triton generator makes them."""
    from llkern.triton_kernels import philox

    n = shape[0] * shape[1]
    x0 = torch.empty(n, dtype=torch.int64, device=DEVICE)
    x1, z = torch.empty_like(x0), torch.empty(n, device=DEVICE)
    philox.fill_stream[((n + 1023) // 1024,)](x0, x1, z, seed, stream, 0, n, BLOCK=1024)
    return z.double().reshape(shape)


def params(shape, dtype=torch.float32, theta_scale=2.0, gamma_scale=1.0):
    theta = (theta_scale * torch.randn(shape, dtype=torch.float64)).to(dtype).to(DEVICE)
    gamma = (gamma_scale * torch.randn(shape, dtype=torch.float64)).to(dtype).to(DEVICE)
    nu = (0.1 * torch.randn(shape, dtype=torch.float64)).to(dtype).to(DEVICE)
    rho = (0.05 + torch.rand(shape, dtype=torch.float64)).to(dtype).to(DEVICE)
    return theta, gamma, nu, rho


def check(theta, gamma, nu, rho, kappa_block, tol, seed=3, stream=1):
    leaves = [t.detach().requires_grad_() for t in (theta, gamma, rho)]
    w = mean_kl_sample(leaves[0], leaves[1], nu, leaves[2], seed=seed, stream=stream, kappa_block=kappa_block,
                       impl="kernel")
    assert w.dtype == theta.dtype and w.shape == theta.shape
    ref_leaves = [t.detach().double().requires_grad_() for t in (theta, gamma, rho)]
    eps = kernel_noise(tuple(theta.shape), seed, stream)
    ref, mu, sigma = mean_kl_reference(ref_leaves[0], ref_leaves[1], nu.double(), ref_leaves[2], eps, kappa_block)
    scale = ref.abs().max().clamp_min(1.0)
    assert ((w.double() - ref).abs().max() / scale).item() <= tol
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(w, leaves, g.to(w.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    for a, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        assert ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() <= 10 * tol
    return mu, sigma


@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (97, 30), (33, 33), (3, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(shape, dtype):
    # float64 runs the kernel in float64 throughout: κ_B, δ and the series' constants too (they once
    # reached it as float32, which held it to 1e-7)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    check(*params(shape, dtype), BITS10, tol)


def test_every_block_holds_exactly_its_budget():
    theta, gamma, nu, rho = params((40, 30), torch.float64)
    for kappa_block in (0.01, BITS10, 500.0):
        mu, sigma = check(theta, gamma, nu, rho, kappa_block, 1e-7)
        kl = kl_normal(mu, sigma, nu.double(), rho.double()).sum(dim=1)
        torch.testing.assert_close(kl, torch.full_like(kl, kappa_block), rtol=1e-10, atol=1e-12)


def test_stable_at_the_bounds():
    # |μ − ν| near its bound (θ = ±20: tanh = ±1), budgets concentrated on one weight (γ spread
    # ±30: the others get ~1e-26 nats, r → 1), and large budgets (σ → 0)
    theta, gamma, nu, rho = params((16, 30), theta_scale=20.0, gamma_scale=30.0)
    for kappa_block in (1e-3, BITS10, 200.0):
        check(theta, gamma, nu, rho, kappa_block, 2e-5)


def test_non_contiguous_parameters():
    wide = [t.t() for t in params((30, 14), torch.float64)]  # (14, 30) transposed views
    assert not wide[0].is_contiguous()
    check(*wide, BITS10, 1e-7)


def test_same_stream_same_weights_and_reference_path():
    theta, gamma, nu, rho = params((5, 30))
    a = mean_kl_sample(theta, gamma, nu, rho, seed=9, stream=4, impl="kernel")
    b = mean_kl_sample(theta, gamma, nu, rho, seed=9, stream=4, impl="kernel")
    c = mean_kl_sample(theta, gamma, nu, rho, seed=9, stream=5, impl="kernel")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the reference path draws ε from the NumPy generator: the same stream to float tolerance
    ref = mean_kl_sample(theta.cpu(), gamma.cpu(), nu.cpu(), rho.cpu(), seed=9, stream=4, impl="reference")
    torch.testing.assert_close(a.cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_noise((5, 30), 9, 4).cpu(), mean_kl_noise((5, 30), 9, 4), rtol=2e-6, atol=2e-6)


def test_gradcheck_and_opcheck():
    theta, gamma, nu, rho = (t.requires_grad_() if i != 2 else t for i, t in enumerate(params((3, 5), torch.float64)))
    assert torch.autograd.gradcheck(
        lambda a, b, c: mean_kl_sample(a, b, nu, c, seed=1, stream=0, impl="kernel"), (theta, gamma, rho))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    args = (theta.detach(), gamma.detach(), nu, rho.detach(), 1, 0, BITS10, 0.05)
    torch.library.opcheck(torch.ops.llkern.mean_kl_sample.default, args, test_utils=utils)


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces into a triton_op's body, and Triton's interpreter "
                    "then runs the kernels on fake tensors: GPU only")
def test_torch_compile_with_seed_and_stream_1():
    # Inductor passes an int argument equal to 1 as a constant (do_not_specialize or not): the kernels must
    # compile so (seed.to(...) did not), and give what the eager op gives.
    theta, gamma, nu, rho = params((6, 30))
    theta, gamma = theta.requires_grad_(), gamma.requires_grad_()

    def f(a, b):
        return mean_kl_sample(a, b, nu, rho, seed=1, stream=1, impl="kernel").square().sum()

    out = torch.compile(f, fullgraph=True)(theta, gamma)
    grads = torch.autograd.grad(out, (theta, gamma))
    ref = f(theta, gamma)
    ref_grads = torch.autograd.grad(ref, (theta, gamma))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_input(impl):
    theta, gamma, nu, rho = params((4, 6))
    # (ρ's values are checked on a GPU only with the value checks on: tests/test_value_checks.py)
    with pytest.raises(ValueError, match="rho"), llkern.value_checks():
        mean_kl_sample(theta, gamma, nu, -rho, seed=0, impl=impl)
    with pytest.raises(ValueError, match="rho"), llkern.value_checks():
        mean_kl_sample(theta, gamma, nu, rho / 0, seed=0, impl=impl)
    for bad in (float("inf"), float("nan")):  # an infinite γ once gave its block NaN weights silently
        with pytest.raises(ValueError, match="gamma"), llkern.value_checks():
            mean_kl_sample(theta, gamma.detach().index_fill(1, torch.tensor([2]), bad), nu, rho, seed=0, impl=impl)
    with pytest.raises(ValueError, match="like theta"):
        mean_kl_sample(theta, gamma[:3], nu, rho, seed=0, impl=impl)
    with pytest.raises(ValueError, match="num_blocks, block_size"):
        mean_kl_sample(theta[0], gamma[0], nu[0], rho[0], seed=0, impl=impl)
    with pytest.raises(ValueError, match="seed"):
        mean_kl_sample(theta, gamma, nu, rho, seed=-1, impl=impl)
    with pytest.raises(ValueError, match="kappa_block"):
        mean_kl_sample(theta, gamma, nu, rho, seed=0, kappa_block=0.0, impl=impl)
    for kappa_block in (1e8, float("inf"), float("nan"), 1e-320):  # 1e8 once gave a silent NaN in float32
        with pytest.raises(ValueError, match="kappa_block"):
            mean_kl_sample(theta, gamma, nu, rho, seed=0, kappa_block=kappa_block, impl=impl)
    with pytest.raises(ValueError, match="delta"):
        mean_kl_sample(theta, gamma, nu, rho, seed=0, delta=1.0, impl=impl)
    with pytest.raises(TypeError, match="floating-point"):
        mean_kl_sample(theta.long(), gamma.long(), nu.long(), rho.long(), seed=0, impl=impl)
    wide = params((1, 8193))
    if impl == "kernel":
        with pytest.raises(ValueError, match="at most 8192 weights, got block_size 8193"):
            mean_kl_sample(*wide, seed=0, impl=impl)
    else:
        assert torch.isfinite(mean_kl_sample(*wide, seed=0, impl=impl)).all()


def test_kernel_poisons_a_bad_rho_instead_of_returning_finite_weights():
    # On a GPU ρ is checked only with the value checks on; unchecked, a negative or infinite ρ must give
    # NaN (a negative one once gave finite, wrong weights). The op itself, below the wrapper's check:
    theta, gamma, nu, rho = params((5, 7))
    for bad in (-rho, torch.full_like(rho, float("inf")), torch.zeros_like(rho)):
        bad = bad.clone()
        bad[1:3] = rho[1:3]  # blocks 1 and 2 keep a good ρ
        w = torch.ops.llkern.mean_kl_sample(theta, gamma, nu, bad, 0, 0, BITS10, 0.05)
        assert torch.isnan(w[[0, 3, 4]]).all() and torch.isfinite(w[1:3]).all()


def test_budget_up_to_the_bound_is_exact():
    # the largest budget the op accepts: weights as the float64 reference, finite gradients (the
    # reference's own gradient is NaN there: r = e^(−2κ) underflows in its implicit derivative)
    theta, gamma, nu, rho = params((6, 9))
    leaves = [t.detach().requires_grad_() for t in (theta, gamma, rho)]
    w = mean_kl_sample(leaves[0], leaves[1], nu, leaves[2], seed=3, stream=1, kappa_block=1e6, impl="kernel")
    ref, _, _ = mean_kl_reference(theta, gamma, nu, rho, kernel_noise(tuple(theta.shape), 3, 1), 1e6)
    assert ((w.double() - ref).norm() / ref.norm()).item() <= 1e-6
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(w.square().sum(), leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_and_infinite_theta_saturate(dtype):
    # tanh θ → ±1: the kernel's tanh once gave 0 from |θ| ≈ 1e7 on and NaN at ±∞
    theta, gamma, nu, rho = params((4, 6), dtype)
    theta[0] = torch.tensor([1e7, -1e7, 1e30, -1e30, float("inf"), -float("inf")], dtype=dtype)
    theta = theta.detach().requires_grad_()
    w = mean_kl_sample(theta, gamma, nu, rho, seed=2, stream=3, impl="kernel")
    ref, _, _ = mean_kl_reference(theta.detach(), gamma, nu, rho, kernel_noise((4, 6), 2, 3), BITS10)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.double(), ref, rtol=2e-6, atol=2e-6)
    (d_theta,) = torch.autograd.grad(w.sum(), theta)
    assert torch.isfinite(d_theta).all() and torch.equal(d_theta[0], torch.zeros_like(d_theta[0]))


def test_zero_prior_means_need_no_tensor():
    # nu=None: zero prior means, nothing read or saved for them, the same bits as an explicit zero tensor
    theta, gamma, _, rho = params((9, 30))
    leaves = [t.detach().requires_grad_() for t in (theta, gamma, rho)]
    without = mean_kl_sample(leaves[0], leaves[1], None, leaves[2], seed=4, stream=2, impl="kernel")
    grads_without = torch.autograd.grad(without.square().sum(), leaves)
    zeros = torch.zeros_like(theta)
    explicit = mean_kl_sample(leaves[0], leaves[1], zeros, leaves[2], seed=4, stream=2, impl="kernel")
    grads_explicit = torch.autograd.grad(explicit.square().sum(), leaves)
    assert torch.equal(without, explicit)
    assert all(torch.equal(a, b) for a, b in zip(grads_without, grads_explicit, strict=True))
    reference = mean_kl_sample(theta.cpu(), gamma.cpu(), None, rho.cpu(), seed=4, stream=2, impl="reference")
    torch.testing.assert_close(without.detach().cpu(), reference, rtol=1e-5, atol=1e-5)
    args = (theta, gamma, None, rho, 4, 2, BITS10, 0.05)
    torch.library.opcheck(torch.ops.llkern.mean_kl_sample.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
