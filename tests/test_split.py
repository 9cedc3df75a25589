"""The split planner: exact balancing, unit flattening, measured saved bytes, LocalNet compatibility, errors."""

import itertools
import random

import pytest
import torch
from torch import nn

import llkern
from llkern.local.planner import SplitPlan, linear_partition, split
from llkern.models import PreActBlock


def _brute_force(cost, n, k):
    """(bottleneck, sum of squares) of the best partition, over every choice of k−1 cut positions."""
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        costs = [cost(bounds[m], bounds[m + 1]) for m in range(k)]
        score = (max(costs), sum(c * c for c in costs))
        best = score if best is None or score < best else best
    return best


def _score(cost, bounds):
    costs = [cost(bounds[m], bounds[m + 1]) for m in range(len(bounds) - 1)]
    return max(costs), sum(c * c for c in costs)


@pytest.mark.parametrize("additive", [True, False])
def test_linear_partition_matches_brute_force(additive):
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 8)
        if additive:
            unit = [rng.randint(0, 20) for _ in range(n)]

            def cost(i, j, unit=unit):
                return sum(unit[i:j])
        else:  # any group cost works (the planner's are unions, not sums)
            table = {(i, j): rng.randint(0, 50) for i in range(n) for j in range(i + 1, n + 1)}

            def cost(i, j, table=table):
                return table[i, j]
        for k in range(1, n + 1):
            bounds = linear_partition(cost, n, k)
            assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == k + 1
            assert all(a < b for a, b in itertools.pairwise(bounds)), "every group non-empty"
            assert _score(cost, bounds) == _brute_force(cost, n, k)


def _cbr(i, o):
    return [nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]


