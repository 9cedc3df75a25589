"""llkern: local (module-wise, gradient-isolated) training for PyTorch, with fused kernels.

Quick start::

    import llkern
    net = llkern.LocalNet(blocks, num_classes=10, losses=llkern.TransportRegularized(tau=1.0))
    result = net.local_step(x, y)   # forward, local loss and backward, module by module
    optimizer.step()
"""

from llkern import _moved, compress, data, functional, local, moda, nn
from llkern._ext import extension_loaded, kernel_available, set_value_checks, value_checks
from llkern.local import memory
from llkern.local.fit import MemoryFit, fit_memory
from llkern.local.memory import MemoryMeter, MemoryReport
from llkern.local.net import Boundary, LocalNet, ModuleMemory, StepResult, run_module
from llkern.local.pipeline import PipelineError, PipelineTrainer, Placement, plan_stages
from llkern.local.planner import SplitPlan, TooManyModulesError, split, trace_units
from llkern.local.trainer import LocalTrainer
from llkern.moda import MODALocalLoss, MODALoss, moda_local_losses
from llkern.nn import activation_memory, graph, heads, losses
from llkern.nn.context import ContextSupply
from llkern.nn.graph import Graph, GraphConv, GraphReadout, graph_conv, normalized_adjacency
from llkern.nn.heads import (
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
from llkern.nn.losses import (
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
from llkern.nn.recompute import RecomputedSequential, recompute_modules, recompute_segments
from llkern.nn.transport import TransportPenalty
from llkern.ops.aux_head import aux_head_loss
from llkern.ops.context import context_add
from llkern.ops.mean_kl import mean_kl_sample
from llkern.ops.miracle_encode import miracle_select
from llkern.ops.relu_mask import relu_with_mask
from llkern.ops.similarity import info_nce, renyi_mutual_information, supcon_loss
from llkern.ops.transport import transport_penalty

_moved.install()  # llkern.losses, llkern.demo, ...: the paths before the package was laid out by area

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
    "MemoryFit",
    "MemoryMeter",
    "MemoryReport",
    "ModuleMemory",
    "MutualInformation",
    "PipelineError",
    "PipelineTrainer",
    "Placement",
    "ProjectionHead",
    "RecomputedSequential",
    "Reconstruction",
    "ReconstructionDecoder",
    "SplitPlan",
    "StepResult",
    "SupervisedContrastive",
    "TokenHead",
    "TooManyModulesError",
    "TransportPenalty",
    "TransportRegularized",
    "activation_memory",
    "aux_head_loss",
    "compress",
    "context_add",
    "contrastive_heads",
    "data",
    "extension_loaded",
    "fit_memory",
    "functional",
    "graph",
    "graph_conv",
    "heads",
    "info_nce",
    "infopro_heads",
    "infopro_schedule",
    "kernel_available",
    "local",
    "losses",
    "mean_kl_sample",
    "memory",
    "miracle_select",
    "mlp_sr_heads",
    "moda",
    "moda_local_losses",
    "nn",
    "normalized_adjacency",
    "plan_stages",
    "recompute_modules",
    "recompute_segments",
    "reconstruction_decoders",
    "relu_with_mask",
    "renyi_mutual_information",
    "run_module",
    "set_value_checks",
    "split",
    "supcon_loss",
    "token_heads",
    "trace_units",
    "transport_penalty",
    "value_checks",
]
