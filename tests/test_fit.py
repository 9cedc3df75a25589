"""fit_memory (llkern/local/fit.py): the fewest modules, then the fewest recomputed segments, within a budget.

Checked against what it predicts: the chosen net's measured peak (LocalNet.memory_profile at the full batch, heads
included) is within the budget and close to the prediction made on a small batch; every candidate tried before it
was predicted over the budget; nothing of the model moves.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import llkern
from llkern.nn.recompute import RecomputedSequential


def cnn(classifier: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())]
    layers += [nn.Dropout(0.2), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU()]
    if classifier:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)]
    return nn.Sequential(*layers)


def profile(modules: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[int]:
    net = llkern.LocalNet(modules, num_classes=10, example_input=x[:2])
    return [row.peak_saved_bytes for row in net.memory_profile(x, y)]


@pytest.mark.parametrize("share", [0.6, 0.35, 0.25])
def test_the_fit_holds_at_the_full_batch_and_nothing_smaller_was_skipped(share):
    model = cnn()
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 10, (64,))
    whole = profile([model], x, y)[0]  # end to end: one module
    budget = int(share * whole)
    fit = llkern.fit_memory(model, budget, example_input=x[:8], batch_size=64)
    assert fit.peak_bytes <= budget and fit.peak_bytes == max(fit.module_peaks)
    assert fit.tried[-1] == (fit.k, fit.segments, fit.peak_bytes)
    assert all(peak > budget for _, _, peak in fit.tried[:-1])
    assert fit.tried == sorted(fit.tried, key=lambda t: (t[0], t[1]))  # fewer modules first, then fewer segments
    assert len(fit.modules) == fit.k == len(fit.plan)
    assert all(isinstance(m, RecomputedSequential) for m in fit.modules) == (fit.segments > 1)
    measured = profile(fit.modules, x, y)
    # the heads add little (a pooled linear head); the prediction from a batch of 8 holds at 64
    assert max(measured) <= 1.02 * budget
    assert abs(max(measured) - fit.peak_bytes) <= 0.02 * fit.peak_bytes
    assert "fits" in str(fit) and f"K = {fit.k} module" in str(fit)


def test_a_generous_budget_is_end_to_end_and_an_impossible_one_names_the_least():
    model = cnn()
    x = torch.randn(8, 3, 12, 12)
    fit = llkern.fit_memory(model, 2**40, example_input=x)
    assert (fit.k, fit.segments, fit.batch_size) == (1, 1, 8)
    with pytest.raises(ValueError, match=r"no split of up to 3 modules .* the least was .*\(K = 3, .*larger max_k"):
        llkern.fit_memory(model, 1024, example_input=x, max_k=3)
    most = r"no split of up to 8 modules \(the most this model allows; max_k=100\)"
    with pytest.raises(ValueError, match=most) as error:
        llkern.fit_memory(model, 1024, example_input=x, max_k=100, segments=(1,))
    assert "larger max_k" not in str(error.value)  # the model allows no more modules: a larger max_k cannot help


def test_leaves_the_model_as_it_was():
    model = cnn()
    model[7].eval()  # a mode of the caller's own
    x = torch.randn(8, 3, 12, 12)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    modes = [m.training for m in model.modules()]
    with pytest.raises(ValueError):  # every candidate measured, none fits
        llkern.fit_memory(model, 1, example_input=x, max_k=3, segments=(1, 2))
    fit = llkern.fit_memory(model, 2**40, example_input=x)
    assert fit.k == 1
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes and not model[7].training


def test_split_warnings_come_once():
    model = cnn(classifier=True)
    x = torch.randn(8, 3, 12, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError):
            llkern.fit_memory(model, 1, example_input=x, max_k=3, segments=(1,))
    classifier = [w for w in caught if "classifier" in str(w.message)]
    assert len(classifier) == 1


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"budget_bytes": 0}, ValueError, "budget_bytes"),
    ({"budget_bytes": 1.5}, ValueError, "budget_bytes"),
    ({"example_input": torch.randn(0, 3, 12, 12)}, TypeError, "non-empty batch"),
    ({"example_input": [1.0]}, TypeError, "example_input"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"max_k": 0}, ValueError, "max_k"),
    ({"segments": ()}, ValueError, "segments"),
    ({"segments": (1, 0)}, ValueError, "segments"),
])
def test_bad_arguments(kwargs, error, match):
    arguments = {"budget_bytes": 2**20, "example_input": torch.randn(4, 3, 12, 12), **kwargs}
    with pytest.raises(error, match=match):
        llkern.fit_memory(cnn(), **arguments)


def test_bytes_that_do_not_grow_with_the_batch_are_not_scaled():
    # a pruned weight (weight_orig * mask) is saved by its Linear whatever the batch: scaling the example batch's
    # bytes by 64 / 8 predicted 8x that weight (13x the measured peak here)
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [prune.l1_unstructured(nn.Linear(256, 256), "weight", 0.5), nn.ReLU()]
    model = nn.Sequential(*layers)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    fit = llkern.fit_memory(model, 2**40, example_input=x[:8], batch_size=64)
    assert fit.peak_bytes == llkern.fit_memory(model, 2**40, example_input=x).peak_bytes  # measured at 64
    measured = profile(fit.modules, x, y)[0]
    assert fit.peak_bytes <= measured <= 1.05 * fit.peak_bytes  # LinearHead's own saved input on top


def test_runs_inside_inference_mode():
    model = cnn()
    x = torch.randn(8, 3, 12, 12)
    expected = llkern.fit_memory(model, 2**40, example_input=x)
    with torch.inference_mode():
        fit = llkern.fit_memory(model, 2**40, example_input=x)
    assert fit.peak_bytes == expected.peak_bytes > 0


def test_a_candidate_that_recomputes_nothing_more_is_not_measured_again():
    # the one module of K = 1 starts with an in-place ReLU: it allows 1 segment, so segments 2, 3, 4 are K = 1, 1
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    x = torch.randn(8, 3, 12, 12)
    whole = llkern.fit_memory(model, 2**40, example_input=x).peak_bytes
    fit = llkern.fit_memory(model, whole - 1, example_input=x)
    assert [(k, s) for k, s, _ in fit.tried] == [(1, 1), (2, 1)]


def test_lazy_modules_keep_their_initial_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(),
                          nn.LazyConv2d(8, 3, padding=1), nn.ReLU())
    x = torch.randn(8, 3, 12, 12) + 1
    rng = torch.get_rng_state()
    fit = llkern.fit_memory(model, 2**40, example_input=x)
    assert fit.k == 1 and model[0].weight.shape == (8, 3, 3, 3)
    assert torch.equal(model[1].running_mean, torch.zeros(8)) and torch.equal(model[1].running_var, torch.ones(8))
    assert int(model[1].num_batches_tracked) == 0 and model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_warnings_reach_the_caller_when_an_error_ends_the_search():
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            warnings.warn("the model's own warning", UserWarning, stacklevel=2)
            raise RuntimeError("the model's own error")

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Fails())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="the model's own error"):
            llkern.fit_memory(model, 2**20, example_input=torch.randn(8, 3, 12, 12))
    assert [str(w.message) for w in caught] == ["the model's own warning"]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_recomputed_cuts_are_those_recompute_modules_measures(k):
    # fit_memory cuts segments by the plan's own per-unit measurement instead of measuring every module again; the
    # bytes must be those recompute_modules measures on each module's input (a module's leading pool saves nothing
    # there: its input is detached), and so must the cuts
    from llkern.local.fit import _module_costs
    from llkern.nn.recompute import _cut, _measure, _most_segments

    torch.manual_seed(0)

    def conv_relu(pool: bool = False) -> nn.Sequential:  # a layer group: one unit
        return nn.Sequential(*([nn.MaxPool2d(2)] if pool else []), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())

    # unit 5 is a layer group whose pool comes before its conv: as a module's first unit its pool saves nothing
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), conv_relu(), conv_relu(), conv_relu(),
                          conv_relu(pool=True), conv_relu(), conv_relu(), conv_relu())
    x = torch.randn(8, 3, 24, 24)
    plan = llkern.split(model, k, example_input=x)
    costs, writes = _module_costs(plan, x)
    h = x
    for module, module_costs, module_writes in zip(plan.modules, costs, writes, strict=True):
        assert (module_costs, module_writes) == tuple(_measure(module, h))
        module.eval()
        with torch.no_grad():
            h = module(h)
        module.train()
    if 5 in plan.boundaries:
        assert costs[plan.boundaries.index(5)][0] < plan.unit_costs[5]
    assert k != 3 or plan.boundaries[2] == 5  # (the case this test is for)
    ours = [_cut(m, min(2, _most_segments(m, w)), c, w, True).boundaries
            for m, c, w in zip(plan.modules, costs, writes, strict=True)]
    assert ours == [m.boundaries for m in llkern.recompute_modules(plan.modules, 2, example_input=x)]
    # and what fit_memory returns is cut so (K = 1 here: its plan is the model's)
    fit = llkern.fit_memory(model, 2**40, example_input=x, segments=(2,))
    assert [m.boundaries for m in fit.modules] == [m.boundaries for m in
                                                   llkern.recompute_modules(fit.plan.modules, 2, example_input=x)]


def test_under_autocast_it_fits_what_a_16_bit_step_saves():
    model, x, y = cnn(), torch.randn(16, 3, 12, 12), torch.randint(0, 10, (16,))
    fp32 = llkern.fit_memory(model, 2**40, example_input=x, segments=(2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = llkern.fit_memory(model, 2**40, example_input=x, segments=(2,))
    assert bf16.peak_bytes < 0.6 * fp32.peak_bytes
    net = llkern.LocalNet(bf16.modules, num_classes=10, example_input=x[:2])
    measured = max(row.peak_saved_bytes for row in net.memory_profile(x, y, autocast=torch.bfloat16))
    assert abs(measured - bf16.peak_bytes) <= 0.02 * bf16.peak_bytes


def test_min_k_starts_the_search_there():
    model, x = cnn(), torch.randn(8, 3, 12, 12)
    fit = llkern.fit_memory(model, 2**40, example_input=x, min_k=3)
    assert (fit.k, fit.segments) == (3, 1) and [t[0] for t in fit.tried] == [3]
    with pytest.raises(ValueError, match=r"min_k=40 is more modules than the model allows \(\d+\)"):
        llkern.fit_memory(model, 2**40, example_input=x, min_k=40, max_k=40)
    with pytest.raises(ValueError, match="max_k to be an int >= min_k"):
        llkern.fit_memory(model, 2**40, example_input=x, min_k=3, max_k=2)
    with pytest.raises(ValueError, match="min_k"):
        llkern.fit_memory(model, 2**40, example_input=x, min_k=0)


def test_an_in_place_write_by_the_next_module_does_not_forbid_a_cut():
    # module 1 ends on an Identity whose output module 2's in-place ReLU writes: harmless, since module 1's backward
    # runs before module 2's forward; the fit's flags are those recompute_modules measures per module
    from llkern.local.fit import _module_costs
    from llkern.nn.recompute import _measure

    class ReLUInPlaceThenLinear(nn.Module):  # no inplace attribute: split cuts before it
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.relu_())

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Identity(),
                          ReLUInPlaceThenLinear(), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(6, 4)
    plan = llkern.split(model, 2, by="layers", example_input=x)  # (equal unit counts: a cut right after the Identity)
    assert plan.boundaries == [0, 5, 11] and plan.unit_input_writers[4] == 5
    _, writes = _module_costs(plan, x)
    h = x
    for module, module_writes in zip(plan.modules, writes, strict=True):
        assert module_writes == _measure(module, h)[1]
        with torch.no_grad():
            h = module(h)
    assert writes[0] == [False] * 5


def test_accept_passes_over_candidates_it_refuses():
    model, x = cnn(), torch.randn(8, 3, 12, 12)
    seen: list[tuple[int, bool]] = []

    def accept(modules: list[nn.Module]) -> bool:
        seen.append((len(modules), torch.is_inference_mode_enabled()))
        return len(modules) >= 3  # as if the heads of fewer modules did not fit

    with torch.inference_mode():
        fit = llkern.fit_memory(model, 2**40, example_input=x, segments=(1, 2), accept=accept)
    assert (fit.k, fit.segments) == (3, 1) and fit.rejected == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert seen == [(1, False), (1, False), (2, False), (2, False), (3, False)]  # (outside inference mode)
    assert "fits, not accepted" in str(fit) and str(fit).rstrip().endswith("fits")
    with pytest.raises(ValueError, match=r"no accepted split .* \(4 that did were not accepted: K = 1 with 1, "):
        llkern.fit_memory(model, 2**40, example_input=x, segments=(1, 2), max_k=2, accept=lambda modules: False)


def converted(module: nn.Module) -> None:
    from llkern.nn.activation_memory import convert

    convert(module, relu_masks=True, bn_relu_recompute=True)


@pytest.mark.parametrize("share", [0.3, 0.25, 0.15])  # K = 1 with 4 segments, K = 2 with 2, K = 6 with 1
def test_transform_fits_the_modules_as_converted(share):
    # 1-bit ReLU masks and BatchNorm+ReLU recomputed save a fraction of the plain layers' bytes: fitted with the
    # transform, fewer modules or segments fit, the prediction holds for the converted net, and the modules are cut
    # as split then convert then recompute_modules cut them (how llkern train builds them)
    from llkern.nn.activation_memory import BatchNormReLU, BitMaskReLU

    model = cnn()
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 10, (64,))
    types = [type(m) for m in model.modules()]
    budget = int(share * profile([model], x, y)[0])
    fit = llkern.fit_memory(model, budget, example_input=x[:8], batch_size=64, transform=converted)
    assert [type(m) for m in model.modules()] == types  # the model itself is not converted
    parameters = {id(p) for p in model.parameters()}
    assert all(id(p) in parameters for m in fit.modules for p in m.parameters())  # what trains is the model's
    buffers = {id(b) for b in model.buffers()}
    assert all(id(b) in buffers for m in fit.modules for b in m.buffers())  # and its statistics
    units = [u for m in fit.modules for u in m.modules()]
    assert any(isinstance(u, BatchNormReLU) for u in units) and any(isinstance(u, BitMaskReLU) for u in units)
    measured = profile(fit.modules, x, y)
    assert max(measured) <= 1.02 * budget and abs(max(measured) - fit.peak_bytes) <= 0.02 * fit.peak_bytes
    try:  # the plain layers need a later candidate, or do not fit at all
        plain = llkern.fit_memory(model, budget, example_input=x[:8], batch_size=64)
        assert (plain.k, plain.segments) > (fit.k, fit.segments)
    except ValueError:
        pass
    rebuilt = [m for m in llkern.split(model, fit.k, example_input=x[:8]).modules]
    if fit.segments > 1:
        for m in rebuilt:
            converted(m)  # (on the model's own units: this test's model is converted from here on)
        rebuilt = llkern.recompute_modules(rebuilt, fit.segments, example_input=x[:8])
        assert [m.boundaries for m in rebuilt] == [m.boundaries for m in fit.modules]
    assert fit.plan.boundaries == llkern.split(cnn(), fit.k, example_input=x[:8]).boundaries


def test_transform_may_return_a_new_module_and_is_checked():
    model, x = cnn(), torch.randn(8, 3, 12, 12)
    calls: list[int] = []

    def wrap(module: nn.Module) -> nn.Module:
        calls.append(len(module))
        return nn.Sequential(*module)  # a new Sequential of the same (copied) units

    fit = llkern.fit_memory(model, 2**40, example_input=x, transform=wrap)
    assert calls == [len(model)] and (fit.k, fit.segments) == (1, 1)
    assert all(p is q for p, q in zip(fit.modules[0].parameters(), model.parameters(), strict=True))
    with pytest.raises(TypeError, match=r"expected transform to return an nn.Module .* got int for module 0"):
        llkern.fit_memory(model, 2**40, example_input=x, transform=lambda m: 3)
    with pytest.raises(TypeError, match="transform to be callable"):
        llkern.fit_memory(model, 2**40, example_input=x, transform="convert")

    class Wrapper(nn.Module):  # not a Sequential: it cannot be cut into segments
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.inner(h)

    assert llkern.fit_memory(model, 2**40, example_input=x, transform=Wrapper, segments=(1,)).k == 1
    rng = torch.get_rng_state()

    def grow(module: nn.Module) -> None:
        module.append(nn.Conv2d(8, 8, 1))  # a new layer: its initialisation draws from the RNG

    llkern.fit_memory(model, 2**40, example_input=x, transform=grow)
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(TypeError, match=r"transform returned module 0 as a Wrapper, .* segments=\(1,\)"):
        llkern.fit_memory(model, 2**40, example_input=x, transform=Wrapper)


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "prune"])
def test_transform_copies_weights_computed_by_hooks(wrap):
    # weight_norm, spectral_norm and pruning keep the weight as a plain attribute computed from parameters: deepcopy
    # refuses such a tensor, so the copies share it (the copy's pre-hook computes its own in its forward)
    from torch.nn.utils import prune, spectral_norm, weight_norm

    def wrapped() -> nn.Linear:
        layer = nn.Linear(32, 32)
        if wrap == "prune":
            return prune.l1_unstructured(layer, "weight", 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (torch.nn.utils.weight_norm is deprecated)
            return weight_norm(layer) if wrap == "weight_norm" else spectral_norm(layer)

    torch.manual_seed(0)
    model = nn.Sequential(wrapped(), nn.ReLU(), wrapped(), nn.ReLU())
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    fit = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(1, 2), transform=converted)
    assert fit.k == 2 and all(type(m[1]).__name__ == "BitMaskReLU" for m in fit.modules)
    assert type(model[1]) is nn.ReLU
    net = llkern.LocalNet(fit.modules, num_classes=10, example_input=x[:2])
    rows = net.memory_profile(x, y)
    assert all(row.peak_saved_bytes >= peak for row, peak in zip(rows, fit.module_peaks, strict=True))
    named = dict(model.named_parameters())
    assert all(named[name].grad is not None for name, _ in fit.modules[0].named_parameters())  # the model's trained


def test_autocast_measures_16_bit_steps_and_cuts_as_in_fp32():
    # autocast=: what a bf16 step saves is fitted, while the modules are cut by fp32 bytes, as split and
    # recompute_modules cut outside autocast. BatchNorm keeps fp32 statistics, so digits-resnet's cuts under autocast
    # differ from fp32's (checked below): the equalities could not hold if autocast reached the cuts.
    from llkern.cli.train import _body, _model
    from llkern.data import load_digits

    x, y = (t[:32] for t in load_digits(seed=0)[:2])
    model, _ = _body(_model("digits-resnet", x[:8]))
    fp32 = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(2,))
    bf16 = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(2,), autocast=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(2,))
    assert inside.plan.boundaries != fp32.plan.boundaries
    assert bf16.peak_bytes < 0.75 * fp32.peak_bytes  # (cut for fp32: module 1 saves over half the whole in bf16)
    assert bf16.plan.boundaries == fp32.plan.boundaries
    assert [m.boundaries for m in bf16.modules] == [m.boundaries for m in fp32.modules]
    net = llkern.LocalNet(bf16.modules, num_classes=10, example_input=x[:2])
    measured = max(row.peak_saved_bytes for row in net.memory_profile(x, y, autocast=torch.bfloat16))
    assert abs(measured - bf16.peak_bytes) <= 0.02 * bf16.peak_bytes
    fp16 = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(2,), autocast=torch.float16)
    assert fp16.peak_bytes == bf16.peak_bytes  # (two bytes an element either way)
    with pytest.raises(ValueError, match=r"autocast to be None, torch\.bfloat16 or torch\.float16"):
        llkern.fit_memory(model, 2**40, example_input=x, autocast=torch.float64)
    with pytest.raises(ValueError, match=r"fit with fewer saved bytes: transform=.*or autocast=torch\.bfloat16"):
        llkern.fit_memory(model, 1024, example_input=x, max_k=2)
    with pytest.raises(ValueError, match=r"more segments$"):
        llkern.fit_memory(model, 1024, example_input=x, max_k=2, transform=converted, autocast=torch.bfloat16,
                          saved_dtype=torch.bfloat16)
    from llkern.activation_memory import saved_tensors_in

    bf16_context = torch.autocast("cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"\(convert from llkern\.activation_memory\)$"), bf16_context, \
            saved_tensors_in(torch.bfloat16):
        llkern.fit_memory(model, 1024, example_input=x, max_k=2)  # (already under autocast and saved_tensors_in)
    with pytest.raises(ValueError, match=r"saved_dtype=torch\.bfloat16 \(approximate gradients\)$"), bf16_context:
        llkern.fit_memory(model, 1024, example_input=x, max_k=2, transform=converted)
    with pytest.raises(ValueError, match=r"saved_dtype to be None, torch\.bfloat16 or torch\.float16"):
        llkern.fit_memory(model, 2**40, example_input=x, saved_dtype=torch.float32)


@pytest.mark.parametrize("how", ["inside", "saved_dtype"])
def test_it_fits_the_16_bit_copies_saved_tensors_in_stores(how):
    # inside saved_tensors_in, fit_memory's meter hands on to it and counts the copies it stores (everything under
    # it, as under autocast); saved_dtype= measures the candidates so and cuts them by fp32 bytes
    from llkern.activation_memory import saved_tensors_in

    from llkern.cli.train import _body, _model
    from llkern.data import load_digits

    x, y = (t[:32] for t in load_digits(seed=0)[:2])
    model, _ = _body(_model("digits-resnet", x[:8]))
    fp32 = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(2,))
    if how == "inside":
        with saved_tensors_in(torch.bfloat16):
            low = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(2,))
    else:
        low = llkern.fit_memory(model, 2**40, example_input=x, min_k=2, segments=(2,), saved_dtype=torch.bfloat16)
        assert [m.boundaries for m in low.modules] == [m.boundaries for m in fp32.modules]
    assert low.peak_bytes < 0.6 * fp32.peak_bytes
    net = llkern.LocalNet(low.modules, num_classes=10, example_input=x[:2])
    with saved_tensors_in(torch.bfloat16):
        measured = max(row.peak_saved_bytes for row in net.memory_profile(x, y))
    assert abs(measured - low.peak_bytes) <= 0.03 * low.peak_bytes
