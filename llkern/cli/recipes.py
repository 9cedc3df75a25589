"""Recipes: JSON files of ``llkern train`` option values, installed with the package (``llkern.recipes``).

``llkern recipes`` lists them; ``llkern train --recipe NAME`` (a name from that list, or the path of
any JSON file) starts from one, and options on the command line override it.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Any

from llkern.cli.options import HelpFormatter, UsageError

__all__ = ["find_recipe", "list_recipes", "load_recipe", "main", "recipe_names"]


def _folder() -> Any:
    return resources.files("llkern.recipes")


def recipe_names() -> list[str]:
    """The names of the installed recipes, sorted."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".json"))


def find_recipe(name_or_path: str) -> Any:
    """The recipe file for an installed recipe's name (``infopro-resnet110-k4``, ``.json`` optional), or
    the path of a JSON file; a UsageError listing the installed names when it is neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
    candidate = _folder() / f"{Path(name).name}.json"
    if candidate.is_file():
        return candidate
    raise UsageError(f"--recipe: {name_or_path!r} is neither a file nor an installed recipe; installed: "
                     f"{', '.join(recipe_names())} (llkern recipes describes them)")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe's option values (its ``description`` left out)."""
    file = find_recipe(name_or_path)
    try:
        recipe = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"--recipe: {name_or_path} is not valid JSON ({error})") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"--recipe: {name_or_path} must hold a JSON object of option values")
    recipe.pop("description", None)
    return recipe


def list_recipes() -> list[tuple[str, str]]:
    """(name, first sentence of the description) of every installed recipe."""
    rows = []
    for name in recipe_names():
        description = json.loads((_folder() / f"{name}.json").read_text()).get("description", "")
        rows.append((name, description.split(": ")[0].split(". ")[0].strip()))
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> list[tuple[str, str]]:
    """``llkern recipes``: print every installed recipe's name and what it reproduces."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                     description="List the recipes installed with llkern. Run one with "
                                                 "llkern train --recipe NAME (options on the command line "
                                                 "override it); llkern train --recipe NAME --help shows its values.")
    parser.add_argument("--full", action="store_true", help="print each recipe's whole description")
    args = parser.parse_args(argv)
    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        if args.full:
            summary = json.loads((_folder() / f"{name}.json").read_text()).get("description", "")
        print(f"{name:<{width}}  {summary}")
    return rows
