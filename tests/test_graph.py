"""Graph convolution on a sparse adjacency (llkern.nn.graph): dense float64 references, gradcheck, a 100k-node
graph in memory linear in edges, batches of padded graphs, the graph data and errors."""

import re
import sys

import pytest
import torch
from torch import nn

import llkern
from llkern.data.graphs import GRAPH_CLASSES, karate_club, split_graphs, synthetic_graphs
from llkern.nn.graph import (
    Graph,
    GraphBatches,
    GraphConv,
    GraphReadout,
    adjacency_from_networkx,
    block_diagonal,
    graph_conv,
    normalized_adjacency,
    normalized_edges,
)


def random_edges(n, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (2, e), generator=g)


def dense_reference(edge_index, n, self_loops=True):
    """D^-1/2 (A + I) D^-1/2 from its definition, dense float64 (A symmetric 0/1, no self-loops of its own)."""
    a = torch.zeros(n, n, dtype=torch.float64)
    a[edge_index[0], edge_index[1]] = 1.0
    a = torch.maximum(a, a.t())
    a.fill_diagonal_(0.0)
    if self_loops:
        a += torch.eye(n, dtype=torch.float64)
    degree = a.sum(1)
    inv = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    return inv[:, None] * a * inv[None, :]


@pytest.mark.parametrize("self_loops", [True, False])
def test_normalized_adjacency_matches_the_dense_definition(self_loops):
    edges = random_edges(13, 40)  # has duplicates, both directions and self-loops
    edges = torch.cat([edges, torch.tensor([[3, 3], [5, 5]])], dim=1)
    adjacency = normalized_adjacency(edges, 13, self_loops=self_loops, dtype=torch.float64)
    assert adjacency.layout == torch.sparse_coo and adjacency.is_coalesced()
    torch.testing.assert_close(adjacency.to_dense(), dense_reference(edges, 13, self_loops))
    csr = normalized_adjacency(edges, 13, self_loops=self_loops, layout="csr", dtype=torch.float64)
    assert csr.layout == torch.sparse_csr
    torch.testing.assert_close(csr.to_dense(), dense_reference(edges, 13, self_loops))


def test_adjacency_from_networkx():
    import networkx as nx

    g = nx.karate_club_graph()
    adjacency = adjacency_from_networkx(g, dtype=torch.float64)
    edges = torch.tensor(list(g.edges)).t()
    assert adjacency._nnz() == 34 + 2 * 78
    torch.testing.assert_close(adjacency.to_dense(), dense_reference(edges, 34))


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("f_in,f_out", [(7, 3), (3, 11)])  # both product orders: Â(XWᵀ) and (ÂX)Wᵀ
@pytest.mark.parametrize("batched", [False, True])
def test_graph_conv_matches_dense_float64(layout, f_in, f_out, batched):
    torch.manual_seed(0)
    n = 15
    adjacency = normalized_adjacency(random_edges(n, 30), n, layout=layout, dtype=torch.float64)
    dense = adjacency.to_dense()
    x = torch.randn(f_in, n, dtype=torch.float64).t()  # non-contiguous
    if batched:
        x = torch.randn(3, 5, f_in, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_(True)
    weight = torch.randn(f_out, f_in, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(f_out, dtype=torch.float64, requires_grad=True)
    out = graph_conv(x, adjacency, weight, bias)
    expected = dense @ x.reshape(n, f_in) @ weight.t() + bias
    assert out.shape == (*x.shape[:-1], f_out)
    torch.testing.assert_close(out.reshape(n, f_out), expected)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out.reshape(n, f_out), (x, weight, bias), grad)
    want = torch.autograd.grad(expected, (x, weight, bias), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    # the formulas: dX = Âᵀ G W, dW = Gᵀ Â X
    torch.testing.assert_close(got[0].reshape(n, f_in), dense.t() @ grad @ weight)
    torch.testing.assert_close(got[1], grad.t() @ dense @ x.detach().reshape(n, f_in))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_graph_conv_gradcheck(layout):
    torch.manual_seed(1)
    adjacency = normalized_adjacency(random_edges(9, 14), 9, layout=layout, dtype=torch.float64)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: graph_conv(x, adjacency, w, b), (x, weight, bias))
    assert torch.autograd.gradgradcheck(lambda x, w: graph_conv(x, adjacency, w), (x, weight))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_graph_conv_under_autocast_runs_in_the_adjacency_dtype(layout):
    torch.manual_seed(2)
    adjacency = normalized_adjacency(random_edges(11, 20), 11, layout=layout)
    x = torch.randn(11, 4).bfloat16().requires_grad_()  # a 16-bit output of an earlier module
    weight = torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = graph_conv(x, adjacency, weight)
    out.square().sum().backward()  # the backward runs outside autocast: float32 Â meets this gradient
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = graph_conv(x32, adjacency, w32)
    expected.square().sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weight.grad, w32.grad)
    torch.testing.assert_close(x.grad, x32.grad.bfloat16())


