"""The split planner: exact balancing, units (blocks and layer groups kept whole), cuts only where a module ends on a
nonlinearity, measured saved bytes, LocalNet compatibility, warnings, errors."""

import contextlib
import itertools
import pickle
import random
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import llkern
from llkern import models
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


# What the tests call affine, and the layers that keep an affine map affine, independent of the planner's lists.
AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
KEEPS_AFFINE = (nn.Identity, nn.Flatten, nn.Dropout, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _layers(module):
    """The layers a module runs, in order, reading into plain nn.Sequentials (a block is one item)."""
    if type(module) is nn.Sequential:
        return [layer for child in module for layer in _layers(child)]
    return [module]


def _ends_on_affine(layers):
    for layer in reversed(layers):
        if not isinstance(layer, KEEPS_AFFINE):
            return isinstance(layer, AFFINE)
    return True  # only reshapes and dropout: the module computes nothing


def _check_module_ends(plan):
    """No module but the last ends on an affine layer (reading back past pass-throughs, across modules)."""
    seen = []
    for k, module in enumerate(plan.modules[:-1]):
        seen += _layers(module)
        assert not _ends_on_affine(seen), f"module {k} of {plan.boundaries} ends on {seen[-1]}"


@contextlib.contextmanager
def _no_planner_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in caught if str(w.message).startswith(("split:", "LocalNet:"))]
    assert not ours, ours


def _cbr(i, o):
    return [nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]


def uneven_cnn(classifier=True):
    """First stage: 32×32 maps, 8 channels, few parameters; last: 2×2 maps, 128 channels, most parameters."""
    return nn.Sequential(
        nn.Sequential(*_cbr(3, 8), *_cbr(8, 8)), nn.MaxPool2d(2),
        nn.Sequential(*_cbr(8, 32), *_cbr(32, 32)), nn.MaxPool2d(4),
        nn.Sequential(*_cbr(32, 128), *_cbr(128, 128)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        *([nn.Linear(128, 10)] if classifier else []))


def _assert_same_function(model, plan, x, reference=None):
    model.eval()
    with torch.no_grad():
        expected = model(x) if reference is None else reference(x)
        torch.testing.assert_close(nn.Sequential(*plan.modules)(x), expected, rtol=0, atol=0)
    model.train()


def test_uneven_stages_params_and_saved_bytes_cut_differently():
    # flatten=True: every layer a unit (cuts still only after a ReLU or a pool), for a fine choice of cuts.
    model, x = uneven_cnn(classifier=False), torch.randn(4, 3, 32, 32)
    plans = {by: split(model, 3, by=by, example_input=x, flatten=True) for by in ("layers", "params", "saved_bytes")}
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
        _check_module_ends(plan)
        _assert_same_function(model, plan, x)
    assert len(plans["layers"].unit_names) == 22 and plans["layers"].costs == [7, 7, 8]


def flat_cnn():
    """A flat nn.Sequential of single layers: 20 units, admissible cuts listed in FLAT_BOUNDARIES."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),                      # 0 1 2
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),                      # 3 4 5
        nn.MaxPool2d(2),                                                                  # 6
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),                                        # 7 8
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Dropout(0.1), nn.ReLU(),  # 9 10 11 12
        nn.AvgPool2d(2), nn.Flatten(),                                                    # 13 14
        nn.Linear(64, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 32), nn.Tanh())      # 15 16 17 18 19


# After the ReLUs (units 2, 5, 8, 12, 17), the max-pool (6), the average pool and flatten that follow a ReLU
# (13, 14); never after a conv, a BN or a linear layer, nor after a dropout that follows one (11, 16).
FLAT_BOUNDARIES = [0, 3, 6, 7, 9, 13, 14, 15, 18, 20]


@pytest.mark.parametrize("by", ["layers", "params", "saved_bytes"])
def test_flat_sequential_is_cut_only_after_nonlinearities(by):
    model, x = flat_cnn(), torch.randn(4, 1, 8, 8)
    for k in range(1, len(FLAT_BOUNDARIES)):
        plan = split(model, k, by=by, example_input=x)
        assert len(plan) == k and set(plan.boundaries) <= set(FLAT_BOUNDARIES)
        _check_module_ends(plan)
        _assert_same_function(model, plan, x)
    assert plan.boundaries == FLAT_BOUNDARIES  # the largest k takes every admissible cut
    with pytest.raises(ValueError, match=r"k=10 modules: at most 9 are possible \(20 units; .*affine.*\)\. "
                                         r"More with allow_affine_end=True \(cut after any unit\): 20 modules\.$"):
        split(model, 10, by=by, example_input=x)
    # The same layers as an nn.ModuleList, or a list, are the same chain.
    for chain in (nn.ModuleList(model), list(model)):
        assert split(chain, 4, by=by, example_input=x).boundaries == split(model, 4, by=by, example_input=x).boundaries


@pytest.mark.parametrize("by", ["layers", "params"])
def test_balancing_is_exact_over_the_admissible_cuts(by):
    model = flat_cnn()
    for k in range(1, len(FLAT_BOUNDARIES)):
        plan = split(model, k, by=by)

        def cost(i, j, unit=plan.unit_costs):  # additive: no tied parameters
            return sum(unit[i:j])

        best = min(_score(cost, [0, *cuts, 20]) for cuts in itertools.combinations(FLAT_BOUNDARIES[1:-1], k - 1))
        assert _score(cost, plan.boundaries) == best
    # The constraint costs something here: 10 + 10 layers would cut after a convolution (unit 9).
    assert split(model, 2, by="layers").costs == [9, 11]
    assert split(model, 2, by="layers", allow_affine_end=True).costs == [10, 10]


def grouped_cnn():
    """Layer groups (nested Sequentials of single layers) and a stage of groups, as users write them."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Sequential(*_cbr(3, 8))), ("conv2", nn.Sequential(*_cbr(8, 8))), ("pool1", nn.MaxPool2d(2)),
        ("conv3", nn.Sequential(*_cbr(8, 16), *_cbr(16, 16))), ("pool2", nn.MaxPool2d(2)),
        ("stage", nn.Sequential(nn.Sequential(*_cbr(16, 32)), nn.Sequential(*_cbr(32, 32)))),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]))


