"""Building blocks of a local network: heads, local losses, context supply, graph layers, and modules
that keep less of a module's activations for its backward."""

from llkern.nn import activation_memory, context, graph, heads, losses, recompute, transport
from llkern.nn.context import ContextSupply
from llkern.nn.graph import Graph, GraphConv, GraphReadout
from llkern.nn.heads import InfoProHead, LinearHead, MLPSRHead, ProjectionHead, ReconstructionDecoder, TokenHead
from llkern.nn.losses import (
    Composite,
    CrossEntropy,
    LocalLoss,
    MutualInformation,
    Reconstruction,
    SupervisedContrastive,
    TransportRegularized,
)
from llkern.nn.recompute import RecomputedSequential, recompute_modules, recompute_segments
from llkern.nn.transport import TransportPenalty

__all__ = [
    "Composite",
    "ContextSupply",
    "CrossEntropy",
    "Graph",
    "GraphConv",
    "GraphReadout",
    "InfoProHead",
    "LinearHead",
    "LocalLoss",
    "MLPSRHead",
    "MutualInformation",
    "ProjectionHead",
    "RecomputedSequential",
    "Reconstruction",
    "ReconstructionDecoder",
    "SupervisedContrastive",
    "TokenHead",
    "TransportPenalty",
    "TransportRegularized",
    "activation_memory",
    "context",
    "graph",
    "heads",
    "losses",
    "recompute",
    "recompute_modules",
    "recompute_segments",
    "transport",
]