def test_graph_conv_module_and_graph_move_together():
    graph = Graph(normalized_adjacency(random_edges(6, 8), 6))
    conv = GraphConv(4, 3, graph)
    x = torch.randn(6, 4)
    torch.testing.assert_close(conv(x), graph_conv(x, graph.adjacency, conv.weight, conv.bias))
    assert "adjacency_" not in conv.state_dict() and set(conv.state_dict()) == {"weight", "bias"}
    double = nn.Sequential(conv).double()  # .to() reaches the shared graph's sparse buffer
    assert graph.adjacency.dtype == torch.float64 and double(x.double()).dtype == torch.float64
    other = normalized_adjacency(random_edges(6, 3, seed=2), 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x.double(), other), graph_conv(x.double(), other, conv.weight, conv.bias))


def _status_bytes(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_100k_node_graph_memory_is_linear_in_edges():
    """Forward and backward on a random graph of 100 000 nodes and 500 000 edges: Â holds N + 2E entries and
    the op's peak memory is a few times the sparse Â's size; a dense Â would be N²·4 bytes = 40 GB."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n, e, f = 100_000, 500_000, 16
        adjacency = normalized_adjacency(random_edges(n, e), n)
        nnz = adjacency._nnz()
        assert n + 2 * e * 0.99 < nnz <= n + 2 * e  # a few random pairs repeat
        sparse_bytes = nnz * (2 * 8 + 4)  # int64 row and column, float32 value
        x = torch.randn(n, f, requires_grad=True)
        conv = GraphConv(f, 8, Graph(adjacency))
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset the peak resident size to the current one
        except OSError:
            pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
        before = _status_bytes("VmRSS")
        out = conv(x)
        out.square().mean().backward()
        growth = _status_bytes("VmHWM") - before
        assert x.grad.shape == (n, f) and torch.isfinite(x.grad).all() and conv.weight.grad.abs().sum() > 0
        dense_bytes = n * n * 4
        assert growth < 8 * sparse_bytes + 16 * n * f * 4, (growth, sparse_bytes)
        assert growth < dense_bytes / 1000
    finally:
        torch.set_num_threads(threads)


def test_block_diagonal_batches_match_graph_by_graph():
    data = synthetic_graphs(3, seed=1)
    graph = Graph()
    conv = GraphConv(data.num_features, 5, graph)
    readout = GraphReadout(graph)
    x, y = data.batch(graph, [4, 0, 7])
    assert x.shape == (3, data.max_nodes, data.num_features) and y.tolist() == data.target[[4, 0, 7]].tolist()
    out = readout(conv(x))
    for row, i in enumerate([4, 0, 7]):
        n = int(data.num_nodes[i])
        idx, val = data.edges[i]
        block = torch.sparse_coo_tensor(idx, val, (n, n), check_invariants=True)
        alone = graph_conv(data.features[i, :n], block, conv.weight, conv.bias)
        torch.testing.assert_close(out[row], alone.mean(0))
    batches = GraphBatches(data, graph, batch_size=5, shuffle=True, seed=0)
    seen = []
    for xb, yb in batches:
        assert graph.adjacency.shape[0] == xb.shape[0] * xb.shape[1] == graph.node_mask.numel()
        seen += yb.tolist()
    assert len(batches) == 3 and sorted(seen) == sorted(data.target.tolist())


def test_graph_data():
    karate = karate_club(labelled_per_class=2, seed=3)
    assert karate.x.shape == (34, 34) and karate.y.bincount().tolist() == [17, 17]
    assert karate.labelled.sum() == 4 and karate.y[karate.labelled].bincount().tolist() == [2, 2]
    train, test = karate.train_target(), karate.test_target()
    assert ((train != -100) == karate.labelled).all() and ((test != -100) == ~karate.labelled).all()
    assert karate_club(features="degree").x.shape == (34, 18)
    data = synthetic_graphs(10, seed=0)
    assert len(data) == 40 and data.target.bincount().tolist() == [10] * 4 and data.class_names == GRAPH_CLASSES
    assert torch.equal(synthetic_graphs(10, seed=0).features, data.features)  # fixed by the seed
    padded = torch.arange(data.max_nodes)[None, :] >= data.num_nodes[:, None]
    assert (data.features[padded] == 0).all() and (data.features[~padded].sum(-1) == 1).all()
    a, b = split_graphs(data, 0.3, seed=0)
    assert len(a) + len(b) == 40 and b.target.bincount().tolist() == [3] * 4


def test_errors():
    adjacency = normalized_adjacency(random_edges(5, 6), 5)
    x, weight = torch.randn(5, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"edge_index of shape \(2, E\)"):
        normalized_adjacency(torch.zeros(3, 4, dtype=torch.int64), 5)
    with pytest.raises(TypeError, match="integer edge_index"):
        normalized_adjacency(torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        normalized_adjacency(torch.tensor([[0], [5]]), 5)
    with pytest.raises(ValueError, match="num_nodes"):
        normalized_adjacency(torch.tensor([[0], [1]]), 0)
    with pytest.raises(ValueError, match="layout"):
        normalized_adjacency(torch.tensor([[0], [1]]), 2, layout="dense")
    with pytest.raises(TypeError, match="sparse COO or CSR"):
        graph_conv(x, adjacency.to_dense(), weight)
    with pytest.raises(ValueError, match="square"):
        graph_conv(x, torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.ones(1), (5, 6)), weight)
    with pytest.raises(ValueError, match="with 5 nodes"):
        graph_conv(torch.randn(4, 3), adjacency, weight)
    with pytest.raises(ValueError, match=r"2·3 = 6"):
        graph_conv(torch.randn(2, 3, 3), adjacency, weight)
    with pytest.raises(ValueError, match="3 features"):
        graph_conv(torch.randn(5, 4), adjacency, weight)
    with pytest.raises(ValueError, match="x of shape"):
        graph_conv(torch.randn(5), adjacency, weight)
    with pytest.raises(TypeError, match="x and adjacency to have the same dtype"):
        graph_conv(x.double(), adjacency, weight.double())
    with pytest.raises(TypeError, match="x and weight to have the same dtype"):
        graph_conv(x, adjacency, weight.double())
    with pytest.raises(ValueError, match="bias of shape"):
        graph_conv(x, adjacency, weight, torch.zeros(3))
    with pytest.raises(ValueError, match="no adjacency"):
        GraphConv(3, 2)(x)
    with pytest.raises(RuntimeError, match="no adjacency set"):
        GraphConv(3, 2, Graph())(x)
    with pytest.raises(ValueError, match="in_features"):
        GraphConv(0, 2)
    with pytest.raises(ValueError, match="node_mask"):
        Graph(adjacency, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch_size"):
        GraphBatches(synthetic_graphs(1), Graph(), batch_size=0)


def test_exports():
    for name in ("Graph", "GraphConv", "GraphReadout", "graph_conv", "normalized_adjacency"):
        assert name in llkern.__all__ and hasattr(llkern, name)
    from llkern import models

    assert {"GCNLayer", "GraphHead", "gcn_graphs", "gcn_nodes"} <= set(models.__all__)
    assert block_diagonal is llkern.nn.graph.block_diagonal and normalized_edges is llkern.nn.graph.normalized_edges
