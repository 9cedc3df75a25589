"""What every llkern command shares: the help formatter, plain-text help, option types that check
their values, and the error that means "bad input, nothing was done" (exit status 2)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class UsageError(Exception):
    """Bad input found before any work started: the command prints the message and exits with status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions kept as written (paragraphs, examples); every option's default shown, except the
    defaults that say nothing (None, False): the option's help says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def plain_text(text: str | None) -> str | None:
    """A docstring as terminal text: reST roles and double backticks dropped (``x`` -> x, :func:`f` -> f)."""
    if text is None:
        return None
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return text.replace("**", "")


def _number(kind: type, low: float | None, strict: bool, what: str,
            high: float | None = None) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if kind is float and number != number:  # NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        if low is not None and (number <= low if strict else number < low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        if high is not None and number > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, True, "an integer >= 1")
nonnegative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
nonnegative_float = _number(float, 0.0, False, "a number >= 0")
fraction = _number(float, 0.0, False, "a number from 0 to 1", 1.0)


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(value: str) -> int:
    """An option type for a number of bytes: ``41943040``, ``40MiB``, ``1.5 GiB``, ``500MB`` (KiB/MiB/GiB are
    powers of 2, kB/MB/GB powers of 10; case is ignored); at least one byte."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 40MiB, 1.5GiB or 500MB (units B, kB, MB, GB, "
                                         f"KiB, MiB, GiB), got {value!r}")
    size = float(match.group(1)) * _BYTE_UNITS[unit]
    if not size >= 1 or size == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite size of at least 1 byte, got {value!r}")
    return int(size)


byte_size.__name__ = "a size"


def positive_float_at_most(high: float) -> Callable[[str], float]:
    """An option type for numbers above 0 and at most ``high``."""
    return _number(float, 0.0, True, f"a number > 0 and <= {high:g}", high)


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An option type for integers from ``low`` to ``high`` (both included)."""
    return _number(int, low, False, f"an integer from {low} to {high}", high)


def output_path(option: str, path: str | os.PathLike[str], folder: bool = False) -> Path:
    """``path`` as a Path, checked before any work that it can be written: a file path that is not a folder
    (or, with ``folder=True``, a folder path that is not a file) under a writable folder. Missing parent
    folders are fine (:func:`make_parents` creates them); a file where a parent folder should be is not."""
    target = Path(path).expanduser()
    if folder and target.exists() and not target.is_dir():
        raise UsageError(f"{option}: {path} is a file, not a folder")
    if not folder and target.is_dir():
        raise UsageError(f"{option}: {path} is a folder; expected a file path")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{option}: cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: cannot write {path}: the folder {ancestor} is not writable")
    return target


def make_parents(path: str | os.PathLike[str]) -> Path:
    """``path`` with its parent folders created (an output path that :func:`output_path` accepted)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def check_device(name: str) -> torch.device:
    """``--device NAME`` as a torch.device that this machine has (a UsageError otherwise)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device: {name!r} is not a device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UsageError(f"--device {name}: no CUDA device here (this torch {torch.__version__} is {build}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {name!r}")
    return device
