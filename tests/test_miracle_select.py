"""MIRACLE candidate selection (Triton; on the CPU in Triton's interpreter): the kernel's choice against
the float64 reference wherever the reference's best candidate is not a near-tie, its scores against the
float64 scores of its own choices, both choices, ties, chunks of blocks (first_block > 0), strides,
the reference against the encoder's own arithmetic, opcheck, bad input."""

import numpy as np
import pytest
import torch

import llkern
from llkern.ops import miracle_encode
from llkern.ops.context import triton_available
from llkern.ops.miracle_encode import candidate_scores, gumbel_noise, miracle_select, miracle_select_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(torch.device(DEVICE)),
                                reason="needs triton (and a GPU or TRITON_INTERPRET=1)")
MARGIN = 1e-3  # a block is decided when its best key beats the runner-up by more than this


def posterior(blocks, block_size, dtype=torch.float32, layout="contiguous"):
    """Fresh random (mu, sigma, rho): posteriors narrower than the prior, means within a few ρ; in
    ``layout="strided"`` they are views with row stride 2·S, column stride 2 and column-major."""
    rho = 0.05 + torch.rand(blocks, block_size, dtype=torch.float64)
    sigma = rho * (0.2 + 0.8 * torch.rand(blocks, block_size, dtype=torch.float64))
    mu = rho * 0.8 * torch.randn(blocks, block_size, dtype=torch.float64)
    mu, sigma, rho = (t.to(dtype).to(DEVICE) for t in (mu, sigma, rho))
    if layout == "strided":
        mu = torch.stack([mu, torch.ones_like(mu)], dim=1)[:, 0]  # every other row of a (2·blocks, S) tensor
        sigma = torch.stack([sigma, torch.ones_like(sigma)], dim=-1)[..., 0]  # column stride 2
        rho = rho.t().contiguous().t()  # column-major
        assert not sigma.is_contiguous() and (blocks == 1 or not mu.is_contiguous())
    return mu, sigma, rho


def reference_keys(mu, sigma, rho, seed, bits, first_block, num_blocks_total, choose):
    """Every candidate's float64 score and key (score + Gumbel noise when sampling): (blocks, 2^bits) each."""
    mu, sigma, rho = (t.detach().cpu().double().numpy() for t in (mu, sigma, rho))
    k = np.arange(2**bits, dtype=np.uint64)
    scores = np.stack([candidate_scores(mu[i], sigma[i], rho[i], seed, first_block + i, k) for i in range(len(mu))])
    keys = scores.copy()
    if choose == "sample":
        for i in range(len(mu)):
            keys[i] += gumbel_noise(seed, num_blocks_total + first_block + i, k)
    return scores, keys


