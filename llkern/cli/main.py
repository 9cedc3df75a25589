"""The llkern command.

  llkern train      train a network with local learning (llkern train --help)
  llkern eval       evaluate a run saved by llkern train
  llkern demo       local against end-to-end training on digits, with a plot
  llkern compress   MIRACLE: train, code, decode and evaluate LeNet-5 on digits
  llkern moda       MODA: modular training and per-class sub-networks
  llkern recipes    list the recipes installed with llkern
  llkern bench      time llkern's ops against plain PyTorch on this machine

Every command takes --help. The exit status is 0 on success, 2 for bad options (a short message and
nothing done), 1 for a failure during the work. python -m llkern works as llkern.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from llkern.cli.options import HelpFormatter, UsageError

__all__ = ["COMMANDS", "build_parser", "main", "run", "version"]


# command -> (module, function, one-line help); the module is imported only when its command runs, so that
# `llkern --help` and `llkern recipes` stay quick. Each function takes (argv, prog).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("llkern.cli.train", "main", "train a network with local learning"),
    "eval": ("llkern.cli.train", "evaluate_main", "evaluate a run saved by llkern train"),
    "demo": ("llkern.cli.demo", "main", "local against end-to-end training on digits, with a plot"),
    "compress": ("llkern.cli.compress_demo", "main", "MIRACLE compression of LeNet-5 on digits"),
    "moda": ("llkern.cli.moda_demo", "main", "MODA: modular training and per-class sub-networks"),
    "recipes": ("llkern.cli.recipes", "main", "list the installed recipes"),
    "bench": ("llkern.cli.bench", "main", "time llkern's ops against plain PyTorch here"),
}


def version() -> str:
    """``llkern VERSION (torch VERSION, kernels: ...)``."""
    import torch

    import llkern

    built = [device for device in ("cpu", "cuda") if llkern.kernel_available("transport_penalty", device)]
    kernels = ", ".join(built) if built else "none (pure-PyTorch references)"
    return f"llkern {llkern.__version__} (torch {torch.__version__}; compiled kernels: {kernels})"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the command list, --help and --version (each command parses its own options)."""
    parser = argparse.ArgumentParser(prog="llkern", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter, usage="llkern [--version] COMMAND [options]")
    parser.add_argument("--version", action="version", version=version())
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return parser


def run(argv: list[str] | None = None) -> Any:
    """What ``llkern ARGS`` does, returning the command's result (train: the evaluation and the per-epoch
    history; eval: the evaluation; ...) instead of an exit status. Bad options raise SystemExit(2) from
    argparse or :class:`UsageError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv)  # --help and --version exit here
        parser.error("expected a command")
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    module, function, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(rest, f"llkern {command}")


def main(argv: list[str] | None = None) -> int:
    """The ``llkern`` command: exit status 0 on success; 2 with a one-line message for bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except UsageError as error:
        command = argv[0] if argv and argv[0] in COMMANDS else ""
        print(f"llkern {command}: error: {error}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llkern: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
