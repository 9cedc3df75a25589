"""Triton kernels of llkern (installed as llkern.triton_kernels).

Triton reads TRITON_INTERPRET when a kernel is decorated, that is when these modules are imported:
INTERPRETED records whether they were, so CPU tensors run here only if the interpreter was on then.
"""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