def check(mu, sigma, rho, *, seed, bits, first_block=0, num_blocks_total=None, choose="argmax", score_tol=None):
    """Run the kernel; compare with the float64 reference. Returns the number of decided blocks."""
    blocks = mu.shape[0]
    total = first_block + blocks if num_blocks_total is None else num_blocks_total
    indices, scores = miracle_select(mu, sigma, rho, seed=seed, bits=bits, first_block=first_block,
                                     num_blocks_total=num_blocks_total, choose=choose, impl="kernel")
    float64 = mu.dtype == torch.float64
    assert indices.dtype == torch.int64 and indices.shape == (blocks,) and indices.device == mu.device
    assert scores.dtype == (torch.float64 if float64 else torch.float32) and scores.shape == (blocks,)
    indices, scores = indices.cpu().numpy(), scores.cpu().double().numpy()
    assert ((indices >= 0) & (indices < 2**bits)).all()
    ref_scores, keys = reference_keys(mu, sigma, rho, seed, bits, first_block, total, choose)
    ref_indices, _ = miracle_select_reference(mu, sigma, rho, seed=seed, bits=bits, first_block=first_block,
                                              num_blocks_total=num_blocks_total, choose=choose)
    np.testing.assert_array_equal(ref_indices.numpy(), keys.argmax(axis=1))
    # the kernel's scores are the float64 scores of the candidates it chose, to float32 (float64) rounding
    own = ref_scores[np.arange(blocks), indices]
    tol = score_tol if score_tol is not None else (1e-9 if float64 else 2e-5)
    np.testing.assert_allclose(scores, own, rtol=tol, atol=tol)
    # its choice is the reference's wherever the reference's best key is not a near-tie
    ordered = np.sort(keys, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if 2**bits > 1 else np.full(blocks, np.inf)
    decided = margin > MARGIN
    np.testing.assert_array_equal(indices[decided], ref_indices.numpy()[decided])
    # and where it differs (near-ties only), it took a candidate whose key is within rounding of the best
    assert (keys[np.arange(blocks), indices] >= ordered[:, -1] - MARGIN).all()
    return int(decided.sum())


@pytest.mark.parametrize("choose", ["argmax", "sample"])
@pytest.mark.parametrize("blocks,block_size,bits,first_block", [
    (1, 1, 1, 0), (3, 1, 5, 2), (1, 7, 5, 0), (3, 7, 8, 11), (3, 30, 1, 5), (1, 30, 5, 0), (3, 30, 8, 1)])
def test_matches_reference(blocks, block_size, bits, first_block, choose):
    mu, sigma, rho = posterior(blocks, block_size, layout="strided" if blocks == 3 else "contiguous")
    decided = check(mu, sigma, rho, seed=2024 + bits, bits=bits, first_block=first_block,
                    num_blocks_total=first_block + blocks + 4, choose=choose)
    assert 2 * decided >= blocks  # most blocks decided: the comparison is not vacuous


@pytest.mark.parametrize("choose", ["argmax", "sample"])
def test_float64_and_most_blocks_decided(choose):
    # float64 inputs: float64 normals and sums in the kernel, so it agrees with the encoder to ~1e-15
    mu, sigma, rho = posterior(16, 7, torch.float64, layout="strided")
    decided = check(mu, sigma, rho, seed=0xFFFFFFFF, bits=5, first_block=40, num_blocks_total=100, choose=choose)
    assert decided >= 14
    mu32, sigma32, rho32 = (t.float() for t in (mu, sigma, rho))
    assert check(mu32, sigma32, rho32, seed=0xFFFFFFFF, bits=5, first_block=40, num_blocks_total=100,
                 choose=choose) >= 14


def test_ties_go_to_the_lowest_index():
    # σ = ρ and μ = 0: every candidate scores exactly 0, so argmax keeps candidate 0 (over several
    # tiles: 2^8 candidates of 30 weights are two tiles of 128), and sampling is the Gumbel noise's argmax
    rho = (0.05 + torch.rand(3, 30)).to(DEVICE)
    mu, sigma = torch.zeros_like(rho), rho.clone()
    indices, scores = miracle_select(mu, sigma, rho, seed=7, bits=8, impl="kernel")
    assert indices.tolist() == [0, 0, 0] and scores.abs().max().item() == 0.0
    indices, _ = miracle_select(mu, sigma, rho, seed=7, bits=8, num_blocks_total=5, choose="sample", impl="kernel")
    expected = [int(gumbel_noise(7, 5 + i, np.arange(256, dtype=np.uint64)).argmax()) for i in range(3)]
    assert indices.tolist() == expected


def test_reference_scores_restated(monkeypatch):
    # log q − log p of every candidate written out again here, against the reference chunked into
    # several candidate chunks: the same float64 arithmetic, so the same scores bit for bit
    from llkern.random import normals

    monkeypatch.setattr(miracle_encode, "REFERENCE_CHUNK", 7 * 20)  # chunks of 20 candidates
    mu, sigma, rho = posterior(4, 7, torch.float64)
    mu, sigma, rho = (t.cpu().numpy() for t in (mu, sigma, rho))
    seed, bits, first, total = 99, 6, 3, 10
    k = np.arange(2**bits, dtype=np.uint64)[:, None] * np.uint64(7) + np.arange(7, dtype=np.uint64)
    encoder = np.stack([((-0.5 * ((rho[i] * normals(seed, first + i, k) - mu[i]) / sigma[i]) ** 2 - np.log(sigma[i]))
                         - (-0.5 * normals(seed, first + i, k) ** 2 - np.log(rho[i]))).sum(axis=1) for i in range(4)])
    mu, sigma, rho = (torch.from_numpy(t) for t in (mu, sigma, rho))
    indices, scores = miracle_select_reference(mu, sigma, rho, seed=seed, bits=bits, first_block=first,
                                               num_blocks_total=total)
    assert indices.tolist() == encoder.argmax(axis=1).tolist()
    assert np.array_equal(scores.numpy(), encoder.max(axis=1))
    for i in range(4):  # the Gumbel-max of docs, restated
        from llkern.random import stream_bits

        x0, _ = stream_bits(seed, total + first + i, np.arange(2**bits, dtype=np.uint64))
        u = ((x0 >> np.uint32(8)).astype(np.float64) + 0.5) * 2.0**-24
        encoder[i] += -np.log(-np.log(u))
    indices, _ = miracle_select_reference(mu, sigma, rho, seed=seed, bits=bits, first_block=first,
                                          num_blocks_total=total, choose="sample")
    assert indices.tolist() == encoder.argmax(axis=1).tolist()
    # and the public function's reference path returns float32 scores for float32 inputs
    indices32, scores32 = miracle_select(mu.float(), sigma.float(), rho.float(), seed=seed, bits=bits,
                                         first_block=first, impl="reference")
    assert indices32.dtype == torch.int64 and scores32.dtype == torch.float32


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile runs Triton kernels on a GPU only")
def test_torch_compile_with_seed_1():
    # Inductor passes an int argument equal to 1 as a constant: the kernel must compile so.
    mu, sigma, rho = (torch.rand(3, 20, device=DEVICE) + 0.1 for _ in range(3))

    def f(a, b, c):
        return miracle_select(a, b, c, seed=1, bits=8, first_block=1, impl="kernel")

    indices, scores = torch.compile(f, fullgraph=True)(mu, sigma, rho)
    ref_indices, ref_scores = f(mu, sigma, rho)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)


