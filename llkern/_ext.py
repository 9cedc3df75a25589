"""Loading of the compiled extension llkern._C and the per-op implementation switch.

Every op takes ``impl``:
  * ``"auto"``: the compiled kernel when it was built for the input's device, otherwise
    the pure-PyTorch reference (with a one-time warning that says how to build);
  * ``"kernel"``: the compiled kernel, or an error if it was not built;
  * ``"reference"``: the pure-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
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


# --- value checks ----------------------------------------------------------------------------------
# Checks that read tensor values (labels in range, finite embeddings, ρ > 0, ...). On the CPU they cost a
# pass over data already at hand and always run. On a GPU each would make the host wait for the device,
# so a local step could not run ahead of its kernels or be captured in a CUDA graph: there they are off
# unless asked for, and a bad value gives NaN (never an out-of-bounds access, never a wrong finite number).
_value_checks = os.environ.get("LLKERN_VALUE_CHECKS", "0") == "1"


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks on GPU tensors on or off for the whole process (default: off, or on when the
    environment variable ``LLKERN_VALUE_CHECKS=1``). With them on, a label out of range or a non-finite
    input on a GPU raises a clear error as on the CPU, at the cost of one host synchronisation per check."""
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"llkern.set_value_checks: expected enabled to be a bool, got {enabled!r}")
    _value_checks = enabled


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_value_checks`: ``with llkern.value_checks(): ...``."""
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"llkern.value_checks: expected enabled to be a bool, got {enabled!r}")
    previous, _value_checks = _value_checks, enabled
    try:
        yield
    finally:
        _value_checks = previous


def has_values(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read: not while torch.compile traces, not for meta or fake tensors."""
    return not (torch.compiler.is_compiling() or t.device.type == "meta"
                or isinstance(t, torch._subclasses.FakeTensor))


def check_values(t: torch.Tensor) -> bool:
    """Whether a value check on ``t`` should run now: always for real CPU tensors, on other devices when
    the value checks are on; never for a tensor without values (see :func:`has_values`)."""
    return has_values(t) and (t.device.type == "cpu" or _value_checks)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current one around a Triton launch: Triton launches on the current device, not
    the inputs'. (While torch.compile traces, nothing: the code it generates guards the device itself.)"""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)
