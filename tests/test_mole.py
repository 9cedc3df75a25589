"""MOLE (issue 7): mutual-information modules trained sequentially on vector, grid and graph data.

The settings are bench/mole.py's (the script behind bench/results/mole-2026-11-23.md), trained here with short
budgets; plus MutualInformation's ignore_index masking and readout against references."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from llkern.data.graphs import synthetic_graphs
from llkern.nn.graph import Graph, GraphReadout
from llkern.nn.heads import LinearHead
from llkern.nn.losses import LocalContext, MutualInformation
from llkern.ops.similarity import renyi_mutual_information

pytestmark = pytest.mark.filterwarnings("ignore:llkern.*using the pure-PyTorch reference:UserWarning")

_spec = importlib.util.spec_from_file_location("bench_mole", Path(__file__).resolve().parent.parent / "bench/mole.py")
mole = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_mole", mole)  # its dataclass looks its module up
_spec.loader.exec_module(mole)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rms_width(t, scale=0.5):
    t = t.detach().double()
    n = t.shape[0]
    return scale * math.sqrt((torch.cdist(t, t).square().sum() / (n * (n - 1))).item())


# --- MutualInformation: ignore_index and readout -----------------------------------------------------------------

def node_context(n=20, classes=3, ignored=(1, 4, 5, 11, 17), k=0):
    torch.manual_seed(0)
    outputs = torch.randn(n, 6, requires_grad=True)
    target = torch.randint(0, classes, (n,))
    target[list(ignored)] = -100
    return LocalContext(k, 2, torch.randn(n, 4), outputs, target, LinearHead(classes, 6))


def test_mutual_information_ignores_unlabelled_rows():
    ctx = node_context()
    keep = ctx.target != -100
    result = MutualInformation()(ctx)
    t, y = ctx.outputs[keep], ctx.target[keep]
    expected = renyi_mutual_information(t, y, sigma=rms_width(t))  # the labelled subset, its own width
    torch.testing.assert_close(result.loss, -expected, rtol=1e-5, atol=1e-6)
    # the same as the loss on a batch of the labelled rows only
    alone = LocalContext(0, 2, ctx.inputs[keep], ctx.outputs[keep], y, ctx.head)
    torch.testing.assert_close(result.loss, MutualInformation()(alone).loss)
    (grad,) = torch.autograd.grad(result.loss, ctx.outputs)
    assert (grad[~keep] == 0).all() and grad[keep].abs().sum() > 0
    # another ignore_index; None keeps every row (negative labels are then refused by the op)
    shifted = LocalContext(0, 2, ctx.inputs, ctx.outputs, torch.where(keep, ctx.target, 7), ctx.head)
    torch.testing.assert_close(MutualInformation(ignore_index=7)(shifted).loss, result.loss)
    full = LocalContext(0, 2, ctx.inputs, ctx.outputs, torch.where(keep, ctx.target, 0), ctx.head)
    torch.testing.assert_close(MutualInformation(ignore_index=None)(full).loss,
                               -renyi_mutual_information(ctx.outputs, full.target, sigma=rms_width(ctx.outputs)))
    with pytest.raises(TypeError, match="ignore_index"):
        MutualInformation(ignore_index=1.5)


def test_mutual_information_with_no_labelled_row_is_zero():
    ctx = node_context(ignored=range(20))
    result = MutualInformation()(ctx)
    assert result.loss.item() == 0.0 and result.terms["mi"].item() == 0.0
    result.loss.backward()  # a zero gradient reaches the module (DDP needs every process to reduce it)
    assert ctx.outputs.grad is not None and (ctx.outputs.grad == 0).all()
    # a single labelled row: I = 0, and still connected
    one = node_context(ignored=range(1, 20))
    result = MutualInformation()(one)
    result.loss.backward()
    assert result.loss.item() == 0.0 and (one.outputs.grad == 0).all()


def test_mutual_information_refuses_ignore_index_it_cannot_place():
    ctx = node_context()
    per_token = LocalContext(0, 2, ctx.inputs, ctx.outputs, ctx.target.reshape(4, 5), ctx.head)
    with pytest.raises(ValueError, match="ignore_index=-100"):
        MutualInformation()(per_token)


def test_last_module_cross_entropy_ignores_unlabelled_rows():
    ctx = node_context(k=1)
    keep = ctx.target != -100
    result = MutualInformation()(ctx)
    logits = ctx.head(ctx.outputs[keep])
    torch.testing.assert_close(result.loss, torch.nn.functional.cross_entropy(logits, ctx.target[keep]))
    assert result.counted.item() == keep.sum().item()


def test_mutual_information_readout_pools_each_graph():
    data = synthetic_graphs(2, seed=0)
    graph = Graph()
    x, y = data.batch(graph, range(len(data)))
    outputs = torch.randn(*x.shape[:2], 5, requires_grad=True)
    readout = GraphReadout(graph)
    ctx = LocalContext(0, 2, x, outputs, y, LinearHead(4, 5))
    result = MutualInformation(readout=readout)(ctx)
    mask = graph.node_mask.unsqueeze(-1).float()
    rows = (outputs * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(result.loss, -renyi_mutual_information(rows, y, sigma=rms_width(rows)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="readout to return"):
        MutualInformation(readout=lambda h: h)(ctx)
    with pytest.raises(TypeError, match="readout"):
        MutualInformation(readout=3)


# --- the settings train: MOLE sequentially, the earlier modules frozen -------------------------------------------

@pytest.mark.parametrize("name,epochs,chance,bar", [
    ("digits-mlp", 6, 0.1, 0.85),   # vector data
    ("digits-cnn", 6, 0.1, 0.85),   # grid data
    ("karate", 10, 0.5, 0.7),       # graph data, node classification (6 labelled of 34)
    ("graphs", 15, 0.25, 0.6),      # graph data, graph classification (synthetic)
])
def test_mole_setting_learns_sequentially(name, epochs, chance, bar):
    setting = mole.BUILDERS[name](0, epochs)
    net, trainer, total = mole.build(setting, "mole", 0)
    K = net.num_modules
    assert trainer.mode == "sequential" and total == epochs // K * K
    assert all(isinstance(loss, MutualInformation) for loss in net.losses)
    per_module = epochs // K
    trainer.fit(setting.train, per_module, batch_size=setting.batch_size, progress=False)  # module 0's phase
    frozen = {n: p.detach().clone() for n, p in net.blocks[0].named_parameters()}
    trainer.fit(setting.train, total, batch_size=setting.batch_size, progress=False)       # the other modules
    for n, p in net.blocks[0].named_parameters():
        assert torch.equal(p, frozen[n]), n  # frozen after its phase
        assert p.requires_grad  # fit gives it back when it returns
    history = trainer.history
    assert [row["active_module"] for row in history] == [k for k in range(K) for _ in range(per_module)]
    for row in history:  # one module trained per epoch; the earlier ones by I(T; Y), the last by cross-entropy
        trained = [k for k in range(K) if row["loss"][k] is not None]
        assert trained == [row["active_module"]]
    first = history[0]["loss"][0]
    assert first < 0 and history[per_module - 1]["loss"][0] <= first  # −I fell during module 0's phase
    accuracy = setting.evaluate(net)
    print(f"{name}: MOLE test accuracy {accuracy:.3f} after {total} epochs")
    assert accuracy > bar > chance


def test_end_to_end_is_the_same_model():
    setting = mole.BUILDERS["digits-mlp"](0, 3)
    net_mole, _, _ = mole.build(setting, "mole", 0)
    again = mole.BUILDERS["digits-mlp"](0, 3)
    net_e2e, trainer, epochs = mole.build(again, "e2e", 0)
    assert net_e2e.num_modules == 1 and trainer.mode == "simultaneous" and epochs == 3
    mole_params = [p for k in range(3) for p in [*net_mole.blocks[k].parameters()]] + \
        list(net_mole.heads[-1].parameters())
    e2e_params = list(net_e2e.blocks[0].parameters()) + list(net_e2e.heads[0].parameters())
    assert len(mole_params) == len(e2e_params)
    for a, b in zip(mole_params, e2e_params, strict=True):
        assert torch.equal(a, b)  # the same initial weights
