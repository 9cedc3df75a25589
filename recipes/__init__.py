"""llkern's recipes: JSON files of ``llkern train`` options that reproduce a published setting.

Installed with the package as ``llkern.recipes``; ``llkern recipes`` lists them and
``llkern train --recipe NAME`` runs one.
"""
