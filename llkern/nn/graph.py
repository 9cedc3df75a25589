"""Graph convolution on a sparse adjacency (Kipf & Welling), for MOLE's graph tasks.

``graph_conv(x, adjacency, weight, bias)`` computes ``Â X Wᵀ + b`` with ``Â = D^-1/2 (A + I) D^-1/2``
held as a sparse COO (or CSR) tensor and multiplied with ``torch.sparse.mm``: memory and time grow
with the number of edges, never with nodes²; no N×N dense tensor is ever formed, forward or backward.

How a model gets its graph. :class:`LocalNet` hands one tensor from module to module, so the
structure does not travel with the features: it lives in a :class:`Graph`, a small module without
parameters that every :class:`GraphConv` (and :class:`GraphReadout`) of a model shares. Its
adjacency is a non-persistent buffer: it moves with ``.to()`` and is not in the ``state_dict``.

* Node classification (one graph): set the graph once (``Graph(adjacency)``); ``x`` is every node's
  features ``(N, F)``, the target ``(N,)`` holds ``ignore_index`` (-100) on the nodes without a label
  (the cross-entropy and :class:`llkern.MutualInformation` skip them). The whole graph is one batch.
* Graph classification (many small graphs): graphs are padded to ``n_max`` nodes, a batch of B graphs
  is ``x`` of shape ``(B, n_max, F)`` with one target per graph, and the batch's structure is the
  block-diagonal ``Â`` over the ``B·n_max`` rows (padded nodes have no entries: they neither send nor
  receive messages) plus a node mask ``(B, n_max)``. :class:`GraphBatches` builds both for each batch
  and sets them on the model's :class:`Graph` right before it yields the batch, so a consumer that
  runs each batch before asking for the next one (``LocalTrainer.fit`` and ``evaluate``, a plain
  ``for`` loop) always runs it on its own graph. :class:`GraphReadout` pools the real nodes of each
  graph (masked mean) into ``(B, C)`` rows for the heads and the mutual-information objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llkern._ext import autocast_on

__all__ = ["Graph", "GraphBatches", "GraphConv", "GraphReadout", "GraphSet", "adjacency_from_networkx",
           "block_diagonal", "graph_conv", "normalized_adjacency", "normalized_edges"]

LAYOUTS = ("coo", "csr")


def _is_sparse(a: torch.Tensor) -> bool:
    return a.layout in (torch.sparse_coo, torch.sparse_csr)


def normalized_edges(edge_index: torch.Tensor, num_nodes: int, *, self_loops: bool = True,
                     symmetric: bool = True, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``Â = D^-1/2 (A + I) D^-1/2`` as ``(indices (2, nnz), values (nnz,))``, row-major sorted.

    Args:
        edge_index: ``(2, E)`` integer tensor of edges ``(source, target)`` between nodes ``0..num_nodes-1``.
        num_nodes: N.
        self_loops: add I (every node keeps its own features; default True). Self-loops already in
            ``edge_index`` are dropped first, so the diagonal of ``A + I`` is exactly 1.
        symmetric: treat the edges as undirected (add each edge's reverse; default True).
        dtype: the values' dtype.

    Duplicate edges count once (A is 0/1). D is the row sums of ``A + I``; a node with no entry
    (isolated, without self-loops) gets an empty row.
    """
    name = "llkern.nn.graph.normalized_edges"
    if not isinstance(edge_index, torch.Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        shape = list(edge_index.shape) if isinstance(edge_index, torch.Tensor) else type(edge_index).__name__
        raise ValueError(f"{name}: expected edge_index of shape (2, E), got {shape}")
    if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool or edge_index.is_complex():
        raise TypeError(f"{name}: expected an integer edge_index, got {edge_index.dtype}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"{name}: expected num_nodes to be an int >= 1, got {num_nodes!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:  # (an integer Â held only 0s)
        raise TypeError(f"{name}: expected a floating-point dtype for Â's values, got {dtype}")
    edges = edge_index.to(torch.int64)
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= num_nodes):
        raise ValueError(f"{name}: edge_index holds node indices in [{int(edges.min())}, {int(edges.max())}], "
                         f"outside 0..{num_nodes - 1} (num_nodes={num_nodes})")
    if symmetric:
        edges = torch.cat([edges, edges.flip(0)], dim=1)
    edges = edges[:, edges[0] != edges[1]]
    if self_loops:
        diagonal = torch.arange(num_nodes, device=edges.device)
        edges = torch.cat([edges, torch.stack([diagonal, diagonal])], dim=1)
    # row-major linear index: unique() both removes duplicates and sorts into coalesced order
    key = torch.unique(edges[0] * num_nodes + edges[1])
    rows, cols = key // num_nodes, key % num_nodes
    degree = torch.bincount(rows, minlength=num_nodes).to(torch.float64)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1.0).rsqrt(), torch.zeros_like(degree))
    values = (inv_sqrt[rows] * inv_sqrt[cols]).to(dtype)
    return torch.stack([rows, cols]), values


