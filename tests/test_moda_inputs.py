"""MODA with unusual or bad input: empty batches, unlabelled samples (ignore_index), recordings left by a stray
forward, labels class_masks cannot use, masks of another model, ReLUs extract cannot slice exactly, the
command's option ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import llkern
from llkern import moda
from llkern.cli.moda_demo import main


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.arange(n) % 4


# --- losses --------------------------------------------------------------------------------------------------------

def test_empty_batch_is_refused_not_nan():
    with pytest.raises(ValueError, match="empty batch"):
        moda.moda_terms(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        moda.compactness_loss(torch.zeros(0, 3, 2, 2))
    x, _ = data()
    with pytest.raises(ValueError, match="empty batch"):
        moda.MODALoss(mlp())(x[:0], torch.zeros(0, dtype=torch.long))


def test_unlabelled_samples_are_in_no_pair():
    g = torch.Generator().manual_seed(1)
    layers = [torch.relu(torch.randn(9, 5, generator=g, dtype=torch.float64)),
              torch.relu(torch.randn(9, 3, 4, 4, generator=g, dtype=torch.float64))]
    target = torch.tensor([0, 1, -100, 0, 1, 2, -100, 2, 0])
    keep = target != -100
    got = moda.moda_terms(layers, target)
    alone = moda.moda_terms([t[keep] for t in layers], target[keep])
    for term in ("affinity", "dispersion"):  # the labelled samples' pairs only
        torch.testing.assert_close(got[term], alone[term], rtol=1e-12, atol=1e-12)
    # compactness has no labels: every sample counts
    torch.testing.assert_close(got["compactness"], moda.compactness_loss(layers), rtol=1e-12, atol=1e-12)
    # ignore_index=None: -100 is a class like any other
    assert not torch.allclose(moda.moda_terms(layers, target, ignore_index=None)["dispersion"], alone["dispersion"])
    # MODALoss: the cross-entropy and the terms skip the same samples
    x, _ = data(9)
    model = mlp()
    out = moda.MODALoss(model)(x, target)
    with moda.ActivationCollector(model) as acts:
        logits = model(x[keep])
    want = moda.moda_terms(acts.activations, target[keep])
    torch.testing.assert_close(out.terms["ce"], torch.nn.functional.cross_entropy(logits, target[keep]).detach())
    for term in ("affinity", "dispersion"):
        torch.testing.assert_close(out.terms[term], want[term].detach())


def test_target_and_activations_of_the_wrong_type_are_named():
    with pytest.raises(TypeError, match="target"):
        moda.moda_terms(torch.rand(4, 3), [0, 1, 0, 1])
    with pytest.raises(TypeError, match=r"activations\[0\]"):
        moda.moda_terms([[1.0, 2.0]], torch.tensor([0, 1]))


def local_net(seed: int = 0) -> tuple[llkern.LocalNet, list[nn.Module]]:
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 12), nn.ReLU())]
    net = llkern.LocalNet(blocks, num_classes=4, example_input=torch.zeros(2, 6),
                          losses=moda.moda_local_losses(blocks))
    return net, blocks


def test_local_loss_forgets_a_stray_training_forward():
    x, y = data(16)
    clean, _ = local_net()
    want = clean.local_step(x, y)
    net, _ = local_net()
    net.train()
    net(x[:16])  # training mode with gradients: the ReLU hooks record, nothing consumes the recordings
    got = net.local_step(x, y)  # (once counted these too, and failed: "backward through the graph a second time")
    assert got.losses == pytest.approx(want.losses, rel=1e-6)
    for a, b in zip(got.terms, want.terms, strict=True):
        assert a == pytest.approx(b, rel=1e-6)


def test_extract_while_a_local_loss_holds_recordings():
    x, y = data()
    net, blocks = local_net()
    model = nn.Sequential(*blocks, nn.Linear(12, 4))
    net.train()
    net(x)  # the losses now hold ReLU outputs with their graphs (deepcopy refused them)
    masks = moda.class_masks(model, (x, y), tau=0.5)
    small = moda.extract(model, [1, 2], masks)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in small.modules())
    assert any(m._forward_pre_hooks for m in model.modules())  # the original keeps its loss's hooks


# --- extraction -----------------------------------------------------------------------------------------------------

def test_class_masks_refuses_labels_it_cannot_use():
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="y >= 0"):  # a class -1 was extracted with the last row of the layer
        moda.class_masks(model, (x, y - 1))
    with pytest.raises(TypeError, match="integer labels"):
        moda.class_masks(model, (x, y.float()))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        moda.class_masks(model, (x, y[:, None]))
    with pytest.raises(ValueError, match="no samples"):  # (an empty pair of tensors gave masks of no class)
        moda.class_masks(model, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="batch_size"):
        moda.class_masks(model, (x, y), batch_size=0)
    with pytest.raises(TypeError, match="pair"):
        moda.class_masks(model, [x, y, x])


def test_extract_refuses_masks_of_another_model():
    x, y = data()
    masks = moda.class_masks(mlp(), (x, y))
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match="compute the masks on this model"):
        moda.extract(other, [1], masks)
    with pytest.raises(ValueError, match="compute the masks on this model"):
        moda.weight_masks(other, [1], masks)


def test_extract_takes_numpy_and_tensor_classes_and_names_bad_masks():
    model, (x, y) = mlp(), data()
    masks = moda.class_masks(model, (x, y), tau=0.5)
    want = moda.extract(model, [2], masks)
    for classes in (np.int64(2), torch.tensor(2), torch.tensor([2]), [np.int64(2)]):
        got = moda.extract(model, classes, masks)
        assert got.moda_classes == (2,)
        assert all(torch.equal(a, b) for a, b in zip(got.parameters(), want.parameters(), strict=True))
    with pytest.raises(TypeError, match="ClassMasks"):
        moda.extract(model, [2], "masks")
    with pytest.raises(ValueError, match="unknown class"):
        moda.extract(model, [2.0], masks)


def zeroed(model: nn.Module, masks: moda.ClassMasks, classes: list[int], x: torch.Tensor) -> torch.Tensor:
    units = {name: u.to(x.dtype) for name, u in zip(masks.layers, masks.union(classes), strict=True)}
    handles = [relu.register_forward_hook(
        lambda _m, _i, out, keep=units[name]: out * keep.view(1, -1, *([1] * (out.dim() - 2))))
        for name, relu in moda.relu_modules(model)]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def test_a_relu_whose_mask_extract_cannot_apply_is_refused():
    x, y = data()
    torch.manual_seed(0)
    # a ReLU on the input: its units are the input features, which the module cannot drop
    on_input = nn.Sequential(nn.ReLU(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).double().eval()
    masks = moda.class_masks(on_input, (x.double(), y), tau=0.9)
    assert not masks.union([1])[0].all()
    with pytest.raises(NotImplementedError, match="ReLU '0'"):  # (once gave logits other than the zeroed model's)
        moda.extract(on_input, [1], masks)
    # a ReLU whose mask keeps every unit the layers before it keep is fine, and exact
    torch.manual_seed(0)
    twice = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.ReLU(), nn.Linear(12, 4)).double().eval()
    masks = moda.class_masks(twice, (x.double(), y), tau=0.6)
    small = moda.extract(twice, [1, 3], masks).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x.double()), zeroed(twice, masks, [1, 3], x.double())[:, [1, 3]],
                                   rtol=1e-12, atol=1e-12)


# --- the command ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--tau", "1.5"], ["--tau", "0"], ["--min-keep", "-0.1"], ["--min-keep", "2"],
                                  ["--pairs", "3,3"], ["--pairs", "3,12"]])
def test_command_refuses_out_of_range_options_before_training(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:  # (once trained for minutes, then failed with a traceback)
        main([*argv, "--epochs", "1", "--no-progress"])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err
