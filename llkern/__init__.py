"""llkern: local (module-wise, gradient-isolated) training for PyTorch, with fused kernels.

Quick start::

    import llkern
    net = llkern.LocalNet(blocks, num_classes=10, losses=llkern.losses.TransportRegularized(tau=1.0))
    result = net.local_step(x, y)   # forward, local loss and backward, module by module
    optimizer.step()
"""

from llkern import functional, graph, heads, losses, memory, moda
from llkern._ext import extension_loaded, kernel_available, set_value_checks, value_checks
from llkern.context import ContextSupply
from llkern.graph import Graph, GraphConv, GraphReadout, graph_conv, normalized_adjacency
from llkern.heads import (
    InfoProHead,
    LinearHead,
    MLPSRHead,
    ProjectionHead,
    ReconstructionDecoder,
    TokenHead,
    contrastive_heads,
    infopro_heads,
    mlp_sr_heads,
    reconstruction_decoders,
    token_heads,
)
from llkern.local import Boundary, LocalNet, StepResult, run_module
from llkern.losses import (
    Composite,
    CrossEntropy,
    LinearSchedule,
    LocalContext,
    LocalLoss,
    LocalLossOutput,
    MutualInformation,
    Reconstruction,
    SupervisedContrastive,
    TransportRegularized,
    infopro_schedule,
)
from llkern.memory import MemoryMeter, MemoryReport
from llkern.moda import MODALocalLoss, MODALoss, moda_local_losses
from llkern.modules import TransportPenalty
from llkern.ops.aux_head import aux_head_loss
from llkern.ops.context import context_add
from llkern.ops.mean_kl import mean_kl_sample
from llkern.ops.miracle_encode import miracle_select
from llkern.ops.transport import transport_penalty
from llkern.planner import SplitPlan, split
from llkern.trainer import LocalTrainer

__version__ = "0.1.0"

__all__ = [
    "Boundary",
    "Composite",
    "ContextSupply",
    "CrossEntropy",
    "Graph",
    "GraphConv",
    "GraphReadout",
    "InfoProHead",
    "LinearHead",
    "LinearSchedule",
    "LocalContext",
    "LocalLoss",
    "LocalLossOutput",
    "LocalNet",
    "LocalTrainer",
    "MLPSRHead",
    "MODALocalLoss",
    "MODALoss",
    "MemoryMeter",
    "MemoryReport",
    "MutualInformation",
    "ProjectionHead",
    "Reconstruction",
    "ReconstructionDecoder",
    "SplitPlan",
    "StepResult",
    "SupervisedContrastive",
    "TokenHead",
    "TransportPenalty",
    "TransportRegularized",
    "aux_head_loss",
    "context_add",
    "contrastive_heads",
    "extension_loaded",
    "functional",
    "graph",
    "graph_conv",
    "heads",
    "infopro_heads",
    "infopro_schedule",
    "kernel_available",
    "losses",
    "mean_kl_sample",
    "memory",
    "miracle_select",
    "mlp_sr_heads",
    "moda",
    "moda_local_losses",
    "normalized_adjacency",
    "reconstruction_decoders",
    "run_module",
    "set_value_checks",
    "split",
    "token_heads",
    "transport_penalty",
    "value_checks",
]