def normalized_adjacency(edge_index: torch.Tensor, num_nodes: int, *, self_loops: bool = True,
                         symmetric: bool = True, layout: str = "coo", dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """``Â = D^-1/2 (A + I) D^-1/2`` as a sparse ``(N, N)`` tensor (see :func:`normalized_edges`).

    ``layout``: ``"coo"`` (default, coalesced) or ``"csr"``. Its size is ``nnz = N + 2E`` entries
    (with self-loops, undirected, no duplicates): ``nnz·(2·8 + 4)`` bytes in float32 COO.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"llkern.nn.graph.normalized_adjacency: expected layout to be one of {LAYOUTS}, "
                         f"got {layout!r}")
    indices, values = normalized_edges(edge_index, num_nodes, self_loops=self_loops, symmetric=symmetric, dtype=dtype)
    adjacency = torch.sparse_coo_tensor(indices, values, (num_nodes, num_nodes), is_coalesced=True,
                                        check_invariants=False)
    if layout == "csr":
        adjacency = adjacency.to_sparse_csr()
    return adjacency if device is None else adjacency.to(device)


def adjacency_from_networkx(graph, *, self_loops: bool = True, layout: str = "coo",
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Â`` of a networkx graph, rows in the order of ``list(graph.nodes)`` (directed graphs are symmetrised)."""
    name = "llkern.nn.graph.adjacency_from_networkx"
    if not (hasattr(graph, "nodes") and hasattr(graph, "edges")):
        raise TypeError(f"{name}: expected a networkx graph, got {type(graph).__name__}")
    index = {node: i for i, node in enumerate(graph.nodes)}
    if not index:
        raise ValueError(f"{name}: expected a graph with at least one node")
    # (u, v) for every edge; a multigraph's parallel edges (u, v, key) count once
    pairs = [(index[u], index[v]) for u, v, *_ in graph.edges]
    edge_index = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2).t()
    return normalized_adjacency(edge_index, len(index), self_loops=self_loops, layout=layout, dtype=dtype)


