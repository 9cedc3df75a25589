"""MODA: the three activation losses against explicit loops, the ReLU collector, the losses in end-to-end
and local training, module extraction (exact against zeroed units; Sequential and residual networks),
errors, and the demo command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llkern
from llkern import moda
from llkern.cli.moda_demo import main
from llkern.cli.options import UsageError
from llkern.moda import activations as moda_activations
from llkern.models import BasicBlock, PreActBlock
from llkern.models.moda_cnn import ResidualReLUBlock, digits_cnn, digits_resnet_moda

from .test_cifar import write_binary

EPS = 1e-8


def reference_terms(layers: list[torch.Tensor], target: torch.Tensor) -> dict[str, float]:
    """The formulas of design.md, one sample pair at a time, in Python floats."""
    aff, dis, com = [], [], []
    same_pairs = diff_pairs = 0
    for t in layers:
        b = t.shape[0]
        a = []
        for i in range(b):
            if t.dim() == 2:
                a.append([abs(float(v)) for v in t[i]])
            else:
                a.append([float(t[i, c].abs().sum()) / t[i, c].numel() for c in range(t.shape[1])])
        norms = [max(math.sqrt(sum(v * v for v in row)), EPS) for row in a]
        s_same = s_diff = 0.0
        same_pairs = diff_pairs = 0
        for i in range(b):
            for j in range(i + 1, b):
                s = sum(u * v for u, v in zip(a[i], a[j], strict=True)) / (norms[i] * norms[j])
                if int(target[i]) == int(target[j]):
                    s_same, same_pairs = s_same + s, same_pairs + 1
                else:
                    s_diff, diff_pairs = s_diff + s, diff_pairs + 1
        aff.append(s_same / same_pairs if same_pairs else 0.0)
        dis.append(s_diff / diff_pairs if diff_pairs else 0.0)
        com.append(sum(sum(row) for row in a) / (b * len(a[0])))
    return {"affinity": 1.0 - sum(aff) / len(aff) if same_pairs else 0.0,
            "dispersion": sum(dis) / len(dis) if diff_pairs else 0.0,
            "compactness": sum(com) / len(com)}


def layers_for(b: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.relu(torch.randn(b, 5, 3, 4, generator=g, dtype=torch.float64))
    linear = torch.relu(torch.randn(b, 7, generator=g, dtype=torch.float64))
    # non-contiguous: a transposed view and a strided slice
    odd = torch.relu(torch.randn(6, b, generator=g, dtype=torch.float64)).T
    strided = torch.relu(torch.randn(b, 3, 10, 10, generator=g, dtype=torch.float64))[:, :, ::3, 1::2]
    return [conv, linear, odd, strided]


@pytest.mark.parametrize("b", [1, 2, 7, 33])
@pytest.mark.parametrize("labels", ["mixed", "one_class", "all_distinct"])
def test_terms_match_explicit_loops(b, labels):
    layers = layers_for(b, b)
    assert not layers[3].is_contiguous() and (b == 1 or not layers[2].is_contiguous())
    target = {"mixed": torch.arange(b) % 3, "one_class": torch.zeros(b, dtype=torch.long),
              "all_distinct": torch.arange(b)}[labels]
    got = moda.moda_terms(layers, target, eps=EPS)
    want = reference_terms(layers, target)
    for name in want:
        assert torch.isfinite(got[name])
        assert got[name].item() == pytest.approx(want[name], rel=1e-12, abs=1e-12), name
    assert moda.affinity_loss(layers, target).item() == pytest.approx(want["affinity"], rel=1e-12, abs=1e-12)
    assert moda.dispersion_loss(layers, target).item() == pytest.approx(want["dispersion"], rel=1e-12, abs=1e-12)
    assert moda.compactness_loss(layers).item() == pytest.approx(want["compactness"], rel=1e-12)
    if labels == "one_class" or b == 1:
        assert got["dispersion"].item() == 0.0
    if labels == "all_distinct":
        assert got["affinity"].item() == 0.0


def test_single_layer_tensor_and_float32():
    t = torch.relu(torch.randn(9, 4, 5, 5)).double()
    y = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2, 2])
    want = reference_terms([t], y)
    got = moda.moda_terms(t, y)  # one tensor is one layer
    assert got["dispersion"].item() == pytest.approx(want["dispersion"], rel=1e-12)
    got32 = moda.moda_terms(t.float(), y)
    assert got32["affinity"].dtype == torch.float32
    assert got32["affinity"].item() == pytest.approx(want["affinity"], rel=1e-5)
    half = moda.moda_terms(t.bfloat16(), y)  # widened to float32
    assert half["compactness"].dtype == torch.float32


@pytest.mark.parametrize("term", ["affinity", "dispersion", "compactness"])
def test_gradcheck(term):
    g = torch.Generator().manual_seed(1)
    # positive activations: away from |·|'s kink at 0
    conv = (torch.rand(7, 3, 2, 2, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    linear = (torch.rand(7, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2])
    assert torch.autograd.gradcheck(lambda c, lin: moda.moda_terms([c, lin.T.contiguous().T], y)[term],
                                    (conv, linear))


def test_batches_without_pairs_give_zero_and_finite_gradients():
    t = torch.relu(torch.randn(1, 6, dtype=torch.float64)).requires_grad_()
    terms = moda.moda_terms([t], torch.tensor([3]))
    assert terms["affinity"].item() == 0.0 and terms["dispersion"].item() == 0.0
    (terms["affinity"] + terms["dispersion"]).backward()
    assert torch.equal(t.grad, torch.zeros_like(t))
    # a dead sample (all activations 0) stays finite too
    dead = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    out = moda.moda_terms([dead], torch.tensor([0, 0, 1, 1]))
    sum(out.values()).backward()
    assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(dead.grad).all()


def test_term_errors_name_the_argument():
    with pytest.raises(ValueError, match="target"):
        moda.moda_terms([torch.rand(4, 3)], torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="activations"):
        moda.moda_terms([torch.rand(4, 3), torch.rand(5, 3)], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one layer"):
        moda.moda_terms([], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="compactness"):
        moda.MODALoss(digits_cnn(4), compactness=-1.0)


# --- the collector and the losses in training -------------------------------------------------------------


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(moda.record(F.relu(h - 0.1)))


def test_collector_inplace_relu_functional_record_and_hook_removal():
    torch.manual_seed(0)
    net = Functional()
    x = torch.randn(5, 4)
    with moda.ActivationCollector(net) as collected:
        net(x)
    h = torch.relu(net.fc1(x))
    assert collected.names == ["act", "record"]
    torch.testing.assert_close(collected.activations[0], h)  # the inplace ReLU's output
    torch.testing.assert_close(collected.activations[1], F.relu(h - 0.1))
    assert not net.act._forward_hooks and not moda_activations._ACTIVE
    moda.record(x)  # no active collector: nothing happens


def test_moda_loss_is_ce_plus_weighted_terms():
    torch.manual_seed(0)
    model = digits_cnn(4).double()
    x, y = torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.arange(12) % 4
    criterion = moda.MODALoss(model, affinity=0.5, dispersion=2.0, compactness=0.3)
    out = criterion(x, y)
    with moda.ActivationCollector(model) as collected:
        logits = model(x)
    assert len(collected.activations) == 5
    terms = moda.moda_terms(collected.activations, y)
    want = F.cross_entropy(logits, y) + 0.5 * terms["affinity"] + 2.0 * terms["dispersion"] + \
        0.3 * terms["compactness"]
    torch.testing.assert_close(out.loss, want)
    assert set(out.terms) == {"ce", "affinity", "dispersion", "compactness"}
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_model_without_relu_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(ValueError, match="model"):
        moda.MODALoss(model)(x, y)
    with pytest.raises(ValueError, match=r"no nn\.ReLU"):
        moda.class_masks(model, (x, y))
    with pytest.raises(ValueError, match="block"):
        moda.MODALocalLoss(nn.Linear(3, 3))


def test_local_loss_in_localnet(tmp_path):
    torch.manual_seed(0)
    model = digits_cnn(4)
    blocks = [model[:6], model[6:13], model[13:17]]
    net = llkern.LocalNet(blocks, num_classes=10, example_input=torch.randn(2, 1, 8, 8),
                          losses=moda.moda_local_losses(blocks))
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 5
    # module 0's loss by hand, on the same parameters (train mode: batch statistics, as in the step)
    with moda.ActivationCollector(blocks[0]) as collected:
        out = blocks[0](x)
    terms = moda.moda_terms(collected.activations, y)
    ce = F.cross_entropy(net.heads[0](out), y)
    result = net.local_step(x, y)
    assert set(result.terms[0]) == {"ce", "affinity", "dispersion", "compactness"}
    for name, value in terms.items():
        assert result.terms[0][name] == pytest.approx(value.item(), rel=1e-5)
    want = ce + terms["affinity"] + terms["dispersion"] + 0.3 * terms["compactness"]
    assert result.losses[0] == pytest.approx(want.item(), rel=1e-5)
    assert all(loss._recorded == [] for loss in net.losses)
    # evaluation records nothing; a loss called without recorded outputs says why
    net.eval()
    with torch.no_grad():
        net(x)
    assert all(loss._recorded == [] for loss in net.losses)
    ctx = llkern.nn.losses.LocalContext(0, 3, x, out, y, net.heads[0])
    with pytest.raises(RuntimeError, match="no ReLU output"):
        net.losses[0](ctx)
    # saved and loaded, the hooks go with the copy and record into the copy's losses
    net.train()
    net.save(tmp_path / "net.pt")
    loaded = llkern.LocalNet.load(tmp_path / "net.pt")
    assert set(loaded.local_step(x, y).terms[2]) == {"ce", "affinity", "dispersion", "compactness"}
    assert all(loss._recorded == [] for loss in net.losses)


# --- extraction --------------------------------------------------------------------------------------------


def trained_like(width: int = 6, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 digits_cnn with random BN shifts (so that many units are dead) and random data."""
    torch.manual_seed(seed)
    model = digits_cnn(width).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.normal_(-0.3, 1.0)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    return model.eval(), x, torch.arange(60) % 5


