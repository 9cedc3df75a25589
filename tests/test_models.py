"""Reference models: shapes, parameter counts, the residual protocol, cut points, short digits training runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llkern.data.images import load_digits
from llkern.local.net import run_module
from llkern.models import (
    BasicBlock,
    PadShortcut,
    TransformerBlock,
    cifar_resnet,
    mlp,
    resnet32,
    resnet110,
    transformer_encoder,
    vgg,
    vgg11,
    vgg16,
)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def one_thread() -> Iterator[None]:
    # The machines running the tests are shared; with tiny matrices, intra-op threads spend more time
    # synchronising than computing (measured: 8× slower per transformer step on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- shapes and parameter counts ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    resnet32, resnet110,
    lambda: resnet32(shortcut="B"), lambda: resnet32(preact=True), lambda: resnet32(preact=True, shortcut="B"),
    vgg11, vgg16,
], ids=["resnet32", "resnet110", "resnet32-B", "resnet32-pre", "resnet32-pre-B", "vgg11", "vgg16"])
def test_cifar_models_forward(make: Callable[[], nn.Module]) -> None:
    model = make()
    model.eval()  # BN statistics of a 2-image batch would do, but eval also checks the running-stat path
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and out.isfinite().all()


def test_constructor_options() -> None:
    model = cifar_resnet(20, num_classes=7, in_channels=1, width=8)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    assert len(model) == 1 + 9 + 1
    assert vgg11(num_classes=100, in_channels=1, width=16)(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    # A short configuration runs on digits-sized images thanks to the adaptive pool.
    assert vgg([16, "M", 32, "M"], in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(33)
    with pytest.raises(ValueError, match="shortcut"):
        resnet32(shortcut="C")  # type: ignore[arg-type]


def test_parameter_counts_match_the_papers() -> None:
    # He et al. 2016, Table 6: ResNet-32 0.46 M, ResNet-110 1.7 M (option A shortcuts).
    assert count(resnet32()) == 464_154 and abs(count(resnet32()) / 1e6 - 0.46) < 0.005
    assert count(resnet110()) == 1_727_962 and abs(count(resnet110()) / 1e6 - 1.7) < 0.05
    # Option B adds the 1×1 projections and their BN at the two stage transitions.
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert count(resnet32(shortcut="B")) == 464_154 + projections
    assert count(resnet110(shortcut="B")) == 1_727_962 + projections
    # VGG with BN, single-linear CIFAR classifier, convolutions without bias (BN's shift replaces it).
    assert count(vgg11()) == 9_228_362
    assert count(vgg16()) == 14_724_042
    assert count(mlp()) == 150_794
    assert count(transformer_encoder()) == 136_010


# --- the residual protocol ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("stride, cin, cout", [(1, 8, 8), (2, 8, 16)])
def test_basic_block_forward_residual(preact: bool, shortcut: str, stride: int, cin: int, cout: int) -> None:
    block = BasicBlock(cin, cout, stride, shortcut=shortcut, preact=preact).double()  # type: ignore[arg-type]
    x = torch.randn(3, cin, 8, 8, dtype=torch.float64)
    y, r = block.forward_residual(x)
    assert y.shape == r.shape == (3, cout, 8 // stride, 8 // stride)
    torch.testing.assert_close(y, block.skip(x) + r, rtol=0, atol=0)
    torch.testing.assert_close(block(x), y, rtol=0, atol=0)
    # The shortcut path computed independently of the block's code.
    a = x if preact else F.relu(x)
    if stride == 1 and cin == cout:
        torch.testing.assert_close(y - r, a, rtol=0, atol=1e-12)
    elif shortcut == "A":
        expected = torch.cat([a[:, :, ::stride, ::stride], a.new_zeros(3, cout - cin, 8 // stride, 8 // stride)], 1)
        torch.testing.assert_close(y - r, expected, rtol=0, atol=1e-12)
    assert r.abs().sum() > 0


def test_pad_shortcut_refuses_to_drop_channels() -> None:
    with pytest.raises(ValueError):
        PadShortcut(16, 8, 1)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_post_activation_resnet_is_the_papers_function(shortcut: str) -> None:
    # The model moves each block's trailing ReLU to the next unit's entry; composing the paper's
    # formulation, relu(shortcut(h) + F(h)) after relu(BN(conv(x))), from the same modules must agree.
    model = cifar_resnet(14, shortcut=shortcut, width=4).double().eval()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    h = F.relu(model.stem(x))
    blocks = [m for m in model if isinstance(m, BasicBlock)]
    for block in blocks:
        h = F.relu(block.shortcut(h) + block.branch(h))
    logits = model.head[-1](h.mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), logits, rtol=1e-10, atol=1e-12)


def test_transformer_block_forward_residual_and_shapes() -> None:
    block = TransformerBlock(32, 4).double()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    y, r = block.forward_residual(x)
    assert y.shape == r.shape == (3, 5, 32)
    torch.testing.assert_close(y, x + r, rtol=0, atol=0)
    # r is the sum of the two sub-layer residuals of the usual pre-norm formulation.
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(y, h + block.mlp(block.norm2(h)), rtol=1e-12, atol=1e-12)


# --- cut points ---------------------------------------------------------------------------------------------

def test_resnet_is_a_flat_sequential_cuttable_between_blocks() -> None:
    model = resnet32().eval()
    names = [name for name, _ in model.named_children()]
    assert names == ["stem", *[f"block_{i}" for i in range(15)], "head"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        # Any cut between units composes back to the whole; slices are plain nn.Sequential.
        for cut in (1, 6, 11, 16):
            first, second = model[:cut], model[cut:]
            assert type(first) is nn.Sequential
            torch.testing.assert_close(second(first(x)), full)
        # LocalNet's block walker finds the residual of every block, in order.
        residuals: list[torch.Tensor] = []
        torch.testing.assert_close(run_module(model, x, residuals), full)
    assert len(residuals) == 15
    assert [r.shape[1] for r in residuals] == [16] * 5 + [32] * 5 + [64] * 5


def test_vgg_and_mlp_units() -> None:
    model = vgg16()
    kinds = [name.split("_")[0] for name, _ in model.named_children()]
    assert kinds.count("conv") == 13 and kinds.count("pool") == 5 and kinds[-1] == "head"
    net = mlp(widths=[32, 16], norm=True, dropout=0.1)
    assert [name for name, _ in net.named_children()] == ["flatten", "layer_0", "layer_1", "head"]
    net.eval()
    out = net(torch.randn(4, 1, 8, 8))  # images are flattened to 64-vectors by the first unit
    assert out.shape == (4, 10) and out.isfinite().all()
    assert mlp(depth=0)(torch.randn(4, 64)).shape == (4, 10)


def test_transformer_cut_between_blocks_keeps_token_shape() -> None:
    model = transformer_encoder().eval()
    assert [name for name, _ in model.named_children()] == ["embed", "block_0", "block_1", "block_2", "block_3",
                                                             "head"]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        h = model.embed(x)
        assert h.shape == (5, 16, 64)  # 8×8 images as 16 tokens of 2×2 patches
        for block in (m for m in model if isinstance(m, TransformerBlock)):
            h = block(h)
            assert h.shape == (5, 16, 64)
        out = model.head(h)
        assert out.shape == (5, 10)
        torch.testing.assert_close(out, model(x))
        torch.testing.assert_close(model[3:](model[:3](x)), out)
        residuals: list[torch.Tensor] = []
        run_module(model, x, residuals)
    assert len(residuals) == 4


def test_transformer_token_input() -> None:
    model = transformer_encoder(vocab_size=50, max_len=12, dim=32, depth=2, num_heads=2, num_classes=3)
    tokens = torch.randint(0, 50, (4, 9))
    assert model(tokens).shape == (4, 3)
    with pytest.raises(ValueError, match="T <= 12"):
        model(torch.randint(0, 50, (4, 13)))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        transformer_encoder(image_size=9)
    with pytest.raises(ValueError, match="expected"):
        transformer_encoder()(torch.randn(2, 1, 16, 16))


# --- short training runs on digits --------------------------------------------------------------------------

def _train_digits(model: nn.Module, *, epochs: int, lr: float, flatten: bool = False, batch: int = 64) -> float:
    x_train, y_train, x_test, y_test = load_digits()
    if flatten:  # digits as 64-vectors
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    steps = epochs * -(-len(y_train) // batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_train))
        for i in range(0, len(y_train), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def test_mlp_trains_on_digits(one_thread: None) -> None:
    start = time.perf_counter()
    accuracy = _train_digits(mlp(), epochs=10, lr=3e-3, flatten=True)
    # Measured: 0.978 in about 1 s.
    assert accuracy > 0.93, accuracy
    assert time.perf_counter() - start < 60


def test_transformer_trains_on_digits(one_thread: None) -> None:
    start = time.perf_counter()
    accuracy = _train_digits(transformer_encoder(), epochs=10, lr=5e-3)
    # Measured: about 0.95 in 14 s on one busy core; 2×2 patches carry little each, so the bar is lower.
    assert accuracy > 0.85, accuracy
    assert time.perf_counter() - start < 120
