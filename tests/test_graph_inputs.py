"""llkern.nn.graph and the graph loaders with unusual or bad input: blocks that do not fit block_diagonal,
unsorted blocks, multigraphs, integer dtypes, hybrid sparse tensors, tiny synthetic graphs, no classes."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from llkern.data.graphs import synthetic_graphs
from llkern.models.gcn import gcn_graphs, gcn_nodes
from llkern.nn.graph import (
    Graph,
    adjacency_from_networkx,
    block_diagonal,
    graph_conv,
    normalized_adjacency,
    normalized_edges,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse")


def test_block_diagonal_refuses_a_block_larger_than_block_size():
    edges = normalized_edges(torch.tensor([[0, 1, 2], [1, 2, 3]]), 4)
    # (indices outside the matrix made a sparse tensor whose use corrupted memory and killed the process)
    with pytest.raises(ValueError, match=r"outside the block's 0\.\.2"):
        block_diagonal([edges], 3)
    with pytest.raises(ValueError, match="block_size"):
        block_diagonal([edges], 0)
    with pytest.raises(ValueError, match=r"blocks\[0\]"):
        block_diagonal([(edges[0], edges[1][:-1])], 4)


def test_block_diagonal_coalesces_unsorted_blocks():
    indices, values = normalized_edges(torch.tensor([[0, 1, 2], [1, 2, 3]]), 4, dtype=torch.float64)
    want = block_diagonal([(indices, values)] * 2, 5)
    got = block_diagonal([(indices, values), (indices.flip(1), values.flip(0))], 5)
    assert got.is_coalesced()
    torch.testing.assert_close(got.to_dense(), want.to_dense())
    x, w = torch.randn(10, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(graph_conv(x, got, w), graph_conv(x, want, w))


def test_adjacency_from_networkx_multigraph_and_bad_input():
    multi = nx.MultiGraph([(0, 1), (0, 1), (1, 2), (2, 2)])  # (its edges are (u, v, key) triples)
    simple = nx.Graph([(0, 1), (1, 2)])
    torch.testing.assert_close(adjacency_from_networkx(multi).to_dense(), adjacency_from_networkx(simple).to_dense())
    directed = nx.MultiDiGraph([(0, 1), (1, 0), (1, 2)])
    torch.testing.assert_close(adjacency_from_networkx(directed).to_dense(),
                               adjacency_from_networkx(simple).to_dense())
    with pytest.raises(TypeError, match="networkx graph"):
        adjacency_from_networkx([(0, 1)])


def test_integer_dtype_for_the_adjacency_is_refused():
    with pytest.raises(TypeError, match="floating-point dtype"):  # (its values were all truncated to 0)
        normalized_adjacency(torch.tensor([[0], [1]]), 2, dtype=torch.int64)


def test_hybrid_sparse_adjacency_is_refused_by_name():
    hybrid = torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 5), (5, 5))
    with pytest.raises(ValueError, match="dense dimension"):
        graph_conv(torch.randn(5, 4), hybrid, torch.randn(3, 4))
    with pytest.raises(ValueError, match="dense dimension"):
        Graph(hybrid)


def test_synthetic_graphs_smallest_sizes():
    with pytest.raises(ValueError, match="min_nodes"):  # (networkx's Watts–Strogatz raised k > n)
        synthetic_graphs(2, min_nodes=3, max_nodes=4)
    with pytest.raises(ValueError, match="num_per_class"):
        synthetic_graphs(2.5)
    data = synthetic_graphs(2, min_nodes=4, max_nodes=4)
    assert len(data) == 8 and int(data.num_nodes.min()) >= 4


def test_gcn_needs_a_class():
    graph = Graph(normalized_adjacency(torch.tensor([[0], [1]]), 3))
    for build in (gcn_nodes, gcn_graphs):
        with pytest.raises(ValueError, match="num_classes"):
            build(graph, 4, 0)