def test_opcheck():
    mu, sigma, rho = posterior(2, 5)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    for sample in (False, True):
        torch.library.opcheck(torch.ops.llkern.miracle_select.default, (mu, sigma, rho, 3, 4, 1, 9, sample),
                              test_utils=utils)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_input(impl):
    mu, sigma, rho = posterior(3, 4)

    def call(mu=mu, sigma=sigma, rho=rho, **kwargs):
        args = {"seed": 0, "bits": 4, "impl": impl, **kwargs}
        return miracle_select(mu, sigma, rho, **args)

    cases = [
        (TypeError, "mu", dict(mu=mu.tolist())),
        (TypeError, "sigma", dict(sigma=sigma.long())),
        (ValueError, "mu", dict(mu=mu[0], sigma=sigma[0], rho=rho[0])),
        (ValueError, "mu", dict(mu=mu[:0], sigma=sigma[:0], rho=rho[:0])),
        (ValueError, "sigma", dict(sigma=sigma[:2])),
        (ValueError, "rho", dict(rho=rho.double())),
        (ValueError, "sigma", dict(sigma=torch.where(sigma > sigma.median(), -sigma, sigma))),
        (ValueError, "sigma", dict(sigma=sigma * 0)),
        (ValueError, "rho", dict(rho=rho / 0)),
        (ValueError, "mu", dict(mu=mu * float("nan"))),
        (ValueError, "bits", dict(bits=0)),
        (ValueError, "bits", dict(bits=25)),
        (ValueError, "bits", dict(bits=4.0)),
        (ValueError, "seed", dict(seed=-1)),
        (ValueError, "seed", dict(seed=2**32)),
        (ValueError, "first_block", dict(first_block=-1)),
        (ValueError, "first_block", dict(first_block=2**32 - 2)),
        (ValueError, "num_blocks_total", dict(first_block=2, num_blocks_total=4)),
        (ValueError, "num_blocks_total", dict(num_blocks_total=2**32, choose="sample")),
        (ValueError, "choose", dict(choose="max")),
        (ValueError, "impl", dict(impl="fast")),
    ]
    for error, name, kwargs in cases:  # (values are checked on a GPU only with the value checks on)
        with pytest.raises(error, match=name), llkern.value_checks():
            call(**kwargs)



def test_the_raw_op_takes_zero_blocks():
    # The wrapper refuses empty input; the op itself returns empty outputs (on a GPU it once divided by zero
    # choosing its splits).
    mu, sigma, rho = posterior(3, 4)
    indices, scores = torch.ops.llkern.miracle_select(mu[:0], sigma[:0], rho[:0], 3, 4, 0, 0, False)
    assert indices.shape == (0,) and indices.dtype == torch.int64 and scores.shape == (0,)


@pytest.mark.parametrize("choose", ["argmax", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidates_split_across_programs_choose_the_same(monkeypatch, choose, dtype):
    # A GPU gives each block several programs (shares of its candidates) when there are few blocks; the
    # host keeps the best share. Any split must choose what one program per block chooses, ties included.
    mu, sigma, rho = posterior(5, 30, dtype)
    mu[2], sigma[2] = 0.0, rho[2]  # block 2: every candidate scores exactly 0 (a tie across all splits)
    one = miracle_select(mu, sigma, rho, seed=3, bits=8, choose=choose, impl="kernel")
    for splits in (2, 4, 8):
        monkeypatch.setattr(miracle_encode, "_candidate_splits", lambda device, blocks, most, s=splits: min(s, most))
        split = miracle_select(mu, sigma, rho, seed=3, bits=8, choose=choose, impl="kernel")
        assert torch.equal(split[0], one[0]) and torch.equal(split[1], one[1]), splits
    if choose == "argmax":
        assert one[0][2].item() == 0
