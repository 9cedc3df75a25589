"""MODA: the sizes, accuracies and overlap of extracted modules.

See llkern/moda/__init__.py for the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llkern.moda.extraction import ClassMasks, _check_classes, _jaccard, count_weights, extract, weight_masks


@dataclass
class ModuleStats:
    """One module's figures. Accuracies are on the test samples of its classes; ``*_restricted``: the
    prediction is the argmax over the module's classes only (the module's own logits; the full model's
    logits of those classes), ``*_all``: over all classes (the module then keeps every output row)."""

    classes: tuple[int, ...]
    weights: int
    fraction: float
    samples: int
    module_restricted: float
    full_restricted: float
    module_all: float
    full_all: float


@dataclass
class MODAReport:
    """What :func:`modularity_report` measured; ``to_markdown()`` renders it.

    Overlap between the single-class modules, over all pairs of them: ``overlap_jaccard`` is the mean
    Jaccard index ``|A∩B| / |A∪B|`` of the kept weight entries, ``overlap_shared`` the mean ``|A∩B|``
    as a fraction of the full model's weights.
    """

    full_weights: int
    full_accuracy: float
    composed_accuracy: float | None
    rows: list[ModuleStats]
    overlap_jaccard: float | None
    overlap_shared: float | None
    tau: float

    @property
    def singles(self) -> list[ModuleStats]:
        return [r for r in self.rows if len(r.classes) == 1]

    def to_markdown(self) -> str:
        lines = ["| classes | weights | % of full | test samples | module acc. (among its classes) | "
                 "full acc. (among its classes) | module acc. (all classes) | full acc. (all classes) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {','.join(map(str, r.classes))} | {r.weights:,} | {100 * r.fraction:.1f} % | "
                         f"{r.samples} | {100 * r.module_restricted:.2f} % | {100 * r.full_restricted:.2f} % | "
                         f"{100 * r.module_all:.2f} % | {100 * r.full_all:.2f} % |")
        return "\n".join(lines)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def modularity_report(model: nn.Module, masks: ClassMasks, class_sets: Sequence[int | Sequence[int]],
                      x_test: torch.Tensor, y_test: torch.Tensor) -> MODAReport:
    """Sizes, accuracies and overlap of the modules of ``class_sets`` (each a class or a tuple of classes).

    ``composed_accuracy``: every class's single-class module run on every test sample, the prediction
    the class whose module gives the largest logit (MODA's composition of modules), over the whole test
    set; compare with ``full_accuracy``. The overlap is over all classes' single-class modules.
    """
    was_training = model.training
    model.eval()
    try:
        full_weights = count_weights(model)
        full_logits = _logits(model, x_test)
        full_pred = full_logits.argmax(1)
        rows = []
        for spec in class_sets:
            classes = _check_classes("modularity_report", spec, masks)
            t = torch.tensor(classes, device=y_test.device)
            rows_idx = torch.isin(y_test, t)
            x, y = x_test[rows_idx], y_test[rows_idx]
            module = extract(model, classes, masks).eval()
            module_all = extract(model, classes, masks, keep_all_outputs=True).eval()
            pred_module = t[_logits(module, x).argmax(1)] if len(y) else y
            pred_full = t[full_logits[rows_idx][:, t].argmax(1)] if len(y) else y

            def acc(pred: torch.Tensor, y: torch.Tensor = y) -> float:
                return float((pred == y).float().mean()) if len(y) else float("nan")

            rows.append(ModuleStats(tuple(classes), count_weights(module), count_weights(module) / full_weights,
                                    len(y), acc(pred_module), acc(pred_full),
                                    acc(_logits(module_all, x).argmax(1) if len(y) else y), acc(full_pred[rows_idx])))
        singles = masks.classes
        composed = None
        if len(singles) > 1:
            scores = torch.stack([_logits(extract(model, c, masks).eval(), x_test)[:, 0] for c in singles], dim=1)
            composed = float((torch.tensor(singles, device=y_test.device)[scores.argmax(1)] == y_test).float().mean())
        wm = [weight_masks(model, c, masks) for c in singles]
        pairs = [(i, j) for i in range(len(wm)) for j in range(i + 1, len(wm))]
        jaccard = shared = None
        if pairs:
            stats = [_jaccard(wm[i], wm[j]) for i, j in pairs]
            jaccard = sum(inter / union for inter, union in stats) / len(stats)
            shared = sum(inter for inter, _ in stats) / len(stats) / full_weights
        return MODAReport(full_weights, float((full_pred == y_test).float().mean()), composed, rows, jaccard, shared,
                          masks.tau)
    finally:
        model.train(was_training)
