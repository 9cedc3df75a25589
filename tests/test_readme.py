"""The README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    result = namespace["result"]
    assert len(result.losses) == 4 and all(loss == loss for loss in result.losses)


def test_the_package_areas_named_exist():
    # "The package by area: `llkern.functional` ..., `llkern.nn` ...": every name there imports, and the
    # functional ops are the same objects at the top level.
    import importlib

    import llkern
    import llkern.functional

    paragraph = next(p for p in README.read_text().split("\n\n") if p.startswith("The package by area"))
    names = set(re.findall(r"`(llkern(?:\.\w+)+)`", paragraph))
    assert {"llkern.functional", "llkern.ops", "llkern.nn", "llkern.local"} <= names
    for name in names:
        module, _, attribute = name.rpartition(".")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(module), attribute), name
    for name in llkern.functional.__all__:
        assert getattr(llkern, name) is getattr(llkern.functional, name), name