def zeroed_logits(model: nn.Module, masks: moda.ClassMasks, classes: list[int], x: torch.Tensor) -> torch.Tensor:
    """The full model's logits with the units outside the union of the classes' masks set to 0."""
    units = dict(zip(masks.layers, masks.union(classes), strict=True))
    handles = []
    for name, relu in moda.relu_modules(model):
        keep = units[name].to(x.dtype)
        handles.append(relu.register_forward_hook(
            lambda _m, _i, out, keep=keep: out * keep.view(1, -1, *([1] * (out.dim() - 2)))))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("classes", [[2], [3, 1], [0, 1, 2, 3, 4]])
def test_extracted_module_equals_full_model_with_dropped_units_zeroed(classes):
    model, x, y = trained_like()
    masks = moda.class_masks(model, (x, y), tau=0.6, batch_size=17)
    small = moda.extract(model, classes, masks)
    assert small.moda_classes == tuple(classes) and small is not model
    with torch.no_grad():
        got = small.eval()(x)
    want = zeroed_logits(model, masks, classes, x)
    assert got.shape == (60, len(classes))
    torch.testing.assert_close(got, want[:, classes], rtol=1e-12, atol=1e-12)
    everything = moda.extract(model, classes, masks, keep_all_outputs=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(everything(x), want, rtol=1e-12, atol=1e-12)
    # physically smaller: the counts of the module and of the kept entries agree
    kept = moda.weight_masks(model, classes, masks)
    assert moda.count_weights(small) == sum(int(m.sum()) for m in kept.values()) < moda.count_weights(model)
    assert set(kept) == {n for n, _ in model.named_parameters()}


def test_masks_threshold_and_min_keep():
    model, x, y = trained_like()
    masks = moda.class_masks(model, (x, y), tau=0.9, min_keep=0.2)
    assert masks.classes == [0, 1, 2, 3, 4] and masks.counts == {c: 12 for c in range(5)}
    for c in masks.classes:
        for layer, mask, freq in zip(masks.layers, masks.masks[c], masks.frequency[c], strict=True):
            keep = max(1, math.ceil(0.2 * mask.numel()))
            assert int(mask.sum()) >= keep, layer
            if int((freq >= 0.9).sum()) >= keep:
                assert torch.equal(mask, freq >= 0.9)
            else:  # the most frequently active units
                assert freq[mask].min() >= freq[~mask].max()
    # the same masks from an iterable of batches
    again = moda.class_masks(model, list(zip(x.split(7), y.split(7), strict=True)), tau=0.9, min_keep=0.2)
    assert all(torch.equal(a, b) for c in masks.classes
               for a, b in zip(masks.masks[c], again.masks[c], strict=True))


def test_extraction_errors_name_the_argument():
    model, x, y = trained_like()
    masks = moda.class_masks(model, (x, y))
    for tau in (0.0, 1.5, -1, True):
        with pytest.raises(ValueError, match="tau"):
            moda.class_masks(model, (x, y), tau=tau)
    with pytest.raises(ValueError, match="min_keep"):
        moda.class_masks(model, (x, y), min_keep=2.0)
    with pytest.raises(ValueError, match="unknown class 7"):
        moda.extract(model, [1, 7], masks)
    with pytest.raises(ValueError, match="empty"):
        moda.extract(model, [], masks)
    with pytest.raises(ValueError, match="distinct"):
        moda.extract(model, [1, 1], masks)
    with pytest.raises(TypeError, match="data"):
        moda.class_masks(model, 3)
    resnet = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), PreActBlock(4, 4), nn.ReLU(), nn.Flatten(),
                           nn.Linear(256, 5))
    res_masks = moda.class_masks(resnet, (x.float(), y))
    with pytest.raises(NotImplementedError, match=r"PreActBlock.*residual"):
        moda.extract(resnet, [0], res_masks)
    # a ReLU after a Flatten has flattened units, not the conv's channels
    flat_relu = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.ReLU(), nn.Linear(108, 5)).double()
    flat_masks = moda.class_masks(flat_relu, (x, y))
    with pytest.raises(NotImplementedError, match="Flatten"):
        moda.extract(flat_relu, [0], flat_masks)
    # a Flatten with the ReLU after the next Linear is fine (the conv has no ReLU of its own: all its channels stay)
    flat_linear = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(32, 6),
                                nn.ReLU(), nn.Linear(6, 5)).double()
    small = moda.extract(flat_linear, [0, 2], moda.class_masks(flat_linear, (x, y)))
    assert small[-1].out_features == 2 and small[2].out_channels == 2


