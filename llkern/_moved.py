"""Old module paths keep importing after the package was laid out by area.

``import llkern.losses`` returns the module ``llkern.nn.losses`` itself (not a copy, so classes keep
one identity), and ``python -m llkern.demo`` runs ``llkern.cli.demo`` as before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

MOVED = {
    "llkern.activation_memory": "llkern.nn.activation_memory",
    "llkern.compress_demo": "llkern.cli.compress_demo",
    "llkern.compression": "llkern.compress.mean_kl",
    "llkern.context": "llkern.nn.context",
    "llkern.datasets": "llkern.data.images",
    "llkern.demo": "llkern.cli.demo",
    "llkern.graph": "llkern.nn.graph",
    "llkern.graph_data": "llkern.data.graphs",
    "llkern.heads": "llkern.nn.heads",
    "llkern.losses": "llkern.nn.losses",
    "llkern.memory": "llkern.local.memory",
    "llkern.miracle": "llkern.compress.miracle",
    "llkern.miracle_header": "llkern.compress.header",
    "llkern.moda_demo": "llkern.cli.moda_demo",
    "llkern.modules": "llkern.nn.transport",
    "llkern.planner": "llkern.local.planner",
    "llkern.trainer": "llkern.local.trainer",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name in MOVED and loads it as the module at its new place."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=MOVED[fullname])

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # create_module returned the new module, already executed

    def get_code(self, fullname: str) -> types.CodeType | None:
        # runpy (python -m OLD_NAME) asks for the code to run as __main__: the new module's
        new_name = MOVED[fullname]
        spec = importlib.util.find_spec(new_name)
        return spec.loader.get_code(new_name)


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