GROUPED_UNITS = ["conv1", "conv2", "pool1", "conv3", "pool2", "stage.0", "stage.1", "pool", "flatten"]


@pytest.mark.parametrize("by", ["layers", "params", "saved_bytes"])
def test_layer_groups_are_never_cut(by):
    model, x = grouped_cnn(), torch.randn(2, 3, 16, 16)
    groups = [model.conv1, model.conv2, model.conv3, model.stage[0], model.stage[1]]
    for k in range(1, len(GROUPED_UNITS) + 1):
        plan = split(model, k, by=by, example_input=x)
        assert plan.unit_names == GROUPED_UNITS  # the stage is read as its groups, the groups are kept whole
        units = [u for m in plan.modules for u in m]
        assert all(sum(u is group for u in units) == 1 for group in groups)
        assert not any(isinstance(u, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)) for u in units)
        _check_module_ends(plan)
        _assert_same_function(model, plan, x)
    with pytest.raises(ValueError, match=r"k=10 modules: at most 9 are possible \(9 units; units are whole blocks "
                                         r"and layer groups .*More with flatten=True .*: 10 modules; with both: 22 "
                                         r"modules"):
        split(model, 10, by=by, example_input=x)


def test_flatten_option():
    model, x = grouped_cnn(), torch.randn(2, 3, 16, 16)
    flat = split(model, 10, by="layers", flatten=True)  # cut inside the groups, after their ReLUs
    assert len(flat.unit_names) == 22 and flat.unit_names[:3] == ["conv1.0", "conv1.1", "conv1.2"]
    assert [flat.unit_names[b - 1] for b in flat.boundaries[1:-1]] == [
        "conv1.2", "conv2.2", "pool1", "conv3.2", "conv3.5", "pool2", "stage.0.2", "stage.1.2", "pool"]
    _check_module_ends(flat)
    _assert_same_function(model, flat, x)
    whole = split(model, 3, by="layers", flatten=False)  # every nested Sequential one unit, the stage too
    assert whole.unit_names == ["conv1", "conv2", "pool1", "conv3", "pool2", "stage", "pool", "flatten"]
    assert any(u is model.stage for m in whole for u in m)
    with pytest.raises(ValueError, match=r"flatten=False\).*More with flatten=True .*: 10 modules"):
        split(model, 9, by="layers", flatten=False)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="flatten must be 'auto', True or False"):
            split(model, 2, by="layers", flatten=bad)
    with pytest.raises(ValueError, match="allow_affine_end must be True or False"):
        split(model, 2, by="layers", allow_affine_end=1)


