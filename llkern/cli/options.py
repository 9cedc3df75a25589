"""What every llkern command shares: the help formatter, plain-text help, option types that check
their values, and the error that means "bad input, nothing was done" (exit status 2)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable


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


def _number(kind: type, low: float | None, strict: bool, what: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if kind is float and number != number:  # NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        if low is not None and (number <= low if strict else number < low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, True, "an integer >= 1")
nonnegative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
nonnegative_float = _number(float, 0.0, False, "a number >= 0")