def block_diagonal(blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], block_size: int, *,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The block-diagonal sparse COO matrix of ``len(blocks)`` graphs padded to ``block_size`` nodes each.

    ``blocks[b]`` is graph b's ``(indices (2, nnz_b), values (nnz_b,))`` (from :func:`normalized_edges`);
    graph b's nodes are rows ``b·block_size … b·block_size + n_b − 1``; the padded rows stay empty.
    """
    name = "llkern.nn.graph.block_diagonal"
    if not blocks:
        raise ValueError(f"{name}: expected at least one block")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: expected block_size to be an int >= 1, got {block_size!r}")
    coalesced = True
    for b, (idx, v) in enumerate(blocks):
        if idx.dim() != 2 or idx.shape[0] != 2 or v.shape != (idx.shape[1],):
            raise ValueError(f"{name}: expected blocks[{b}] to be (indices (2, nnz), values (nnz,)), got shapes "
                             f"{list(idx.shape)} and {list(v.shape)}")
        # (an index outside the block made a sparse tensor whose use crashed the process)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= block_size):
            raise ValueError(f"{name}: blocks[{b}] holds node indices in [{int(idx.min())}, {int(idx.max())}], "
                             f"outside the block's 0..{block_size - 1} (block_size={block_size})")
        key = idx[0] * block_size + idx[1]
        coalesced = coalesced and bool((key[1:] > key[:-1]).all())
    indices = torch.cat([idx + b * block_size for b, (idx, _) in enumerate(blocks)], dim=1)
    values = torch.cat([v for _, v in blocks])
    size = len(blocks) * block_size
    # blocks from normalized_edges are row-major sorted and the blocks are in order: the whole is coalesced
    out = torch.sparse_coo_tensor(indices, values, (size, size), is_coalesced=coalesced, check_invariants=False,
                                  device=device)
    return out if coalesced else out.coalesce()


def _check_adjacency(name: str, adjacency: torch.Tensor) -> None:
    if not isinstance(adjacency, torch.Tensor) or not _is_sparse(adjacency):
        kind = adjacency.layout if isinstance(adjacency, torch.Tensor) else type(adjacency).__name__
        raise TypeError(f"{name}: expected adjacency to be a sparse COO or CSR tensor (see "
                        f"llkern.nn.graph.normalized_adjacency), got {kind}")
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1] or adjacency.dense_dim() != 0:
        raise ValueError(f"{name}: expected a square (N, N) adjacency with scalar entries, got shape "
                         f"{list(adjacency.shape)}" + (f" with {adjacency.dense_dim()} dense dimension(s)"
                                                       if adjacency.dense_dim() else ""))


def graph_conv(x: torch.Tensor, adjacency: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Graph convolution ``Â X Wᵀ + b`` with a sparse ``Â`` (``torch.sparse.mm``).

    Args:
        x: node features ``(N, F_in)``, or a padded batch of graphs ``(B, n, F_in)`` with ``B·n = N``
            (rows in order: graph 0's n nodes, then graph 1's, ...).
        adjacency: sparse ``(N, N)`` COO or CSR tensor, e.g. :func:`normalized_adjacency` or
            :func:`block_diagonal`; same dtype and device as ``x``.
        weight: ``(F_out, F_in)`` (``nn.Linear``'s layout).
        bias: ``(F_out,)`` or None.

    Returns:
        ``(N, F_out)`` (or ``(B, n, F_out)``). The product runs in the cheaper order (``Â(XWᵀ)`` when
        ``F_out ≤ F_in``, else ``(ÂX)Wᵀ``); autograd gives ``dX = Âᵀ G W`` and ``dW = Gᵀ Â X`` through
        the sparse product, without a gradient for ``Â``. Under ``torch.autocast`` it runs in ``Â``'s
        dtype (x, weight and bias are cast to it) and returns that dtype.
    """
    name = "llkern.graph_conv"
    _check_adjacency(name, adjacency)
    if isinstance(x, torch.Tensor) and autocast_on(x.device.type):
        # Under autocast the layer runs in Â's dtype: torch.sparse.mm has no 16-bit CSR kernel on the CPU, and
        # its backward runs outside autocast, where a float32 Â meets a 16-bit gradient. The output stays in
        # Â's dtype (as autocast's float32 ops do); the next layer casts it again.
        dtype = adjacency.dtype
        with torch.autocast(x.device.type, enabled=False):
            return graph_conv(x.to(dtype), adjacency, weight.to(dtype), None if bias is None else bias.to(dtype))
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected x of shape (N, F) or (B, n, F), got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected weight of shape (F_out, F_in), got {list(weight.shape)}")
    rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    if rows != adjacency.shape[0]:
        what = f"{x.shape[0]}·{x.shape[1]} = {rows}" if x.dim() == 3 else f"{rows}"
        raise ValueError(f"{name}: expected x with {adjacency.shape[0]} nodes (the adjacency's size), got {what} "
                         f"(x of shape {list(x.shape)})")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: expected x with {weight.shape[1]} features (weight's F_in), got {x.shape[-1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: expected bias of shape [{weight.shape[0]}], got {list(bias.shape)}")
    for arg, t in (("adjacency", adjacency), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x and {arg} to have the same dtype, got {x.dtype} and {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected x and {arg} on the same device, got {x.device} and {t.device}")
    h = x.reshape(rows, x.shape[-1])
    if weight.shape[0] <= weight.shape[1]:
        out = torch.sparse.mm(adjacency, h @ weight.t())
    else:
        out = torch.sparse.mm(adjacency, h) @ weight.t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Graph(nn.Module):
    """The graph the :class:`GraphConv` and :class:`GraphReadout` layers of a model read (shared by them).

    Holds ``adjacency`` (sparse ``(N, N)``) and, for a padded batch of graphs, ``node_mask`` (bool
    ``(B, n)``: True on real nodes), both non-persistent buffers: ``.to()`` moves them, ``state_dict``
    leaves them out. :meth:`set` replaces them (moved to the module's device).

    Args:
        adjacency: the graph (node classification), or None to set per batch (:class:`GraphBatches`).
        node_mask: the real nodes of a padded batch, or None (every node is real).
    """

    def __init__(self, adjacency: torch.Tensor | None = None, node_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # tracks the module's device
        self.register_buffer("adjacency_", None, persistent=False)
        self.register_buffer("node_mask", None, persistent=False)
        if adjacency is not None:
            self.set(adjacency, node_mask)

    def set(self, adjacency: torch.Tensor, node_mask: torch.Tensor | None = None) -> None:
        """Make ``adjacency`` (and ``node_mask``) the graph of the next forward passes."""
        _check_adjacency("Graph.set", adjacency)
        if node_mask is not None:
            if node_mask.dtype != torch.bool or node_mask.dim() != 2:
                raise ValueError(f"Graph.set: expected node_mask to be a bool (B, n) tensor, got {node_mask.dtype} "
                                 f"of shape {list(node_mask.shape)}")
            if node_mask.numel() != adjacency.shape[0]:
                raise ValueError(f"Graph.set: expected node_mask with {adjacency.shape[0]} entries (the adjacency's "
                                 f"size), got shape {list(node_mask.shape)}")
            node_mask = node_mask.to(self.anchor.device)
        self.adjacency_ = adjacency.to(self.anchor.device)
        self.node_mask = node_mask

    @property
    def adjacency(self) -> torch.Tensor:
        if self.adjacency_ is None:
            raise RuntimeError("Graph: no adjacency set; call graph.set(adjacency) (GraphBatches does it per batch)")
        return self.adjacency_

    @property
    def num_nodes(self) -> int | None:
        return None if self.adjacency_ is None else int(self.adjacency_.shape[0])

    def extra_repr(self) -> str:
        if self.adjacency_ is None:
            return "unset"
        nnz = self.adjacency_._nnz() if self.adjacency_.layout == torch.sparse_coo else self.adjacency_.values().numel()
        return f"nodes={self.adjacency_.shape[0]}, nnz={nnz}"


class GraphConv(nn.Module):
    """Kipf & Welling's graph convolution ``Â X Wᵀ + b`` (:func:`graph_conv`) on a sparse ``Â``.

    Args:
        in_features: F_in.
        out_features: F_out.
        graph: the model's :class:`Graph` (read on every call), or None to pass the adjacency to ``forward``.
        bias: add a learnt bias (default True).

    ``forward(x, adjacency=None)``: ``x`` is ``(N, F_in)`` or ``(B, n, F_in)``; ``adjacency`` overrides
    the graph's. Weights: Glorot-uniform, bias zero (as the GCN paper).
    """

    def __init__(self, in_features: int, out_features: int, graph: Graph | None = None, *, bias: bool = True) -> None:
        super().__init__()
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GraphConv: expected {arg} to be an int >= 1, got {value!r}")
        if graph is not None and not isinstance(graph, Graph):
            raise TypeError(f"GraphConv: expected graph to be an llkern.Graph or None, got {type(graph).__name__}")
        self.in_features, self.out_features = in_features, out_features
        self.graph = graph
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = math.sqrt(6.0 / (self.in_features + self.out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor | None = None) -> torch.Tensor:
        if adjacency is None:
            if self.graph is None:
                raise ValueError("GraphConv: no adjacency: pass forward(x, adjacency) or build it with "
                                 "graph=Graph(...)")
            adjacency = self.graph.adjacency
        return graph_conv(x, adjacency, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class GraphReadout(nn.Module):
    """Per-graph mean of the real nodes' features: ``(B, n, C)`` → ``(B, C)`` (``graph.node_mask``
    selects the real nodes; without a mask, the mean over all n). ``(B, C)`` passes through unchanged."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        if not isinstance(graph, Graph):
            raise TypeError(f"GraphReadout: expected graph to be a llkern.nn.graph.Graph, got {type(graph).__name__}")
        self.graph = graph

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2:
            return h
        if h.dim() != 3:
            raise ValueError(f"GraphReadout: expected features of shape (B, n, C), got {list(h.shape)}")
        mask = self.graph.node_mask
        if mask is None:
            return h.mean(dim=1)
        if mask.shape != h.shape[:2]:
            raise ValueError(f"GraphReadout: the graph's node mask has shape {list(mask.shape)}, the features "
                             f"{list(h.shape)}; was the Graph set for this batch?")
        weights = mask.to(h.dtype).unsqueeze(-1)
        return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


@dataclass
class GraphSet:
    """Graphs for graph classification, padded to ``max_nodes`` nodes.

    Attributes:
        features: ``(G, max_nodes, F)`` node features, zero on padded nodes.
        num_nodes: ``(G,)`` real node counts.
        edges: per graph, its normalised ``(indices, values)`` (:func:`normalized_edges`).
        target: ``(G,)`` int64 class per graph.
        class_names: the class names, by index.
    """

    features: torch.Tensor
    num_nodes: torch.Tensor
    edges: list[tuple[torch.Tensor, torch.Tensor]]
    target: torch.Tensor
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.target)

    @property
    def max_nodes(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[2])

    def subset(self, index: torch.Tensor | Sequence[int]) -> GraphSet:
        """The graphs at ``index``, in that order."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return GraphSet(self.features[index], self.num_nodes[index], [self.edges[int(i)] for i in index],
                        self.target[index], self.class_names)

    def batch(self, graph: Graph, index: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Set ``graph`` to the block-diagonal ``Â`` and node mask of the graphs at ``index``; return their
        ``(features (B, max_nodes, F), target (B,))``."""
        index = torch.as_tensor(index, dtype=torch.int64)
        n = self.max_nodes
        adjacency = block_diagonal([self.edges[int(i)] for i in index], n)
        mask = torch.arange(n).unsqueeze(0) < self.num_nodes[index].unsqueeze(1)
        graph.set(adjacency.to(self.features.dtype), mask)
        return self.features[index], self.target[index]

    def batches(self, graph: Graph, batch_size: int = 32, *, shuffle: bool = False,
                seed: int | None = None) -> GraphBatches:
        """An iterable of ``(x, y)`` batches that sets ``graph`` for each (:class:`GraphBatches`)."""
        return GraphBatches(self, graph, batch_size, shuffle=shuffle, seed=seed)


class GraphBatches:
    """Batches of a :class:`GraphSet` for :class:`llkern.LocalTrainer` (or a loop): each iteration step
    sets the model's :class:`Graph` to the batch's block-diagonal ``Â`` and node mask, then yields
    ``(x (B, n_max, F), y (B,))``. Consume each batch before asking for the next (the trainer does).

    Args:
        data: the graphs.
        graph: the model's :class:`Graph`.
        batch_size: graphs per batch (the last batch may be smaller).
        shuffle: a new order every pass, from a generator seeded with ``seed``.
    """

    def __init__(self, data: GraphSet, graph: Graph, batch_size: int = 32, *, shuffle: bool = False,
                 seed: int | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"GraphBatches: expected batch_size to be an int >= 1, got {batch_size!r}")
        if not isinstance(graph, Graph):
            raise TypeError(f"GraphBatches: expected graph to be a llkern.nn.graph.Graph, got {type(graph).__name__}")
        self.data, self.graph, self.batch_size, self.shuffle = data, graph, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(0 if seed is None else seed)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield self.data.batch(self.graph, order[start:start + self.batch_size])