def test_options_restore_the_old_plans():
    # flatten=True and allow_affine_end=True: every layer a unit, any cut; the boundaries the planner chose
    # before layer groups were kept whole and affine ends excluded (recorded from it).
    model = uneven_cnn()
    with pytest.warns(UserWarning, match="ends in an nn.Linear"):
        layers = split(model, 3, by="layers", flatten=True, allow_affine_end=True)
    assert len(layers.unit_names) == 23 and layers.boundaries == [0, 7, 15, 23] and layers.costs == [7, 8, 8]
    assert isinstance(layers.modules[1][-1], nn.Conv2d)  # what the default never does
    with pytest.warns(UserWarning, match="ends in an nn.Linear"):
        params = split(model, 3, by="params", flatten=True, allow_affine_end=True)
    assert params.boundaries == [0, 16, 18, 23] and isinstance(params.modules[0][-1], nn.BatchNorm2d)
    with pytest.warns(UserWarning, match="ends in an nn.Linear"):
        default = split(model, 3, by="params")
    assert default.unit_names == [str(i) for i in range(8)]
    _check_module_ends(default)


def _body(model):
    """The model without its classifier, as llkern's CLI splits it: the final Linear dropped, the head's
    activation, pooling and flatten kept."""
    children = list(model.named_children())
    name, last = children[-1]
    if isinstance(last, (nn.Linear, models.TokenClassifier)):
        return nn.Sequential(OrderedDict(children[:-1]))
    if isinstance(last, nn.Sequential) and isinstance(last[-1], nn.Linear):
        return nn.Sequential(OrderedDict([*children[:-1], (f"{name}_features", last[:-1])]))
    return model


@pytest.mark.parametrize("depth, preact, by", [(32, False, "layers"), (32, True, "params"), (32, False, "saved_bytes"),
                                               (110, False, "layers"), (110, True, "params")])
def test_cifar_resnets_split_into_16_modules(depth, preact, by):
    body, x = _body(models.cifar_resnet(depth, preact=preact)), torch.randn(2, 3, 32, 32)
    example = x if by == "saved_bytes" else None
    blocks = [m for name, m in body.named_children() if name.startswith("block_")]
    with _no_planner_warnings():
        plan = split(body, 16, by=by, example_input=example)
    assert len(plan) == 16 and plan.unit_names[0] == "stem" and len(plan.unit_names) == len(blocks) + 2
    # The stem ends on a convolution or a BN (its ReLU is block_0's entry): never a module alone.
    assert plan.boundaries[1] >= 2
    units = [u for m in plan for u in m]
    assert all(sum(u is block for u in units) == 1 for block in blocks)
    _check_module_ends(plan)
    if depth == 32:
        _assert_same_function(body, plan, x)
        with pytest.raises(ValueError, match=r"k=17 modules: at most 16 are possible.*allow_affine_end=True "
                                             r"\(cut after any unit\): 17 modules"):
            split(body, 17, by=by, example_input=example)
    # The same network written as three stages of blocks: the stages are read as their blocks.
    n = len(blocks) // 3
    staged = nn.Sequential(OrderedDict([("stem", body.stem),
                                        *((f"stage{s}", nn.Sequential(*blocks[s * n:(s + 1) * n])) for s in range(3)),
                                        ("head", body.head_features)]))
    again = split(staged, 16, by=by, example_input=example)
    assert again.boundaries == plan.boundaries and again.unit_names[1:3] == ["stage0.0", "stage0.1"]


