"""A rendezvous for the tests' gloo process groups through a file store, not a TCP port: a free port picked first
(bound, closed, handed over) could be taken by another run before the processes bind it."""

from __future__ import annotations

import os
import tempfile


def file_init_method(directory: str | os.PathLike[str] | None = None) -> str:
    """An ``init_method`` (``file://...``) for one process group: a file that does not exist yet (a store file left
    by an earlier group would hand its keys to this one), in a new folder under ``directory`` (the system's temporary
    folder by default). Call it once per group, in the parent, and give every process of the group the same string;
    the store deletes its file when the last process leaves the group (not after a process that was killed)."""
    folder = tempfile.mkdtemp(prefix="store", dir=None if directory is None else os.fspath(directory))
    return "file://" + os.path.join(folder, "store")
