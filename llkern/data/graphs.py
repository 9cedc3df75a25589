"""Graph data for MOLE's graph tasks, from networkx (nothing is downloaded).

* :func:`karate_club` — node classification on a real graph: Zachary's karate club (34 members, 78
  friendships, the two factions after the split as labels), a few labelled members per faction, the
  rest predicted.
* :func:`synthetic_graphs` — graph classification on **synthetic** graphs made by networkx's random
  generators (Erdős–Rényi, Barabási–Albert, Watts–Strogatz, 2-D grids); the class is the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llkern.nn.graph import GraphSet, adjacency_from_networkx, normalized_edges

__all__ = ["GRAPH_CLASSES", "NodeData", "karate_club", "split_graphs", "synthetic_graphs"]

IGNORE_INDEX = -100
GRAPH_CLASSES = ("erdos_renyi", "barabasi_albert", "watts_strogatz", "grid")


def _networkx():
    try:
        import networkx
    except ImportError as error:  # torch depends on networkx, so this is rare
        raise ImportError("llkern.data.graphs needs networkx: pip install networkx") from error
    return networkx


@dataclass
class NodeData:
    """One graph for node classification.

    Attributes:
        x: ``(N, F)`` node features.
        y: ``(N,)`` int64 labels of every node.
        adjacency: sparse ``Â`` (:func:`llkern.nn.graph.normalized_adjacency`).
        labelled: ``(N,)`` bool, the nodes whose labels training may see.
        class_names: names of the labels.
    """

    x: torch.Tensor
    y: torch.Tensor
    adjacency: torch.Tensor
    labelled: torch.Tensor
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.y.max()) + 1

    def train_target(self) -> torch.Tensor:
        """``y`` on the labelled nodes, ``-100`` (ignore_index) elsewhere."""
        return torch.where(self.labelled, self.y, torch.full_like(self.y, IGNORE_INDEX))

    def test_target(self) -> torch.Tensor:
        """``y`` on the nodes to predict, ``-100`` on the labelled ones."""
        return torch.where(self.labelled, torch.full_like(self.y, IGNORE_INDEX), self.y)


def karate_club(labelled_per_class: int = 3, *, features: str = "identity", seed: int = 0) -> NodeData:
    """Zachary's karate club (``networkx.karate_club_graph``) for semi-supervised node classification.

    Labels: the ``"club"`` attribute, 0 = ``"Mr. Hi"`` (17 members), 1 = ``"Officer"`` (17). Features:
    ``"identity"`` (default; one-hot node id, 34 features, as the GCN paper's karate example) or
    ``"degree"`` (one-hot degree, the last of 18 bins holding degrees ≥ 17). ``labelled_per_class``
    members of each faction, drawn with ``seed``, are labelled; the other ``34 − 2·labelled_per_class``
    are predicted. Edges are unweighted (the graph's ``weight`` attribute is not used).
    """
    if isinstance(labelled_per_class, bool) or not isinstance(labelled_per_class, int) \
            or not 1 <= labelled_per_class <= 16:
        raise ValueError(f"karate_club: expected labelled_per_class in 1..16, got {labelled_per_class!r}")
    if features not in ("identity", "degree"):
        raise ValueError(f"karate_club: expected features to be 'identity' or 'degree', got {features!r}")
    nx = _networkx()
    g = nx.karate_club_graph()
    nodes = list(g.nodes)
    names = ("Mr. Hi", "Officer")
    y = torch.tensor([names.index(g.nodes[v]["club"]) for v in nodes], dtype=torch.int64)
    if features == "identity":
        x = torch.eye(len(nodes))
    else:
        degree = torch.tensor([g.degree(v) for v in nodes]).clamp_max(17)
        x = torch.nn.functional.one_hot(degree, 18).float()
    generator = torch.Generator().manual_seed(seed)
    labelled = torch.zeros(len(nodes), dtype=torch.bool)
    for c in range(len(names)):
        members = torch.nonzero(y == c).flatten()
        labelled[members[torch.randperm(len(members), generator=generator)[:labelled_per_class]]] = True
    return NodeData(x, y, adjacency_from_networkx(g), labelled, names)


def _grid(nx, n: int, rng):
    rows = int(rng.integers(3, 5 + 1))
    return nx.grid_2d_graph(rows, max(2, round(n / rows)))


def synthetic_graphs(num_per_class: int = 100, *, min_nodes: int = 12, max_nodes: int = 24, max_degree: int = 8,
                     seed: int = 0) -> GraphSet:
    """A **synthetic** graph-classification set: ``num_per_class`` graphs from each of four networkx generators.

    Classes (:data:`GRAPH_CLASSES`), each graph with n nodes drawn uniformly in ``[min_nodes, max_nodes]``:
    0 Erdős–Rényi ``G(n, p = 4/(n−1))``, 1 Barabási–Albert (m = 2), 2 Watts–Strogatz (k = 4, rewiring
    p = 0.1), 3 a 2-D grid of 3 to 5 rows and ``round(n/rows)`` columns. The mean degrees are close
    (about 3.3 to 4); what tells the classes apart is the shape of the degree distribution and the
    local structure. Node features: one-hot degree (``max_degree + 1`` bins, the last one for degrees
    ≥ ``max_degree``). Graphs are padded to the largest node count (at most ``max(max_nodes, 5·⌈max_nodes/3⌉)``).
    Everything is fixed by ``seed`` (NumPy's generator feeds networkx's seeds).
    """
    import numpy as np

    counts = (num_per_class, min_nodes, max_nodes, max_degree)
    # min_nodes >= 4: Watts–Strogatz with k = 4 neighbours needs n >= 4 (networkx raised for 3)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in counts) or num_per_class < 1 \
            or not 4 <= min_nodes <= max_nodes or max_degree < 1:
        raise ValueError(f"synthetic_graphs: expected ints num_per_class >= 1, 4 <= min_nodes <= max_nodes and "
                         f"max_degree >= 1, got {num_per_class!r}, {min_nodes!r}, {max_nodes!r}, {max_degree!r}")
    nx = _networkx()
    rng = np.random.default_rng(seed)
    graphs, labels = [], []
    for _ in range(num_per_class):
        for c in range(len(GRAPH_CLASSES)):
            n = int(rng.integers(min_nodes, max_nodes + 1))
            s = int(rng.integers(2**31))
            if c == 0:
                g = nx.gnp_random_graph(n, 4.0 / (n - 1), seed=s)
            elif c == 1:
                g = nx.barabasi_albert_graph(n, 2, seed=s)
            elif c == 2:
                g = nx.watts_strogatz_graph(n, 4, 0.1, seed=s)
            else:
                g = _grid(nx, n, rng)
            graphs.append(nx.convert_node_labels_to_integers(g))
            labels.append(c)
    n_max = max(g.number_of_nodes() for g in graphs)
    features = torch.zeros(len(graphs), n_max, max_degree + 1)
    num_nodes = torch.tensor([g.number_of_nodes() for g in graphs])
    edges = []
    for i, g in enumerate(graphs):
        degree = torch.tensor([d for _, d in sorted(g.degree)]).clamp_max(max_degree)
        features[i, :len(degree)] = torch.nn.functional.one_hot(degree, max_degree + 1).float()
        edge_index = torch.tensor(list(g.edges), dtype=torch.int64).reshape(-1, 2).t()
        edges.append(normalized_edges(edge_index, g.number_of_nodes()))
    return GraphSet(features, num_nodes, edges, torch.tensor(labels), GRAPH_CLASSES)


def split_graphs(data: GraphSet, test_fraction: float = 0.3, *, seed: int = 0) -> tuple[GraphSet, GraphSet]:
    """A stratified ``(train, test)`` split of a :class:`~llkern.nn.graph.GraphSet`, fixed by ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split_graphs: expected test_fraction in (0, 1), got {test_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(data.target).tolist():
        members = torch.nonzero(data.target == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * test_fraction)
        test.append(members[:cut])
        train.append(members[cut:])
    return data.subset(torch.cat(train).sort().values), data.subset(torch.cat(test).sort().values)
