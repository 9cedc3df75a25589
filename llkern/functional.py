"""Functional forms of llkern's ops, mirroring ``torch.nn.functional``."""

from llkern.ops.transport import transport_penalty

__all__ = ["transport_penalty"]
