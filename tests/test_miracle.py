"""MIRACLE coding and its file format: the round trip, the encoder's choice checked against the
Triton generator, and every way a file can be broken."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from llkern.compress.header import _varint, describe, parse_header
from llkern.compress.mean_kl import MeanKLNetwork
from llkern.compress.miracle import FORMAT_VERSION, MAGIC, chosen_weights, decode, encode, read
from llkern.ops.context import triton_available
from llkern.reference.mean_kl import mean_kl_reference


def small_net(seed=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64, 10))
    net = MeanKLNetwork(model, bits_per_block=6, block_size=20, seed=seed, impl="reference")
    with torch.no_grad():
        net.theta.normal_(0, 1.5)
        net.gamma.normal_(0, 1.0)
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return net


def test_round_trip(tmp_path):
    net = small_net()
    report = encode(net, tmp_path / "m.llkm", progress=False)
    assert report.file_bytes == (tmp_path / "m.llkm").stat().st_size
    assert report.ratio == 4 * sum(net.sizes) / report.file_bytes
    model = decode(tmp_path / "m.llkm")
    assert isinstance(model, nn.Sequential) and not isinstance(model, MeanKLNetwork)
    header, indices, _ = read(tmp_path / "m.llkm")
    assert indices.shape == (net.num_blocks,) and indices.max() < 2**6
    weights = chosen_weights(header, indices)
    state = model.state_dict()
    for name in net.names:
        torch.testing.assert_close(state[name], weights[name])
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(state[name], net.model.state_dict()[name])
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    net.model.eval()
    torch.testing.assert_close(model(x), functional_call(net.model, weights, (x,)))


KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_argmax_choice_and_the_triton_generator(tmp_path):
    # The decoded weights of a block are candidate k* drawn by the Triton generator too (to float
    # tolerance), and k* has the best score log q − log p among all 2^C candidates. The network sits
    # on the GPU where there is one, so the encoder scores with the kernel there.
    net = small_net().to(KERNEL_DEVICE)
    encode(net, tmp_path / "m.llkm", progress=False)
    net = net.cpu()
    header, indices, _ = read(tmp_path / "m.llkm")
    zeros = torch.zeros_like(net.theta, dtype=torch.float64)
    rho = net.rho_blocks().detach().double()
    _, mu, sigma = mean_kl_reference(net.theta.detach(), net.gamma.detach(), zeros, rho, zeros, net.kappa_block)
    for b in (0, net.num_blocks // 2, net.num_blocks - 1):
        if triton_available(KERNEL_DEVICE):
            from llkern.triton_kernels import philox

            n = 2**6 * net.block_size
            x0, x1 = (torch.empty(n, dtype=torch.int64, device=KERNEL_DEVICE) for _ in range(2))
            z = torch.empty(n, device=KERNEL_DEVICE)
            philox.fill_stream[(1,)](x0, x1, z, net.seed, b, 0, n, BLOCK=2048)
            eps = z.double().cpu().view(2**6, net.block_size)
        else:
            from llkern.random import normals

            eps = torch.from_numpy(normals(net.seed, b, np.arange(2**6 * net.block_size, dtype=np.uint64))).view(
                2**6, net.block_size)
        w = rho[b] * eps
        scores = (-0.5 * ((w - mu[b]) / sigma[b]) ** 2 - sigma[b].log() + 0.5 * eps**2 + rho[b].log()).sum(1)
        assert int(scores.argmax()) == indices[b]
        # the decoder regenerated the same candidate (NumPy generator) as scored here
        decoded = decoded_block(net, header, indices, b)
        torch.testing.assert_close(decoded, w[indices[b], :len(decoded)], rtol=2e-6, atol=2e-6)


def decoded_block(net, header, indices, b):
    """Block b of the decoded coded tensors, back in block layout."""
    weights = chosen_weights(header, indices)
    flat = torch.cat([weights[name].double().reshape(-1) for name in net.names])
    slots = torch.zeros(net.num_blocks * net.block_size, dtype=torch.float64)
    slots[net.slot_of_weight] = flat
    real = min(net.block_size, sum(net.sizes) - b * net.block_size)  # the last block's padding holds no weight
    return slots.view(net.num_blocks, net.block_size)[b, :real]


def test_sampled_choice_is_seeded(tmp_path):
    net = small_net()
    encode(net, tmp_path / "a.llkm", choose="sample", progress=False)
    encode(net, tmp_path / "b.llkm", choose="sample", progress=False)
    assert (tmp_path / "a.llkm").read_bytes() == (tmp_path / "b.llkm").read_bytes()
    _, sampled, _ = read(tmp_path / "a.llkm")
    encode(net, tmp_path / "c.llkm", choose="argmax", progress=False)
    _, best, _ = read(tmp_path / "c.llkm")
    assert (sampled != best).any()  # a draw, not always the best


def rewrite(path, body):
    """Rewrite the file with ``body(blob)`` in place of its contents, and a checksum that matches."""
    blob = body(path.read_bytes()[:-4])
    path.write_bytes(blob + struct.pack("<I", zlib.crc32(blob)))


def first_layer_offset(header):
    """Where the first layer's type code is: after magic, version, generator, seed and four varints."""
    fields = (header["bits_per_block"], header["block_size"], header["num_blocks"], len(header["architecture"]))
    return len(MAGIC) + 2 + 4 + sum(len(_varint(v)) for v in fields)


