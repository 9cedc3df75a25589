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


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 12)
        self.lstm = nn.LSTM(12, 16, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.tanh(self.proj(x))
        out, _ = self.lstm(x)  # a tuple, unpacked
        return self.fc(out[:, -1])


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 4)

    def forward(self, x):
        u, v = self.a(x).chunk(2, -1)
        return self.b(u * torch.sigmoid(v))


@pytest.mark.parametrize("make, x, k", [(LSTMClassifier, torch.randn(3, 7, 6), 2), (Gated, torch.randn(3, 4), 1)])
def test_a_tuple_is_never_handed_on(make, x, k):
    # (the LSTM's (output, state) and chunk's pair were pieces' outputs: split raised "expected every unit to
    # return a tensor ... `return self.lstm(x)[0]`", which the forward already does)
    torch.manual_seed(0)
    model = make().double().eval()
    pieces = trace_units(model)
    h = x.double()
    for piece in pieces:
        h = piece(h)
        assert isinstance(h, torch.Tensor)
    torch.testing.assert_close(h, model(x.double()), rtol=0, atol=0)
    plan = llkern.split(trace_units(make())[:-1], k, example_input=x)
    assert len(plan.modules) == k


class InPlaceNet(nn.Module):
    """torchvision's way: one nn.ReLU(inplace=True) after a BatchNorm and after each residual sum."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(x))
        out += x
        x = self.relu(out)
        x = F.gelu(self.conv3(x))
        x.mul_(2)
        return torch.flatten(x, 1)


def test_no_piece_writes_into_its_input_and_by_time_times_in_place_layers():
    torch.manual_seed(0)
    model = InPlaceNet()
    for i, piece in enumerate(trace_units(model)[1:], start=1):  # an in-place write stays with what it rectifies
        assert not (piece is model.relu or (isinstance(piece, TracedUnit) and piece.graph.find_nodes(
            op="call_module", target="relu") and next(iter(piece.graph.nodes)).next.target == "relu")), i
        assert not (isinstance(piece, TracedUnit)
                    and any(n.op == "call_method" and n.target == "mul_" and n.args[0].op == "placeholder"
                            for n in piece.graph.nodes))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    # (a unit writing into its input raised "a leaf Variable that requires grad is being used in an in-place
    # operation" when timed; an nn.Sequential with nn.ReLU(inplace=True) units did too)
    plan = llkern.split(model, 2, by="time", example_input=x)
    assert len(plan.modules) == 2
    assert len(llkern.split(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                          nn.Conv2d(4, 4, 3), nn.ReLU()), 2, by="time", example_input=x)) == 2
    net = llkern.LocalNet(plan.modules, num_classes=10, example_input=x[:2])
    with torch.no_grad():
        expected = plan.modules[0](x)
    result = net.local_step(x, y, keep_boundaries=True)
    torch.testing.assert_close(result.boundaries[0].tensor, expected)  # not rewritten by module 1


def test_a_forward_reading_the_mode_or_turning_gradients_off_is_refused():
    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):  # fx would fix training=True (or False) into every piece
            return self.b(F.dropout(F.relu(self.a(x)), 0.5, self.training))

    class FrozenStem(FunctionalDropout):
        def forward(self, x):  # fx drops the no_grad: the pieces would train self.a
            with torch.no_grad():
                x = F.relu(self.a(x))
            return self.b(x)

    for model, reason in ((FunctionalDropout(), "reads self.training"), (FunctionalDropout().eval(),
                          "reads self.training"), (FrozenStem(), r"switches gradients.*torch\.no_grad")):
        flags = [m.training for m in model.modules()]
        with pytest.raises(TypeError, match=rf"torch.fx cannot trace {type(model).__name__} .*{reason}"):
            trace_units(model)
        with pytest.raises(TypeError, match=rf"{reason}.*split_units"):
            llkern.split(model, 1, by="layers")
        assert [m.training for m in model.modules()] == flags
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(trace_units(ResNet())) > 5  # nn.Dropout and BatchNorm modules are fine


def test_arguments_with_defaults_are_traced_at_their_defaults():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, mask=None, scale: float = 2.0, *, pool=False):
            x = F.relu(self.a(x))
            if mask is not None:
                x = x * mask
            x = self.b(x) * scale
            return x.mean(0) if pool else x

    torch.manual_seed(0)
    model = Masked()
    pieces = trace_units(model)  # (was: "its forward takes 4 inputs, not one")
    assert pieces[0] is model.a
    x = torch.randn(3, 4)
    torch.testing.assert_close(chained(pieces, x), model(x), rtol=0, atol=0)
    assert all(len([n for n in p.graph.nodes if n.op == "placeholder"]) == 1
               for p in pieces if isinstance(p, TracedUnit))
    assert len(llkern.split(model, 2, example_input=x).modules) == 2


def test_a_piece_ending_on_an_affine_function_does_not_end_a_module():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            x = F.relu(self.a(x))
            x = F.linear(x, self.w)
            x = torch.flatten(x @ self.w, 1)
            return self.c(torch.tanh(x))

    named = _units(Functional(), "auto")
    assert [type(u).__name__ for _, u in named] == ["Linear", "TracedUnit", "TracedAffine", "TracedAffine",
                                                    "TracedPassThrough", "TracedUnit", "Linear"]
    assert _admissible_boundaries(named, allow_affine_end=False) == [0, 2, 6, 7]


def test_buffers_stay_shared_and_non_persistent_ones_out_of_the_state_dict():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0))
            self.register_buffer("mask", torch.ones(4), persistent=False)

        def forward(self, x):
            return F.relu(self.b(F.relu(self.a(x)) * self.scale)) * self.mask

    model = Scaled()
    plan = llkern.split(model, 2, by="layers")
    buffers = [b for module in plan.modules for b in module.buffers()]
    assert any(b is model.scale for b in buffers) and any(b is model.mask for b in buffers)
    net = llkern.LocalNet(plan.modules, num_classes=4)
    keys = list(net.state_dict())
    assert any(key.endswith(".scale") for key in keys) and not any(key.endswith(".mask") for key in keys)
    fresh = llkern.LocalNet(llkern.split(Scaled(), 2, by="layers").modules, num_classes=4)
    fresh(torch.randn(2, 4)), net(torch.randn(2, 4))  # the lazy heads
    fresh.load_state_dict(net.state_dict())


def test_too_many_modules_for_a_traced_model_names_the_skip_connections():
    class TinyUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.mid = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.dec = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            e = F.relu(self.enc(x))
            m = F.relu(self.mid(F.max_pool2d(e, 2)))
            return self.dec(torch.cat([F.interpolate(m, scale_factor=2.0), e], 1))

    with pytest.raises(ValueError, match=r"cannot cut TinyUNet into k=4 .*traced by torch.fx.*skip connection"):
        llkern.split(TinyUNet(), 4, by="layers")


def test_pieces_of_a_sequential_are_named_by_their_modules():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))

        def forward(self, x):
            return torch.flatten(self.features(x), 1)

    names = [name for name, _ in _units(Features(), "auto")]
    assert names == ["features.0", "features.1…features.2", "features.3", "features.4…features.5", "flatten"]


def test_a_forward_of_variadic_arguments_is_refused():
    class Variadic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, *xs):  # (traced, xs is one tuple: the pieces would have taken x[0], the first row)
            return self.b(torch.relu(self.a(xs[0])))

    with pytest.raises(TypeError, match="first positional argument"):
        trace_units(Variadic())


def test_one_split_traces_the_model_once(monkeypatch):
    # one trace per call (fx's tracer run once in training and once in evaluation mode, to refuse a forward reading
    # self.training), and that trace is the one cut into pieces (it was traced once to see that it could be, then
    # again to cut it)
    from llkern.local import planner

    traces, tracer_calls = [], []
    trace, tracer_trace = planner._trace, torch.fx.Tracer.trace

    def counted_trace(model):
        traces.append(model)
        return trace(model)

    def counted_tracer_trace(self, *args, **kwargs):
        tracer_calls.append(args[0] if args else kwargs.get("root"))
        return tracer_trace(self, *args, **kwargs)

    monkeypatch.setattr(planner, "_trace", counted_trace)
    monkeypatch.setattr(torch.fx.Tracer, "trace", counted_tracer_trace)
    torch.manual_seed(0)
    model, x = ResNet(), torch.randn(4, 3, 16, 16)
    for run in (lambda: llkern.split(model, 3, example_input=x), lambda: llkern.split(model, 3, by="layers"),
                lambda: trace_units(model)):
        traces.clear()
        tracer_calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the split of a model ending in its classifier)
            run()
        assert len(traces) == 1 and traces[0] is model
        assert len(tracer_calls) == 2 and all(root is model for root in tracer_calls)  # training, evaluation mode
