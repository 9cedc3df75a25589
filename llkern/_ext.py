"""Loading of the compiled extension llkern._C and the per-op implementation switch.

Every op takes ``impl``:
  * ``"auto"``: the compiled kernel when it was built for the input's device, otherwise
    the pure-PyTorch reference (with a one-time warning that says how to build);
  * ``"kernel"``: the compiled kernel, or an error if it was not built;
  * ``"reference"``: the pure-PyTorch reference.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

Impl = Literal["auto", "kernel", "reference"]
IMPLS = ("auto", "kernel", "reference")

try:
    from llkern import _C

    _LOAD_ERROR: BaseException | None = None
except ImportError as error:  # the package works without its compiled part
    _C = None
    _LOAD_ERROR = error

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the llkern checkout (torch must be installed "
    "first; set LLKERN_CUDA=1 for CUDA kernels)"
)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_warned: set[tuple[str, str]] = set()
_available: dict[tuple[str, str], bool] = {}


def extension_loaded() -> bool:
    """True when llkern._C imported (its ops are registered)."""
    return _C is not None


@torch.compiler.assume_constant_result  # a build-time fact: traced as a constant by torch.compile
def kernel_available(op: str, device_type: str) -> bool:
    """True when llkern._C has a kernel for ``torch.ops.llkern.<op>`` on ``device_type`` ("cpu", "cuda")."""
    found = _available.get((op, device_type))
    if found is None:  # the dispatcher query costs ~25 µs: ask once per op and device
        key = _DISPATCH_KEYS.get(device_type)
        # An op that this build does not declare (an older llkern._C) has no kernel: the dispatcher
        # query would raise for it.
        found = (_C is not None and key is not None and hasattr(torch.ops.llkern, op)
                 and torch._C._dispatch_has_kernel_for_dispatch_key(f"llkern::{op}", key))
        _available[(op, device_type)] = found
    return found


def autocast_on(device_type: str) -> bool:
    """True when ``torch.autocast`` is active for ``device_type`` (False for a device autocast does not know)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def use_kernel(op: str, device: torch.device, impl: str) -> bool:
    """Resolve ``impl`` for one call: True to run the compiled kernel, False for the reference."""
    if impl not in IMPLS:
        raise ValueError(f"llkern.{op}: expected impl to be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if kernel_available(op, device.type):
        return True
    why = (f"llkern._C failed to import ({_LOAD_ERROR})" if _C is None
           else f"llkern._C was built without {device.type} kernels")
    if impl == "kernel":
        raise RuntimeError(f"llkern.{op}: impl='kernel' but {why}; {BUILD_HINT}.")
    if (op, device.type) not in _warned and not torch.compiler.is_compiling():
        _warned.add((op, device.type))
        warnings.warn(f"llkern.{op}: {why}; using the pure-PyTorch reference. To get the kernel, {BUILD_HINT}.",
                      stacklevel=3)
    return False


def no_double_backward(op: str) -> None:
    """Raise in a kernel's backward run with create_graph=True: the gradients the kernels form are not
    themselves differentiable, and treating them as constants would make second derivatives silently zero."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"llkern.{op}: double backward (create_graph=True) is not supported by the "
                                  "kernel; use impl='reference'")