def test_extracted_module_does_not_carry_a_local_loss_hooks():
    model, x, y = trained_like()
    loss = moda.MODALocalLoss(model)  # records the ReLU outputs of every forward of model
    masks = moda.class_masks(model, (x, y))
    small = moda.extract(model, [0, 1], masks)
    assert all(not m._forward_hooks for m in small.modules())
    assert any(m._forward_hooks for m in model.modules())  # the original keeps them
    loss.remove()


def resnet_trained_like(width: int = 6, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 digits_resnet_moda with random BN shifts (many dead units) and random data."""
    torch.manual_seed(seed)
    model = digits_resnet_moda(width).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(-0.3, 1.0)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    return model.eval(), x, torch.arange(60) % 5


@pytest.mark.parametrize("classes", [[2], [3, 1], [0, 1, 2, 3, 4]])
def test_residual_module_equals_full_model_with_dropped_units_zeroed(classes):
    model, x, y = resnet_trained_like()
    masks = moda.class_masks(model, (x, y), tau=0.6, batch_size=17)
    assert "3.relu" in masks.layers and "4.branch.2" in masks.layers  # the ReLUs after additions and inside
    small = moda.extract(model, classes, masks).eval()
    x_new = torch.randn(25, 1, 8, 8, dtype=torch.float64)  # random inputs, not the ones of the masks
    want = zeroed_logits(model, masks, classes, torch.cat([x, x_new]))
    with torch.no_grad():
        got = small(torch.cat([x, x_new]))
    assert got.shape == (85, len(classes))
    torch.testing.assert_close(got, want[:, classes], rtol=1e-12, atol=1e-12)
    everything = moda.extract(model, classes, masks, keep_all_outputs=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(everything(x_new), want[60:], rtol=1e-12, atol=1e-12)
    # identity shortcuts: additions on the intersection of the input's and the output's kept units
    units = {name: u.nonzero().flatten() for name, u in zip(masks.layers, masks.union(classes), strict=True)}
    partial = 0
    for block, inp in (("3", "2"), ("5", "4.relu")):
        sc = small.get_submodule(f"{block}.shortcut")
        out_units, in_units = units[f"{block}.relu"], units[inp]
        if torch.equal(out_units, in_units):
            assert isinstance(sc, nn.Identity)
            continue
        assert isinstance(sc, moda.ChannelMap) and sc.out_channels == len(out_units)
        torch.testing.assert_close(in_units[sc.src], out_units[sc.dst])  # the same units on both sides
        assert len(sc.src) == int(torch.isin(out_units, in_units).sum())
        partial += len(sc.src) < max(len(out_units), len(in_units))
    assert partial > 0  # the intersection is a strict one somewhere
    # a projection shortcut reads the input's units and writes the output's
    proj = small.get_submodule("4.shortcut.0")
    assert (proj.in_channels, proj.out_channels) == (len(units["3.relu"]), len(units["4.relu"]))
    # physically smaller, and the kept entries are the module's parameters, name by name
    kept = moda.weight_masks(model, classes, masks)
    full, sliced = dict(model.named_parameters()), dict(small.named_parameters())
    assert set(kept) == set(full) == set(sliced)
    assert moda.count_weights(small) == sum(int(m.sum()) for m in kept.values()) < moda.count_weights(model)
    for name, mask in kept.items():
        assert int(mask.sum()) == sliced[name].numel(), name
        if not name.startswith("8."):  # the classifier's rows are in the order of classes
            assert torch.equal(full[name][mask], sliced[name].detach().flatten()), name


def test_residual_extraction_refuses_unknown_blocks():
    _, x, y = resnet_trained_like(4)

    class TwoPaths(nn.Module):  # a residual-looking block extract does not know
        def __init__(self) -> None:
            super().__init__()
            self.shortcut, self.conv, self.relu = nn.Identity(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x) + self.shortcut(x))

    for block, name in ((TwoPaths(), "TwoPaths"), (BasicBlock(4, 4), "BasicBlock")):
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), block, nn.Flatten(), nn.Linear(256, 5))
        net_masks = moda.class_masks(net, (x.float(), y))
        with pytest.raises(NotImplementedError, match=rf"{name}.*'2'.*residual"):
            moda.extract(net, [0], net_masks)
        with pytest.raises(NotImplementedError, match=name):
            moda.weight_masks(net, [0], net_masks)
    ends_in_relu = ResidualReLUBlock(4, 4)
    ends_in_relu.branch.append(nn.ReLU())
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), ends_in_relu, nn.Flatten(), nn.Linear(256, 5))
    with pytest.raises(NotImplementedError, match=r"branch of residual block '2' ends in a ReLU"):
        moda.extract(net, [0], moda.class_masks(net, (x.float(), y)))
    ends_in_block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), ResidualReLUBlock(4, 4))
    with pytest.raises(ValueError, match="after its last residual block"):
        moda.extract(ends_in_block, [0], moda.class_masks(ends_in_block, (x.float(), y)))
    with pytest.raises(ValueError, match="compute the masks on this model"):
        moda.extract(digits_resnet_moda(4).double(), [0], moda.class_masks(trained_like(4)[0], (x, y)))
    with pytest.raises(ValueError, match="stride"):
        ResidualReLUBlock(4, 4, stride=0)


def test_report_sizes_accuracies_overlap():
    model, x, y = trained_like()
    masks = moda.class_masks(model, (x, y), tau=0.6)
    report = moda.modularity_report(model, masks, [0, 1, (1, 3)], x, y)
    assert [r.classes for r in report.rows] == [(0,), (1,), (1, 3)]
    assert report.rows[0].module_restricted == report.rows[0].full_restricted == 1.0  # one class: trivial
    pair = report.rows[2]
    assert pair.samples == 24 and pair.weights == moda.count_weights(moda.extract(model, [1, 3], masks))
    wm = [moda.weight_masks(model, c, masks) for c in masks.classes]
    inter = sum(int((wm[0][k] & wm[1][k]).sum()) for k in wm[0])
    union = sum(int((wm[0][k] | wm[1][k]).sum()) for k in wm[0])
    assert 0.0 < report.overlap_jaccard < 1.0 and 0.0 < inter / union < 1.0
    assert report.composed_accuracy is not None and "| 1,3 |" in report.to_markdown()


# --- the command -----------------------------------------------------------------------------------------


def test_demo_short_run(tmp_path):
    out = tmp_path / "moda.md"
    result = main(["--epochs", "2", "--width", "4", "--pairs", "3,8", "--no-progress", "--out", str(out)])
    assert [r.classes for r in result.report.rows] == [(c,) for c in range(10)] + [(3, 8)]
    assert result.accuracy_plain > 0.5 and result.accuracy_moda > 0.3  # chance: 0.1
    text = out.read_text()
    assert "2.7 %" in text and "91.86 %" in text and "| 3,8 |" in text


def test_demo_resnet_short_run():
    result = main(["--model", "resnet", "--epochs", "1", "--width", "4", "--pairs", "3,8", "--no-progress"])
    assert result.model == "digits_resnet_moda(width=4)"
    assert [r.classes for r in result.report.rows] == [(c,) for c in range(10)] + [(3, 8)]
    assert all(0.0 < r.fraction <= 1.0 for r in result.report.rows)
    with pytest.raises(SystemExit):
        main(["--model", "mlp", "--no-progress"])


def test_demo_cifar_path_on_a_tiny_file(tmp_path):
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
        batches[name] = (rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), labels)
    write_binary(tmp_path / "cifar-10-batches-bin", batches)
    result = main(["--data", "cifar10", "--data-root", str(tmp_path), "--epochs", "1", "--width", "4",
                   "--pairs", "0,2", "--no-progress"])
    assert result.model == "vgg16(width=4)" and result.data == "cifar10"
    assert [r.classes for r in result.report.rows] == [(0,), (1,), (2,), (0, 2)]
    with pytest.raises(UsageError, match="data-root"):  # a usage error of the command (exit 2), not a crash
        main(["--data", "cifar10", "--no-progress"])


def test_integer_activations_are_refused_by_name():
    # (they once reached vector_norm's dtype error)
    from llkern.moda import moda_terms

    with pytest.raises(TypeError, match="floating-point activations"):
        moda_terms(torch.ones(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
