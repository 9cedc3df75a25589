"""llkern.split on models with their own forward, read by torch.fx (trace_units): a ResNet and a ViT written as a
user would (F.relu, torch.flatten, a class token, a positional embedding), cut only where one tensor flows on,
never inside a residual block, never right after an affine layer; the pieces share the model's parameters and,
chained, compute the model; untraceable models get a clear error."""

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llkern
from llkern.local.planner import (
    TracedPassThrough,
    TracedUnit,
    _admissible_boundaries,
    _cut_points,
    _units,
    trace_units,
)


class Basic(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (None if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision's layout, small: stem, two stages of blocks, pooling, torch.flatten, classifier."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Basic(8, 8), Basic(8, 8))
        self.layer2 = nn.Sequential(Basic(8, 16, 2), Basic(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ViT(nn.Module):
    """Patches, a class token concatenated, a positional embedding added, encoder layers, the class token's logits."""

    def __init__(self, dim=16, depth=3, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def chained(modules, x):
    for m in modules:
        x = m(x)
    return x


@pytest.mark.parametrize("make", [ResNet, ViT])
def test_traced_pieces_compute_the_model_and_share_its_parameters(make):
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    pieces = trace_units(model)
    assert len(pieces) > 5
    torch.testing.assert_close(chained(pieces, x), model(x), rtol=0, atol=0)
    own = {id(p) for p in model.parameters()}
    shared = {id(p) for piece in pieces for p in piece.parameters()}
    assert shared == own  # every parameter, and no copy
    # a call of one of the model's modules on the chain's value is that module itself
    assert any(piece is model.bn1 for piece in pieces) if make is ResNet else pieces[0] is model.patch


def test_a_residual_block_is_never_cut():
    torch.manual_seed(0)
    model = ResNet()
    nodes, cuts = _cut_points(torch.fx.symbolic_trace(model).graph)
    for i in cuts:  # no cut inside a block: past its first layers its input is needed again at the sum
        assert not str(nodes[i].target).startswith(("layer1.0.conv", "layer1.0.bn", "layer2.0.down"))
    pieces = trace_units(model)
    adds = [p for p in pieces if isinstance(p, TracedUnit)
            and any(n.target in (torch.add, operator.add) for n in p.graph.nodes)]
    # each residual sum sits in a piece that also holds its block's convolutions
    assert len(adds) == 4
    for piece in adds:
        assert sum(isinstance(m, nn.Conv2d) for m in piece.modules()) >= 2


def test_split_of_a_traced_resnet_trains_as_a_local_net():
    torch.manual_seed(0)
    model = ResNet()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    with pytest.warns(UserWarning, match=r"trace_units\(model\)\[:-1\]"):  # it still ends in its classifier
        split_with_fc = llkern.split(model, 3, example_input=x[:4])
    model.eval()
    torch.testing.assert_close(chained(split_with_fc.modules, x), model(x))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without the classifier: no warning
        plan = llkern.split(trace_units(model)[:-1], 3, example_input=x[:4])
    assert len(plan.modules) == 3 and all(b > 0 for b in plan.saved_bytes)
    net = llkern.LocalNet(plan.modules, num_classes=10, example_input=x[:2])
    before = model.conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    result = net.local_step(x, y)
    optimizer.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses)
    assert not torch.equal(before, model.conv1.weight)  # the model's own parameters trained


def test_a_module_never_ends_right_after_an_affine_layer_or_its_pass_throughs():
    torch.manual_seed(0)
    named = _units(ViT(), "auto")
    kinds = [type(unit) for _, unit in named]
    # patch conv, then flatten/transpose, the class token's concatenation and the positional add: pass-throughs
    assert kinds[0] is nn.Conv2d and all(issubclass(k, TracedPassThrough) for k in kinds[1:5])
    admissible = _admissible_boundaries(named, allow_affine_end=False)
    assert not any(1 <= b <= 5 for b in admissible)  # nothing between the patch conv and the first encoder layer
    assert _admissible_boundaries(named, allow_affine_end=True) == list(range(len(named) + 1))


def test_untraceable_and_multi_input_models_are_told_to_write_split_units():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.b(x)  # control flow on a value: fx cannot trace it

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, mask):
            return self.a(x) * mask

    with pytest.raises(TypeError, match=r"torch.fx cannot trace.*split_units"):
        llkern.split(Branchy(), 2, by="layers")
    with pytest.raises(TypeError, match=r"torch.fx cannot trace.*2 inputs"):
        llkern.split(TwoInputs(), 1, by="layers")
    with pytest.raises(TypeError, match=r"trace_units: torch\.fx cannot trace Branchy"):
        trace_units(Branchy())
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        trace_units([nn.ReLU()])


def test_a_traced_model_returning_a_tuple_is_named():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), h

    with pytest.raises(TypeError, match="expected every unit to return a tensor"):
        llkern.split(Pair(), 2, example_input=torch.randn(3, 4))


def test_split_of_a_traced_model_by_layers_and_params_needs_no_example():
    plan = llkern.split(ResNet(), 2, by="params")
    assert len(plan.modules) == 2 and sum(plan.params) == sum(p.numel() for p in ResNet().parameters())
    assert len(llkern.split(ResNet(), 4, by="layers").modules) == 4
