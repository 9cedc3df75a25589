"""Variational weights for MIRACLE: the coding layout, Mean-KL's exact block budget, gradients,
and the Gaussian baseline's annealing."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llkern.compress.mean_kl import GaussianNetwork, MeanKLNetwork, coding_permutation
from llkern.models import digits_lenet
from llkern.reference.mean_kl import kl_normal, mean_kl_reference


def test_permutation_is_seeded_and_complete():
    a, b, c = coding_permutation(1000, 3), coding_permutation(1000, 3), coding_permutation(1000, 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.sort(a), np.arange(1000))


def test_layout_round_trip_and_what_is_coded():
    model = digits_lenet()
    net = MeanKLNetwork(model, block_size=30, impl="reference")
    coded = [n for n, _ in model.named_parameters() if n.endswith(("weight", "bias"))]
    assert net.names == coded  # every Linear/Conv2d weight and bias, in the model's order
    total = sum(p.numel() for p in model.parameters())
    assert net.num_blocks == math.ceil(total / 30)
    weights = net.unpack(net.initial_blocks())
    for name, p in model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach())
    assert not any(p.requires_grad for p in model.parameters())  # replaced by θ, γ, ρ


def test_mean_kl_blocks_hold_their_budget_and_train():
    torch.manual_seed(0)
    net = MeanKLNetwork(digits_lenet(), bits_per_block=8, impl="reference")
    with torch.no_grad():
        net.gamma.normal_(0, 2)
        net.theta.normal_(0, 2)
    zeros = torch.zeros_like(net.theta)
    _, mu, sigma = mean_kl_reference(net.theta, net.gamma, zeros, net.rho_blocks(), zeros, net.kappa_block)
    kl = kl_normal(mu, sigma, zeros.double(), net.rho_blocks().double()).sum(1)
    torch.testing.assert_close(kl, torch.full_like(kl, 8 * math.log(2)))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    for p in (net.theta, net.gamma, net.log_rho):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert net.steps == 1  # the next training step draws new noise
    a, b = net(x), net(x)
    assert not torch.equal(a, b)
    net.eval()
    torch.testing.assert_close(net(x), net(x))  # eval: the posterior means



def test_training_noise_streams_are_not_coding_streams(monkeypatch):
    # Block b's candidates come from stream b and its Gumbel noise from num_blocks + b; training draws from
    # streams 2^31 and up (step 0 once drew block 0's candidates), never the permutation's 0xFFFFFFFF.
    from llkern.compress import mean_kl as module

    net = MeanKLNetwork(digits_lenet(), bits_per_block=8, impl="reference")
    streams = []
    original = net.sample_blocks
    monkeypatch.setattr(net, "sample_blocks", lambda stream: streams.append(stream) or original(stream))
    x = torch.randn(4, 1, 8, 8)
    net(x), net(x)
    net.steps = 2**31 - 2
    net(x), net(x)
    assert streams == [2**31, 2**31 + 1, 2**32 - 2, 2**31]
    assert 2 * net.num_blocks < module.TRAINING_STREAMS and max(streams) < module.PERMUTATION_STREAM


def test_mean_kl_kernel_and_reference_paths_agree():
    # on the GPU where there is one (the kernel inside the network), else on the CPU in Triton's interpreter
    from llkern.ops.context import triton_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not triton_available(device):
        pytest.skip("needs triton and a GPU, or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, device=device)
    outs, grads = [], []
    for impl in ("kernel", "reference"):
        torch.manual_seed(0)
        net = MeanKLNetwork(digits_lenet(), impl=impl, seed=5).to(device)
        out = net(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [net.theta, net.gamma, net.log_rho]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)  # same stream: same noise
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_gaussian_baseline_anneals_beta_towards_the_budget():
    torch.manual_seed(0)
    net = GaussianNetwork(digits_lenet(), bits_per_block=10, beta=1.0, anneal=2.0)
    kl = net.block_kl().detach()
    over = kl > net.kappa_block
    net.anneal_step()
    assert torch.equal(net.beta[over], torch.full_like(net.beta[over], 2.0))
    assert torch.equal(net.beta[~over], torch.full_like(net.beta[~over], 0.5))
    loss = F.cross_entropy(net(torch.randn(8, 1, 8, 8)), torch.randint(0, 10, (8,))) + net.penalty()
    loss.backward()
    assert net.mean.grad is not None and net.raw_sigma.grad is not None


def test_errors():
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d"):
        MeanKLNetwork(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="block_size"):
        MeanKLNetwork(digits_lenet(), block_size=0)
    with pytest.raises(ValueError, match="seed"):
        GaussianNetwork(digits_lenet(), seed=-1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        MeanKLNetwork("lenet")


def test_coded_blocks_survive_a_state_dict_round_trip():
    # Whether any block is coded is kept on the host (no GPU sync per forward); loading a state dict must
    # refresh it, in both directions.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    net = MeanKLNetwork(model, bits_per_block=4, block_size=6, seed=2)
    normals = torch.randn(2, 6)
    net.fix_blocks(1, normals)
    expected = net.mean_blocks()
    torch.testing.assert_close(expected[1:3], net.rho_blocks()[1:3] * normals)
    fresh = MeanKLNetwork(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), bits_per_block=4,
                          block_size=6, seed=2)
    assert not torch.equal(fresh.mean_blocks(), expected)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh.mean_blocks(), expected)
    net.release_blocks()
    fresh.load_state_dict(net.state_dict())  # nothing coded any more
    torch.testing.assert_close(fresh.mean_blocks(), net.mean_blocks())
    assert not torch.equal(fresh.mean_blocks()[1:3], expected[1:3])