def test_broken_files(tmp_path):
    net = small_net()
    path = tmp_path / "m.llkm"
    encode(net, path, progress=False)
    good = path.read_bytes()
    header, _, _ = read(path)
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r"truncated|checksum"):
        decode(path)
    corrupted = bytearray(good)
    corrupted[len(good) // 2] ^= 0x10
    path.write_bytes(bytes(corrupted))
    with pytest.raises(ValueError, match="checksum"):
        decode(path)
    path.write_bytes(b"NOTAFILE" + good[8:])
    with pytest.raises(ValueError, match="magic"):
        decode(path)
    for special in ("/dev/zero", "/dev/null", tmp_path):  # refused, not read without end (or as empty)
        if Path(special).exists():
            with pytest.raises(ValueError, match="not a regular file"):
                decode(special)
    with pytest.raises(FileNotFoundError):
        decode(tmp_path / "missing.llkm")
    cases = [
        (lambda blob: blob[:8] + bytes([FORMAT_VERSION + 1]) + blob[9:], "format version 3"),
        (lambda blob: blob[:8] + bytes([1]) + blob[9:], "format version 1"),
        (lambda blob: blob[:9] + bytes([7]) + blob[10:], "generator"),
        (lambda blob: blob[:len(MAGIC) + 9], "unreadable header .it ends inside the header"),
        (lambda blob: blob[:first_layer_offset(header)] + bytes([99]) + blob[first_layer_offset(header) + 1:],
         "unknown layer type code 99"),
        (lambda blob: blob[:-50], "truncated|but the header describes"),  # missing tensor bytes
        (lambda blob: blob + b"\0\0", "but the header describes"),
    ]
    for body, message in cases:
        path.write_bytes(good)
        rewrite(path, body)
        with pytest.raises(ValueError, match=message):
            decode(path)


def test_header_is_small(tmp_path):
    # 6 layers with their arguments, 4 coded tensors' ρ and 5 BatchNorm tensors' dtypes take 82
    # bytes (version 1's compressed JSON: 240); the file is magic + header + indices + BN + CRC
    net = small_net()
    report = encode(net, tmp_path / "m.llkm", progress=False)
    _, header_end = parse_header((tmp_path / "m.llkm").read_bytes(), len(MAGIC))
    bn_bytes = 4 * 4 * 4 + 8
    index_bytes = -(-net.num_blocks * net.bits_per_block // 8)
    assert report.file_bytes == header_end + index_bytes + bn_bytes + 4
    assert header_end - len(MAGIC) == 82


def test_retraining_between_chunks(tmp_path):
    # With a retrain callback the blocks not yet coded train after every chunk; the coded ones do
    # not move, and afterwards the network computes exactly what the file decodes to.
    net = small_net()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    optimizer = torch.optim.SGD([net.theta, net.gamma, net.log_rho], lr=0.5)
    seen = []

    def retrain(coding):
        seen.append(int(coding.coded.sum()))
        before, rho_before = coding.mean_blocks().detach(), coding.rho_blocks().detach()
        coding.train()
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(coding(x), y).backward()
            optimizer.step()
        after, rho_after = coding.mean_blocks().detach(), coding.rho_blocks().detach()
        coded = coding.coded
        assert not torch.equal(rho_after, rho_before)
        # a coded block's weights are ρ times its fixed normals: only ρ moves them
        torch.testing.assert_close(after[coded] / rho_after[coded], before[coded] / rho_before[coded])
        assert not torch.allclose(after[~coded], before[~coded])  # the rest trains

    encode(net, tmp_path / "m.llkm", chunk_blocks=4, retrain=retrain, progress=False)
    assert seen == list(range(4, net.num_blocks, 4))
    assert bool(net.coded.all())
    model = decode(tmp_path / "m.llkm").eval()
    net.eval()
    # bit for bit: the decoded weights are the encoder's (a float64 product once differed in the last bit)
    decoded = dict(model.named_parameters())
    for name, weight in net.unpack(net.mean_blocks()).items():
        assert torch.equal(decoded[name], weight.detach()), name
    assert torch.equal(model(x), net(x))


def test_encode_errors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="GELU"):
        encode(MeanKLNetwork(model, impl="reference"), tmp_path / "x", progress=False)
    with pytest.raises(TypeError, match="MeanKLNetwork"):
        encode(model, tmp_path / "x")
    with pytest.raises(ValueError, match="choose"):
        encode(small_net(), tmp_path / "x", choose="best")
    with pytest.raises(ValueError, match="chunk_blocks"):
        encode(small_net(), tmp_path / "x", chunk_blocks=0)
    with pytest.raises(TypeError, match="retrain"):
        encode(small_net(), tmp_path / "x", retrain=3)
    for layer in (nn.Conv2d(1, 1, 3, padding="same"), nn.MaxPool2d(2, return_indices=True),
                  nn.AvgPool2d(2, divisor_override=3)):
        with pytest.raises(ValueError, match="option the file format cannot describe"):
            describe(nn.Sequential(layer), "where")


def test_encode_refuses_what_it_cannot_describe(tmp_path):
    shared = nn.Linear(8, 8)
    net = MeanKLNetwork(nn.Sequential(nn.Flatten(), shared, nn.ReLU(), shared), impl="reference")
    with pytest.raises(ValueError, match="used twice"):
        encode(net, tmp_path / "x", progress=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    model[2].running_mean = model[2].running_mean.to(torch.int32)  # a dtype the file has no code for
    net = MeanKLNetwork(model, impl="reference")
    with pytest.raises(ValueError, match=r"cannot store 2\.running_mean"):
        encode(net, tmp_path / "x", progress=False)
    assert not bool(net.coded.any())  # refused before any block was coded
    net = MeanKLNetwork(nn.Sequential(nn.Flatten(), nn.Linear(8, 4)).double(), impl="reference")
    with pytest.raises(ValueError, match=r"float32 coded weights, and net is torch\.float64"):
        encode(net, tmp_path / "x", progress=False)
    assert not bool(net.coded.any())


def test_the_file_holds_a_float32_network(tmp_path):
    # A float64 statistic was stored whole and then rounded into the rebuilt float32 module: refused now.
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    model[2].running_var = torch.rand(4, dtype=torch.float64) + 0.5
    net = MeanKLNetwork(model, bits_per_block=4, block_size=6, impl="reference")
    with pytest.raises(ValueError, match=r"network is float32, and 2\.running_var is torch\.float64"):
        encode(net, tmp_path / "m.llkm", progress=False)
    assert not bool(net.coded.any())
    # float32 statistics and the integer batch count come back with their own dtypes, as parameters and buffers
    model[2].running_var = model[2].running_var.float()
    encode(net, tmp_path / "m.llkm", progress=False)
    decoded = decode(tmp_path / "m.llkm")
    assert torch.equal(decoded[2].running_var, model[2].running_var)
    assert decoded[2].num_batches_tracked.dtype == torch.int64
    assert decoded[1].weight.dtype == torch.float32 and isinstance(decoded[1].weight, nn.Parameter)


def test_decoding_leaves_the_random_state_alone(tmp_path):
    encode(small_net(), tmp_path / "m.llkm", progress=False)
    state = torch.random.get_rng_state()
    decode(tmp_path / "m.llkm")
    assert torch.equal(torch.random.get_rng_state(), state)


def forged(tmp_path, *, bits, block_size, num_blocks, spec, rho, dtypes, payload):
    """A MIRACLE file with this header and ``payload`` bytes after it, checksummed like a real one."""
    from llkern.compress.header import write_header

    body = MAGIC + write_header(version=FORMAT_VERSION, seed=1, bits=bits, block_size=block_size,
                                num_blocks=num_blocks, spec=spec, rho=rho, dtypes=dtypes) + payload
    path = tmp_path / "forged.llkm"
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return path


def linear(n_in, n_out):
    return {"type": "Linear", "args": {"in_features": n_in, "out_features": n_out, "bias": False}}


def batchnorm(n):
    return {"type": "BatchNorm1d", "args": {"num_features": n, "eps": 1e-5, "momentum": 0.1, "affine": False,
                                            "track_running_stats": True}}


@pytest.mark.parametrize("case", ["huge block", "blocks unpaid", "buffers unpaid", "extra bytes", "no weights"])
def test_forged_headers_are_refused_before_anything_is_allocated(tmp_path, monkeypatch, case):
    # A 45-byte file once asked for a 4096x4096 Linear in one block of 2^24 weights: 3 GB and 51 s to decode.
    # Every weight a header asks for must be paid for in the file (blocks x C bits, the uncompressed bytes).
    import llkern.compress.miracle as miracle

    def never(*_, **__):
        raise AssertionError("the decoder allocated the model of a forged header")

    monkeypatch.setattr(miracle, "build", never)
    monkeypatch.setattr(miracle, "chosen_weights", never)
    n = 4096 * 4096
    if case == "huge block":  # one block of 2^24 weights for 24 bits
        path = forged(tmp_path, bits=24, block_size=1 << 24, num_blocks=1, spec=[linear(4096, 4096)], rho=[0.1],
                      dtypes=[], payload=b"\0" * 3)
        match = "weights per coded bit"
    elif case == "blocks unpaid":  # the largest blocks allowed, but the indices are missing
        bits, size = 32, 32 * 256
        path = forged(tmp_path, bits=bits, block_size=size, num_blocks=-(-n // size), spec=[linear(4096, 4096)],
                      rho=[0.1], dtypes=[], payload=b"\0" * 16)
        match = "truncated"
    elif case == "buffers unpaid":  # a billion-feature BatchNorm: its running statistics are not in the file
        path = forged(tmp_path, bits=10, block_size=30, num_blocks=1, spec=[linear(3, 2), batchnorm(10**9)],
                      rho=[0.1], dtypes=[torch.float32, torch.float32, torch.int64], payload=b"\0" * 2 + b"\0" * 64)
        match = "but the header describes"
    elif case == "no weights":  # nothing coded, no blocks: refused by name (NumPy once failed to stack nothing)
        path = forged(tmp_path, bits=10, block_size=30, num_blocks=0, spec=[{"type": "ReLU", "args": {}}], rho=[],
                      dtypes=[], payload=b"")
        match = "no coded weights"
    else:  # an honest small header with bytes the header does not describe
        path = forged(tmp_path, bits=10, block_size=30, num_blocks=1, spec=[linear(3, 2)], rho=[0.1], dtypes=[],
                      payload=b"\0" * 2 + b"\0" * 7)
        match = "but the header describes"
    with pytest.raises(ValueError, match=match):
        decode(path)


def test_an_honest_small_forged_file_decodes(tmp_path):
    # the same writer, with the payload the header asks for, gives a model: the refusals above are not blanket
    path = forged(tmp_path, bits=10, block_size=30, num_blocks=1, spec=[linear(3, 2)], rho=[0.1], dtypes=[],
                  payload=b"\x05\x00")
    model = decode(path)
    assert isinstance(model[0], nn.Linear) and model[0].weight.shape == (2, 3)
    assert torch.isfinite(model[0].weight).all()


def test_networks_refuse_blocks_a_file_could_not_hold():
    with pytest.raises(ValueError, match="weights per coded bit"):
        MeanKLNetwork(nn.Linear(4, 3), bits_per_block=1, block_size=257)
    for delta in (0.0, 1.0, float("nan"), -0.1):  # delta = 1 once left θ infinite at construction
        with pytest.raises(ValueError, match="delta"):
            MeanKLNetwork(nn.Linear(4, 3), delta=delta)
    with pytest.raises(ValueError, match="impl"):
        MeanKLNetwork(nn.Linear(4, 3), impl="bogus")


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available(torch.device("cuda"))), reason="needs a GPU")
def test_encode_checks_the_posterior_on_the_gpu_too(tmp_path):
    # value checks are off by default on GPUs, but encode brings each chunk's indices to the host anyway:
    # a NaN posterior must raise there, not write finite, meaningless indices
    net = small_net().cuda()
    with torch.no_grad():
        net.theta[1, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        encode(net, tmp_path / "nan.llkm", progress=False)
