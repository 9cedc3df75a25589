"""Where a training run's per-epoch rows go: log files, a line per epoch in the terminal, TensorBoard,
and a plot of the curves.

A row is what :meth:`llkern.LocalTrainer.fit` makes after each epoch (see its docstring): per-module
``loss`` and ``accuracy`` lists, ``eval_accuracy``, ``peak_saved_bytes``, ``epoch_time_s``, ...
Every sink is a callable ``sink(row)`` or a log path, and ``fit(log=...)`` takes one or a list of them.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

LogSink = Callable[[dict], None] | str | os.PathLike[str]

LOG_SUFFIXES = (".json", ".jsonl", ".csv")


def _csv_rows(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Flatten list-valued fields into ``name_0, name_1, ...`` columns."""
    flat_rows = []
    for row in rows:
        flat: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    flat[f"{key}_{i}"] = "" if v is None else v
            else:
                flat[key] = "" if value is None else value
        flat_rows.append(flat)
    fields: list[str] = []
    for flat in flat_rows:
        fields += [f for f in flat if f not in fields]
    return fields, flat_rows


def check_log_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if it ends in a log suffix (.json, .jsonl, .csv); else a ValueError."""
    path = Path(path)
    if path.suffix.lower() not in LOG_SUFFIXES:
        raise ValueError(f"expected a log path ending in .json, .jsonl or .csv, got {str(path)!r}")
    return path


def write_log(rows: list[dict], path: str | os.PathLike[str]) -> None:
    """Write log rows to ``path``: ``.json`` (a list of rows), ``.jsonl`` (a row per line) or ``.csv``
    (list-valued fields as ``name_0, name_1, ...`` columns)."""
    path = check_log_path(path)
    suffix = path.suffix.lower()
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a reader never sees half a log
    with open(tmp, "w", newline="") as f:
        if suffix == ".json":
            json.dump(rows, f, indent=1)
        elif suffix == ".jsonl":
            f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            fields, flat_rows = _csv_rows(rows)
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(flat_rows)
    os.replace(tmp, path)


def _numbers(values: Sequence[float | None], scale: float = 1.0, digits: int = 3) -> str:
    return " ".join("-" if v is None else f"{scale * v:.{digits}f}" for v in values)


def format_epoch(row: dict, epochs: int | None = None) -> str:
    """One line for a log row: epoch, per-module training loss and accuracy (%), test accuracy (%),
    peak saved activations (MiB) and the epoch's time. Fields a row lacks are left out."""
    parts = [f"epoch {row['epoch']}" + (f"/{epochs}" if epochs else "")]
    if row.get("loss") is not None:
        parts.append("loss " + _numbers(row["loss"]))
    if row.get("accuracy") is not None and any(a is not None for a in row["accuracy"]):
        parts.append("acc % " + _numbers(row["accuracy"], 100, 1))
    test = row.get("eval_accuracy")
    if test is not None:
        parts.append("test % " + (_numbers(test, 100, 2) if isinstance(test, list) else f"{100 * test:.2f}"))
    if row.get("peak_saved_bytes") is not None:
        parts.append(f"saved {row['peak_saved_bytes'] / 2**20:.1f} MiB")
    if row.get("epoch_time_s") is not None:
        parts.append(f"{row['epoch_time_s']:.1f} s")
    return "  ".join(parts)


class EpochPrinter:
    """A sink that prints :func:`format_epoch` of every row to ``stream`` (stdout by default)."""

    def __init__(self, epochs: int | None = None, stream: TextIO | None = None) -> None:
        self.epochs = epochs
        self.stream = stream

    def __call__(self, row: dict) -> None:
        print(format_epoch(row, self.epochs), file=self.stream or sys.stdout, flush=True)


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write (it needs the ``tensorboard`` package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger:
    """A sink that writes every row's numbers as TensorBoard scalars, one step per epoch:
    ``loss/module_k``, ``accuracy/module_k``, ``test/accuracy`` (``test/accuracy_k`` for every head),
    ``memory/peak_saved_MiB``, ``time/epoch_s``, ``lr/module_k``.

    ``writer`` is anything with ``add_scalar(tag, value, step)`` and ``flush()``; by default a
    ``torch.utils.tensorboard.SummaryWriter(log_dir)`` (an ImportError naming the ``tensorboard``
    package where it is not installed).
    """

    def __init__(self, log_dir: str | os.PathLike[str], writer: Any = None) -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard") \
                    from error
            writer = SummaryWriter(str(log_dir))
        self.writer = writer

    def __call__(self, row: dict) -> None:
        step = row["epoch"]
        for name in ("loss", "accuracy", "lr"):
            for k, value in enumerate(row.get(name) or []):
                if value is not None:
                    self.writer.add_scalar(f"{name}/module_{k}", value, step)
        test = row.get("eval_accuracy")
        if isinstance(test, list):
            for k, value in enumerate(test):
                self.writer.add_scalar(f"test/accuracy_{k}", value, step)
        elif test is not None:
            self.writer.add_scalar("test/accuracy", test, step)
        if row.get("peak_saved_bytes") is not None:
            self.writer.add_scalar("memory/peak_saved_MiB", row["peak_saved_bytes"] / 2**20, step)
        if row.get("epoch_time_s") is not None:
            self.writer.add_scalar("time/epoch_s", row["epoch_time_s"], step)
        self.writer.flush()

    def close(self) -> None:
        if hasattr(self.writer, "close"):
            self.writer.close()


def plot_history(rows: list[dict], path: str | os.PathLike[str]) -> bool:
    """Plot per-module training loss and the test accuracy against the epoch into ``path`` (PNG, SVG,
    PDF: by its suffix). Returns False, writing nothing, where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not rows:
        raise ValueError("plot_history: expected at least one log row")
    epochs = [row["epoch"] for row in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(len(rows[0]["loss"])):
        values = [row["loss"][k] for row in rows]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, [float("nan") if v is None else v for v in values], marker=".", label=f"module {k}")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="local losses")
    ax_loss.legend()
    tests = [row.get("eval_accuracy") for row in rows]
    if any(t is not None for t in tests):
        if isinstance(next(t for t in tests if t is not None), list):
            for k in range(len(next(t for t in tests if t is not None))):
                ax_acc.plot(epochs, [100 * t[k] if t else float("nan") for t in tests], marker=".", label=f"head {k}")
            ax_acc.legend()
        else:
            ax_acc.plot(epochs, [100 * t if t is not None else float("nan") for t in tests], marker=".")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


__all__ = ["EpochPrinter", "LogSink", "TensorBoardLogger", "check_log_path", "format_epoch", "plot_history",
           "tensorboard_available", "write_log"]