def _cli_model(name):
    x8 = torch.randn(8, 1, 8, 8)
    x32 = torch.randn(8, 3, 32, 32)
    return {"digits-resnet": lambda: (models.digits_resnet(1)[0], x8),
            "digits-lenet": lambda: (models.digits_lenet(), x8),
            "digits-cnn": lambda: (models.digits_lenet_caffe(), x8),
            "mlp": lambda: (models.mlp(in_features=64), x8),
            "transformer": lambda: (models.transformer_encoder(in_channels=1, image_size=8), x8),
            "resnet32": lambda: (models.resnet32(), x32),
            "vgg11": lambda: (models.vgg11(width=8), x32)}[name]()


@pytest.mark.parametrize("name, k, by", [("digits-resnet", 4, "saved_bytes"), ("digits-lenet", 3, "layers"),
                                         ("digits-cnn", 3, "saved_bytes"), ("mlp", 3, "layers"),
                                         ("transformer", 2, "layers"), ("resnet32", 16, "layers"),
                                         ("vgg11", 8, "params")])
def test_no_warning_for_the_models_as_the_cli_splits_them(name, k, by):
    model, x = _cli_model(name)
    body = _body(model)
    with _no_planner_warnings():
        plan = split(body, k, by=by, example_input=x)
        llkern.LocalNet(plan.modules, num_classes=10, example_input=x[:2])
    assert len(plan) == k
    _check_module_ends(plan)
    _assert_same_function(body, plan, x)


def test_a_model_ending_in_its_classifier_warns():
    model, x = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)), torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"^split: the model ends in an nn.Linear, probably its classifier "
                                         r"\(3: Linear\(in_features=144, out_features=10.*model\[:-1\]"):
        plan = split(model, 2, by="layers")
    assert plan.boundaries == [0, 2, 4]
    with pytest.warns(UserWarning, match=r"^LocalNet: the last module ends in an nn.Linear \(blocks\[1\]\.1: Linear"
                                         r".*\), probably the model classifier.*two linear maps in a row"):
        llkern.LocalNet(plan.modules, num_classes=10, example_input=x)
    with _no_planner_warnings():  # heads of the caller's own: no warning
        llkern.LocalNet(plan.modules, heads=[llkern.LinearHead(10, 4), nn.Identity()], example_input=x)
        features = split(model[:-1], 2, by="layers")  # the model without its classifier: nothing to say
        llkern.LocalNet(features.modules, num_classes=10, example_input=x)
    # A dropout after the classifier does not hide it.
    with pytest.warns(UserWarning, match=r"^split: the model ends in an nn.Linear.*\(3: Linear"):
        split(nn.Sequential(*model, nn.Dropout(0.5)), 2, by="layers")


def test_localnet_warns_on_a_bare_sequential_of_layers():
    layers = nn.Sequential(*_cbr(1, 4), *_cbr(4, 4))
    with pytest.warns(UserWarning, match=r"^LocalNet: blocks is an nn.Sequential, so each of its 6 entries becomes a "
                                         r"local module .*0 \(Conv2d\), 1 \(BatchNorm2d\), 2 \(ReLU\).*"
                                         r"llkern.split\(model, k\)"):
        net = llkern.LocalNet(layers, num_classes=10)
    assert net.num_modules == 6  # it still does what it was asked
    with _no_planner_warnings():  # groups in a Sequential, or a plan's modules
        llkern.LocalNet(nn.Sequential(nn.Sequential(*_cbr(1, 4)), nn.Sequential(*_cbr(4, 4))), num_classes=10)
        llkern.LocalNet(split(layers, 2, by="layers").modules, num_classes=10)


