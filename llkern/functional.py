"""Functional forms of llkern's ops, mirroring ``torch.nn.functional``."""

from llkern.ops.aux_head import aux_head_loss
from llkern.ops.context import context_add
from llkern.ops.mean_kl import mean_kl_sample
from llkern.ops.miracle_encode import miracle_select
from llkern.ops.relu_mask import relu_with_mask
from llkern.ops.similarity import info_nce, renyi_mutual_information, supcon_loss
from llkern.ops.transport import transport_penalty

__all__ = ["aux_head_loss", "context_add", "info_nce", "mean_kl_sample", "miracle_select", "relu_with_mask",
           "renyi_mutual_information", "supcon_loss", "transport_penalty"]
