"""MIRACLE coding and its file format: the round trip, the encoder's choice checked against the
Triton generator, and every way a file can be broken."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from llkern.compression import MeanKLNetwork
from llkern.miracle import FORMAT_VERSION, MAGIC, chosen_weights, decode, encode, read
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


def test_argmax_choice_and_the_triton_generator(tmp_path):
    # The decoded weights of a block are candidate k* drawn by the Triton generator too (to float
    # tolerance), and k* has the best score log q − log p among all 2^C candidates.
    net = small_net()
    encode(net, tmp_path / "m.llkm", progress=False)
    header, indices, _ = read(tmp_path / "m.llkm")
    zeros = torch.zeros_like(net.theta, dtype=torch.float64)
    rho = net.rho_blocks().detach().double()
    _, mu, sigma = mean_kl_reference(net.theta.detach(), net.gamma.detach(), zeros, rho, zeros, net.kappa_block)
    for b in (0, net.num_blocks // 2, net.num_blocks - 1):
        if triton_available(torch.device("cpu")):
            from llkern.triton_kernels import philox

            n = 2**6 * net.block_size
            x0, x1, z = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64), torch.empty(n)
            philox.fill_stream[(1,)](x0, x1, z, net.seed, b, 0, n, BLOCK=2048)
            eps = z.double().view(2**6, net.block_size)
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


def rewrite(path, header_change=None, body=None):
    blob = path.read_bytes()[:-4]
    if header_change is not None:
        (length,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
        header = json.loads(zlib.decompress(blob[len(MAGIC) + 4:len(MAGIC) + 4 + length]))
        header.update(header_change)
        new = zlib.compress(json.dumps(header).encode())
        blob = MAGIC + struct.pack("<I", len(new)) + new + blob[len(MAGIC) + 4 + length:]
    if body is not None:
        blob = body(blob)
    path.write_bytes(blob + struct.pack("<I", zlib.crc32(blob)))


def test_broken_files(tmp_path):
    net = small_net()
    path = tmp_path / "m.llkm"
    encode(net, path, progress=False)
    good = path.read_bytes()
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
    path.write_bytes(good)
    rewrite(path, {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="format version"):
        decode(path)
    path.write_bytes(good)
    rewrite(path, {"generator": "mt19937"})
    with pytest.raises(ValueError, match="generator"):
        decode(path)
    path.write_bytes(good)
    rewrite(path, body=lambda blob: blob[:len(MAGIC) + 4] + b"not zlib" + blob[len(MAGIC) + 12:])
    with pytest.raises(ValueError, match="unreadable header"):
        decode(path)
    path.write_bytes(good)
    rewrite(path, body=lambda blob: blob[:-50])  # consistent checksum, missing tensor bytes
    with pytest.raises(ValueError, match="truncated"):
        decode(path)


def test_encode_errors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="GELU"):
        encode(MeanKLNetwork(model, impl="reference"), tmp_path / "x", progress=False)
    with pytest.raises(TypeError, match="MeanKLNetwork"):
        encode(model, tmp_path / "x")
    with pytest.raises(ValueError, match="choose"):
        encode(small_net(), tmp_path / "x", choose="best")