def digits_resnet_model(width=8):
    """Stem, two stages of two pre-activation blocks, BN-ReLU, pooling; no classifier (the heads classify)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False),
        nn.Sequential(PreActBlock(width, width), PreActBlock(width, width)),
        nn.Sequential(PreActBlock(width, 2 * width, stride=2), PreActBlock(2 * width, 2 * width)),
        nn.Sequential(nn.BatchNorm2d(2 * width), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


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

    # The stages are read as their blocks; the BN-ReLU group is kept whole.
    assert plan.unit_names == ["0", "1.0", "1.1", "2.0", "2.1", "3", "4", "5"]
    assert plan.boundaries[1] >= 2  # the stem convolution goes with a block
    assert all(isinstance(m, nn.Sequential) for m in plan.modules)
    assert plan.costs == plan.saved_bytes
    units = [u for m in plan.modules for u in m]
    assert units[1] is model[1][0] and units[5] is model[3] and units[-1] is model[5]  # shared, not copied
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
        with pytest.warns(UserWarning, match="ends in an nn.Linear"):
            plan = split(model, 4, by=by, example_input=x)
        assert len(plan) == 4 and plan.boundaries[-1] == 19
        if by == "saved_bytes":
            assert plan.costs == plan.saved_bytes
        _check_module_ends(plan)
        _assert_same_function(model, plan, x)
    with pytest.warns(UserWarning, match="ends in an nn.Linear"):
        plan = split(model, 4, by="layers")  # no example input: no measured bytes
    assert plan.saved_bytes is None and plan.total_saved_bytes is None and plan.costs == [6, 4, 4, 5]
    assert "saved" not in str(plan).splitlines()[1] and "batch" not in str(plan) and plan.example_batch is None


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
    with pytest.warns(UserWarning, match=r"ends in an nn.Linear, probably its classifier \(head.1: Linear"):
        plan = split(model, 3, example_input=ids)
    # The ModuleList is read as its blocks; the head (LayerNorm, Linear: a layer group) is one unit.
    assert plan.unit_names == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert plan.costs == plan.saved_bytes
    _assert_same_function(model, plan, ids)
    # The same stack as an nn.Sequential holding the ModuleList (read in place) gives the same plan.
    as_sequential = nn.Sequential(model.embed, model.blocks, model.head)
    with pytest.warns(UserWarning, match="ends in an nn.Linear"):
        again = split(as_sequential, 3, example_input=ids)
    assert again.boundaries == plan.boundaries and again.costs == plan.costs
    with pytest.warns(UserWarning, match="LocalNet: the last module ends in an nn.Linear"):
        net = llkern.LocalNet(plan.modules, num_classes=5, example_input=ids[:2])
    logits = net.forward_all(ids)
    assert [t.shape for t in logits] == [torch.Size([3, 6, 5])] * 3  # token-shaped features, per-token heads


@pytest.mark.parametrize("by", ["layers", "params", "saved_bytes"])
def test_k_one_and_k_units(by):
    model, x = digits_resnet_model(), torch.randn(4, 1, 8, 8)
    one = split(model, 1, by=by, example_input=x)
    assert one.boundaries == [0, 8] and len(one.modules[0]) == 8
    assert one.saved_bytes[0] == one.total_saved_bytes  # one module is end-to-end training
    # Every admissible cut: all but the one after the stem convolution.
    every = split(model, 7, by=by, example_input=x)
    assert every.boundaries == [0, 2, 3, 4, 5, 6, 7, 8]
    if by == "layers":
        assert every.costs == [2, 1, 1, 1, 1, 1, 1]
    _assert_same_function(model, every, x)
    assert len(str(every).splitlines()) == 1 + 2 + 7 + 1
    with pytest.raises(ValueError, match=r"at most 7 .*allow_affine_end=True \(cut after any unit\): 8 modules"):
        split(model, 8, by=by, example_input=x)
    units = split(model, 8, by=by, example_input=x, allow_affine_end=True)
    assert units.boundaries == list(range(9)) and all(len(m) == 1 for m in units)


class CustomForward(nn.Module):
    """A forward that torch.fx cannot trace (a branch on a tensor's value): its order cannot be read."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


class TwoBranches(nn.Module):
    """A traceable forward whose input is needed to the end: one piece, never cut."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_errors():
    model, x = uneven_cnn(classifier=False), torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="by must be one of"):
        split(model, 2, by="flops", example_input=x)
    with pytest.raises(ValueError, match="example_input"):
        split(model, 2)
    with pytest.raises(llkern.TooManyModulesError, match=r"cannot cut Sequential into k=8 modules: at most 7 are "
                                                        r"possible \(7 units") as too_many:
        split(model, 8, by="layers")
    assert isinstance(too_many.value, ValueError) and (too_many.value.k, too_many.value.possible) == (8, 7)
    again = pickle.loads(pickle.dumps(too_many.value))  # multiprocessing and torchrun's error files pickle it
    assert (type(again), str(again), again.k, again.possible) == (llkern.TooManyModulesError, str(too_many.value), 8, 7)
    with pytest.raises(ValueError, match=r"at most 22 are possible .*k must be at most 22\.$"):
        split(model, 23, by="layers", flatten=True, allow_affine_end=True)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k >= 1"):
            split(model, k, by="layers")
    with pytest.raises(TypeError, match=r"CustomForward \(an nn.Module with its own forward that torch.fx cannot "
                                        r"trace: .*\).*split_units"):
        split(CustomForward(), 2, by="layers")
    with pytest.raises(ValueError, match=r"cannot cut TwoBranches into k=2 modules: at most 1 are possible"):
        split(TwoBranches(), 2, by="layers")

    class StagesWithOwnForward(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    # at the top level such a Sequential is read by torch.fx (its entries, then the doubling): chained, its pieces
    # compute its own forward, not the plain chain of its entries
    own = StagesWithOwnForward(nn.Linear(4, 4), nn.ReLU())
    plan = split(own, 2, by="layers")
    x = torch.randn(3, 4)
    torch.testing.assert_close(plan.modules[1](plan.modules[0](x)), own(x))
    # ...but inside a plain Sequential such a module is one block, kept whole (and a block may end a module).
    wrapped = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), StagesWithOwnForward(nn.Linear(4, 4), nn.Linear(4, 4)),
                            nn.Tanh())
    assert split(wrapped, 3, by="layers").unit_names == ["0", "1", "2", "3"]
    assert split(wrapped, 3, by="layers").boundaries == [0, 2, 3, 4]
    with pytest.raises(TypeError, match="ModuleDict"):
        split(nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"a": nn.ReLU()})), 1, by="layers")


def test_plan_is_exported():
    assert llkern.split is split and llkern.SplitPlan is SplitPlan


def test_split_by_time_balances_measured_unit_times():
    """One unit much slower than the rest ends up alone; the plan reports milliseconds; no side effects."""
    torch.manual_seed(0)
    slow = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1), nn.ReLU())
    fast = [nn.Sequential(nn.Conv2d(96 if i == 0 else 4, 4, 1), nn.ReLU()) for i in range(4)]
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(slow, *fast, bn, nn.ReLU())
    x = torch.randn(16, 3, 24, 24)
    running = bn.running_mean.clone()
    plan = split(model, 2, by="time", example_input=x)
    assert plan.boundaries[:2] == [0, 1], plan
    assert plan.costs[0] > plan.costs[1] > 0
    assert "cost (time)" in str(plan) and " ms" in str(plan)
    assert plan.example_batch == 16 and "balanced by time (a batch of 16)" in str(plan)  # times grow with it
    assert "saved for a batch of 16" in str(plan)
    assert all(p.grad is None for p in model.parameters())  # gradients left as they were
    assert torch.equal(bn.running_mean, running)  # statistics restored
    with pytest.raises(ValueError, match="by='time' measures each unit"):
        split(model, 2, by="time")


def test_saved_bytes_of_a_model_saving_a_sparse_tensor():
    """A GCN saves its sparse adjacency for backward: the planner counts its index and value storages (it once
    failed on the storage of the sparse tensor itself, with any example_input)."""
    from llkern.nn.graph import Graph, normalized_adjacency

    edges = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    model = models.gcn_nodes(Graph(normalized_adjacency(edges, 5)), 3, 2, depth=3)[:-1]
    x = torch.randn(5, 3)
    plan = split(model, 2, example_input=x)
    assert plan.boundaries in ([0, 1, 3], [0, 2, 3]) and all(b > 0 for b in plan.saved_bytes)
    assert split(model, 2, by="layers", example_input=x).boundaries == [0, 1, 3]
    _assert_same_function(model, plan, x)


def test_split_of_a_model_on_the_meta_device_matches_the_cpu_plan():
    """Meta storages have no address (data_ptr() is 0): the meter must still tell them apart, and the
    parameters' storages must not exclude every activation."""
    def build():
        torch.manual_seed(0)
        return uneven_cnn(classifier=False)

    cpu = split(build(), 3, example_input=torch.randn(4, 3, 32, 32))
    with torch.device("meta"):
        model = build()
    meta = split(model, 3, example_input=torch.randn(4, 3, 32, 32, device="meta"))
    assert min(meta.saved_bytes) > 0
    assert (meta.boundaries, meta.costs, meta.saved_bytes, meta.total_saved_bytes) == \
        (cpu.boundaries, cpu.costs, cpu.saved_bytes, cpu.total_saved_bytes)


def test_split_under_inference_mode_still_measures():
    model, x = uneven_cnn(classifier=False), torch.randn(4, 3, 32, 32)
    plan = split(model, 3, example_input=x)
    with torch.inference_mode():  # autograd saves nothing there: the costs were all 0 and the plan arbitrary
        again = split(model, 3, example_input=torch.randn(4, 3, 32, 32))
    assert (again.boundaries, again.costs, again.saved_bytes) == (plan.boundaries, plan.costs, plan.saved_bytes)


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)

    def forward(self, ids):
        return self.embed(ids)


