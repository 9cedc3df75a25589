"""Graph convolutional networks (Kipf & Welling) for node and graph classification (MOLE's graph tasks).

Both are flat ``nn.Sequential``\\ s of cuttable units: ``layer_0 … layer_{L-1}`` (a :class:`GCNLayer`
each: graph convolution, ReLU, dropout; never cut inside), then for graphs a ``readout`` (masked mean
over each graph's nodes), then ``head`` (``nn.Linear``). Every layer reads the model's
:class:`llkern.nn.graph.Graph` (``model.graph``); see :mod:`llkern.nn.graph` for how the graph is set.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from llkern.nn.graph import Graph, GraphConv, GraphReadout


class GCNLayer(nn.Module):
    """``dropout(ReLU(Â X Wᵀ + b))``: one graph convolution layer of a GCN (one unit for the planner)."""

    def __init__(self, in_features: int, out_features: int, graph: Graph, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GCNLayer: expected dropout in [0, 1), got {dropout!r}")
        self.conv = GraphConv(in_features, out_features, graph)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.relu(self.conv(x)))


class GraphHead(nn.Module):
    """A graph-level classifier head: :class:`llkern.nn.graph.GraphReadout` (masked mean over each graph's
    nodes), then a linear layer: ``(B, n, C)`` → ``(B, classes)``. A head for the modules of a
    :func:`gcn_graphs` model in a :class:`llkern.LocalNet`."""

    def __init__(self, num_classes: int, in_channels: int, graph: Graph) -> None:
        super().__init__()
        self.readout = GraphReadout(graph)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.readout(h))


def _layers(graph: Graph, in_features: int, hidden: int, depth: int, dropout: float) -> list[tuple[str, nn.Module]]:
    if not isinstance(graph, Graph):
        raise TypeError(f"gcn: expected graph to be a llkern.nn.graph.Graph, got {type(graph).__name__}")
    if depth < 1 or hidden < 1 or in_features < 1:
        raise ValueError(f"gcn: expected depth, hidden and in_features >= 1, got {depth}, {hidden}, {in_features}")
    widths = [in_features] + [hidden] * depth
    return [(f"layer_{i}", GCNLayer(widths[i], widths[i + 1], graph, dropout)) for i in range(depth)]


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"gcn: expected num_classes to be an int >= 1, got {num_classes!r}")


def _attach(model: nn.Sequential, graph: Graph) -> None:
    """``model.graph`` as a plain attribute, not a unit (the layers hold it as their submodule)."""
    object.__setattr__(model, "graph", graph)


def gcn_nodes(graph: Graph, in_features: int, num_classes: int, *, hidden: int = 16, depth: int = 2,
              dropout: float = 0.0) -> nn.Sequential:
    """A node-classification GCN: ``layer_0 … layer_{depth-1}`` (:class:`GCNLayer`), ``head`` (linear).

    ``(N, in_features)`` node features → ``(N, num_classes)`` logits on the graph set in ``graph``.
    ``model.graph`` is the graph. The GCN paper's two-layer model with its final graph convolution
    written as a graph convolution to ``hidden`` followed by a linear classifier (the same family).
    """
    _check_classes(num_classes)
    model = nn.Sequential(OrderedDict([*_layers(graph, in_features, hidden, depth, dropout),
                                       ("head", nn.Linear(hidden, num_classes))]))
    _attach(model, graph)
    return model


def gcn_graphs(graph: Graph, in_features: int, num_classes: int, *, hidden: int = 32, depth: int = 3,
               dropout: float = 0.0) -> nn.Sequential:
    """A graph-classification GCN: ``layer_*`` (:class:`GCNLayer`), ``readout`` (masked mean over each
    graph's nodes), ``head`` (linear). ``(B, n_max, in_features)`` padded batches (the batch's graph set
    in ``graph`` by :class:`llkern.nn.graph.GraphBatches`) → ``(B, num_classes)``."""
    _check_classes(num_classes)
    model = nn.Sequential(OrderedDict([*_layers(graph, in_features, hidden, depth, dropout),
                                       ("readout", GraphReadout(graph)), ("head", nn.Linear(hidden, num_classes))]))
    _attach(model, graph)
    return model