def uneven_cnn():
    """First stage: 32×32 maps, 8 channels, few parameters; last: 2×2 maps, 128 channels, most parameters."""
    return nn.Sequential(
        nn.Sequential(*_cbr(3, 8), *_cbr(8, 8)), nn.MaxPool2d(2),
        nn.Sequential(*_cbr(8, 32), *_cbr(32, 32)), nn.MaxPool2d(4),
        nn.Sequential(*_cbr(32, 128), *_cbr(128, 128)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _assert_same_function(model, plan, x, reference=None):
    model.eval()
    with torch.no_grad():
        expected = model(x) if reference is None else reference(x)
        torch.testing.assert_close(nn.Sequential(*plan.modules)(x), expected, rtol=0, atol=0)
    model.train()


def test_uneven_stages_params_and_saved_bytes_cut_differently():
    model, x = uneven_cnn(), torch.randn(4, 3, 32, 32)
    plans = {by: split(model, 3, by=by, example_input=x) for by in ("layers", "params", "saved_bytes")}
    print(plans["saved_bytes"])
    assert plans["params"].boundaries != plans["saved_bytes"].boundaries
    # The planner's figure is what the meter measures on the module run alone (input detached).
    assert plans["saved_bytes"].costs == plans["saved_bytes"].saved_bytes
    assert max(plans["saved_bytes"].saved_bytes) <= max(plans["layers"].saved_bytes)
    assert max(plans["saved_bytes"].saved_bytes) <= max(plans["params"].saved_bytes)
    # by="params" balances parameters: no plan has a smaller largest module in parameters.
    assert max(plans["params"].params) <= min(max(p.params) for p in plans.values())
    for plan in plans.values():
        assert plan.total_saved_bytes == plans["layers"].total_saved_bytes
        assert sum(plan.params) == sum(p.numel() for p in model.parameters())
        _assert_same_function(model, plan, x)
    assert plans["layers"].costs == [7, 8, 8]  # 23 units


def digits_resnet_model(width=8):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False),
        nn.Sequential(PreActBlock(width, width), PreActBlock(width, width)),
        nn.Sequential(PreActBlock(width, 2 * width, stride=2), PreActBlock(2 * width, 2 * width)),
        nn.Sequential(nn.BatchNorm2d(2 * width), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def test_resnet_blocks_are_units_and_plan_plugs_into_localnet():
    model, x = digits_resnet_model(), torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    model[1][0].branch[0].running_mean.fill_(0.5)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    model[2].eval()  # a mode the planner must leave as it found it
    rng_before = torch.get_rng_state()
    plan = split(model, 3, example_input=x)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not model[2].training and model[1].training
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), f"{name} changed by planning"
    model[2].train()

    assert plan.unit_names == ["0", "1.0", "1.1", "2.0", "2.1", "3.0", "3.1", "4", "5", "6"]
    assert all(isinstance(m, nn.Sequential) for m in plan.modules)
    assert plan.costs == plan.saved_bytes
    units = [u for m in plan.modules for u in m]
    assert units[1] is model[1][0] and units[-1] is model[6]  # shared, not copied
    assert {id(p) for p in nn.Sequential(*plan.modules).parameters()} == {id(p) for p in model.parameters()}
    _assert_same_function(model, plan, x)

    net = llkern.LocalNet(plan.modules, num_classes=10, example_input=x[:2])
    result = net.local_step(x, y)
    assert len(result.losses) == 3 and all(loss == loss for loss in result.losses)
    assert model[1][0].branch[2].weight.grad is not None  # the model's own parameters were trained
    trgl = llkern.LocalNet(plan, num_classes=10, example_input=x[:2], losses=llkern.TransportRegularized(tau=1.0))
    assert len(trgl.local_step(x, y).terms) == 3


def test_vgg_like_sequential():
    model = nn.Sequential(*_cbr(1, 8), *_cbr(8, 8), nn.MaxPool2d(2), *_cbr(8, 16), *_cbr(16, 16), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    x = torch.randn(8, 1, 8, 8)
    for by in ("layers", "params", "saved_bytes"):
        plan = split(model, 4, by=by, example_input=x)
        assert len(plan) == 4 and plan.boundaries[-1] == 19
        if by == "saved_bytes":
            assert plan.costs == plan.saved_bytes
        _assert_same_function(model, plan, x)
    plan = split(model, 4, by="layers")  # no example input: no measured bytes
    assert plan.saved_bytes is None and plan.total_saved_bytes is None and plan.costs == [4, 5, 5, 5]
    assert "saved" not in str(plan).splitlines()[1]


class Embed(nn.Module):
    def __init__(self, vocab, d, length):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.position = nn.Parameter(0.02 * torch.randn(length, d))

    def forward(self, ids):
        return self.tokens(ids) + self.position[: ids.shape[1]]


class Block(nn.Module):
    """Pre-norm attention + MLP on (B,T,C)."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=20, d=16, length=6, classes=5):
        super().__init__()
        self.embed = Embed(vocab, d, length)
        self.blocks = nn.ModuleList(Block(d) for _ in range(4))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, classes))

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def split_units(self):
        return [self.embed, self.blocks, self.head]


def test_transformer_stack():
    model, ids = TinyTransformer(), torch.randint(0, 20, (3, 6))
    plan = split(model, 3, example_input=ids)
    assert plan.unit_names == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head.0", "head.1"]
    assert plan.costs == plan.saved_bytes
    _assert_same_function(model, plan, ids)
    # The same stack as an nn.Sequential holding the ModuleList (flattened in place) gives the same plan.
    as_sequential = nn.Sequential(model.embed, model.blocks, model.head)
    again = split(as_sequential, 3, example_input=ids)
    assert again.boundaries == plan.boundaries and again.costs == plan.costs
    net = llkern.LocalNet(plan.modules, num_classes=5, example_input=ids[:2])
    logits = net.forward_all(ids)
    assert [t.shape for t in logits] == [torch.Size([3, 6, 5])] * 3  # token-shaped features, per-token heads


@pytest.mark.parametrize("by", ["layers", "params", "saved_bytes"])
def test_k_one_and_k_units(by):
    model, x = digits_resnet_model(), torch.randn(4, 1, 8, 8)
    one = split(model, 1, by=by, example_input=x)
    assert one.boundaries == [0, 10] and len(one.modules[0]) == 10
    assert one.saved_bytes[0] == one.total_saved_bytes  # one module is end-to-end training
    every = split(model, 10, by=by, example_input=x)
    assert every.boundaries == list(range(11)) and all(len(m) == 1 for m in every)
    if by == "layers":
        assert every.costs == [1] * 10
    _assert_same_function(model, every, x)
    assert len(str(every).splitlines()) == 1 + 2 + 10 + 1


class CustomForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_errors():
    model, x = uneven_cnn(), torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="by must be one of"):
        split(model, 2, by="flops", example_input=x)
    with pytest.raises(ValueError, match="example_input"):
        split(model, 2)
    with pytest.raises(ValueError, match=r"23 units into k=24"):
        split(model, 24, by="layers")
    for k in (0, -1):
        with pytest.raises(ValueError, match="k >= 1"):
            split(model, k, by="layers")
    with pytest.raises(TypeError, match=r"CustomForward \(an nn.Module with its own forward\).*split_units"):
        split(CustomForward(), 2, by="layers")

    class StagesWithOwnForward(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="StagesWithOwnForward"):
        split(StagesWithOwnForward(nn.Linear(4, 4), nn.ReLU()), 2, by="layers")
    # ...but inside a plain Sequential such a module is one block, kept whole.
    wrapped = nn.Sequential(nn.Linear(4, 4), StagesWithOwnForward(nn.Linear(4, 4), nn.ReLU()))
    assert split(wrapped, 2, by="layers").unit_names == ["0", "1"]
    with pytest.raises(TypeError, match="ModuleDict"):
        split(nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"a": nn.ReLU()})), 1, by="layers")


def test_plan_is_exported():
    assert llkern.split is split and llkern.SplitPlan is SplitPlan