def test_units_must_return_tensors_and_example_input_be_one():
    model = nn.Sequential(_Embed(), nn.LSTM(8, 8, batch_first=True), nn.Tanh())
    ids = torch.randint(0, 20, (2, 5))
    for by in ("saved_bytes", "time", "layers"):  # once a TypeError from the Tanh, naming neither unit
        with pytest.raises(TypeError, match=r"expected every unit to return a tensor .*got tuple from unit 1 \(LSTM\)"):
            split(model, 2, by=by, example_input=ids)
    with pytest.raises(TypeError, match=r"expected example_input to be a torch.Tensor .*got tuple"):
        split(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 1, example_input=(torch.randn(2, 4),))
    # An error raised inside a unit says which unit ran, on which batch.
    with pytest.raises(ValueError, match="more than 1 value per channel") as info:
        split(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.ReLU()), 1,
              example_input=torch.randn(1, 4))
    assert "raised by unit 2 (BatchNorm1d)" in "".join(getattr(info.value, "__notes__", []))


def test_a_model_with_its_own_forward_is_told_how_to_write_split_units():
    with pytest.raises(TypeError, match=r"def split_units\(self\): return \[self.a, self.b\]`.*nn.Flatten\(\)"):
        split(CustomForward(), 2, by="layers")


class _PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


class _TinyViT(nn.Module):
    """A positional embedding added in forward, outside every module: a chain of the modules misses it."""

    def __init__(self, with_pos_module: bool):
        super().__init__()
        self.patch = _PatchEmbed()
        self.pos = nn.Parameter(torch.randn(1, 4, 8))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
        self.with_pos_module = with_pos_module

    def forward(self, x):
        h = self.patch(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return h

    def split_units(self):
        if not self.with_pos_module:
            return [self.patch, self.blocks]
        outer = self

        class AddPos(nn.Module):
            def forward(self, h):
                return h + outer.pos

        return [nn.Sequential(self.patch, AddPos()), self.blocks]


def test_split_units_that_miss_a_step_of_forward_warn():
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"chaining _TinyViT.split_units\(\) does not compute model\(example_input\)"):
        split(_TinyViT(with_pos_module=False), 2, example_input=x)
    model = _TinyViT(with_pos_module=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = split(model, 2, example_input=x)
    assert all(m.training for m in model.modules())  # modes restored after the eval-mode comparison
    _assert_same_function(model, plan, x)


def test_split_leaves_a_lazy_batch_norms_statistics_at_their_initial_values():
    # a lazy BatchNorm's statistics do not exist before the measurement, so they cannot be copied and put back: the
    # measurement's training-mode forward moved them (num_batches_tracked 1, means off zero)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    split(model, 2, example_input=torch.randn(4, 3, 9, 9))
    fresh = nn.BatchNorm2d(8)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(fresh, name)), name


def test_a_slice_of_a_larger_batch_plans_as_the_batch_itself():
    # the meter counts whole storages: x[:16] of 2000 images charged all of them to the first unit saving its
    # input, which moved the first cut (ResNet-32: boundaries [0, 2, ...] and 33 MiB for module 0 against 18)
    model = models.resnet32()[:-1]
    big = torch.randn(400, 3, 32, 32)
    sliced, own = (split(model, 4, example_input=x) for x in (big[:16], big[:16].clone()))
    assert sliced.boundaries == own.boundaries and sliced.costs == own.costs and sliced.saved_bytes == own.saved_bytes
