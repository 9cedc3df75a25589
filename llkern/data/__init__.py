"""Datasets read from local files: scikit-learn's digits, CIFAR-10 (binary or Python format, no
download), and graphs from networkx."""

from llkern.data.graphs import karate_club, split_graphs, synthetic_graphs
from llkern.data.images import load_cifar10, load_digits

__all__ = ["karate_club", "load_cifar10", "load_digits", "split_graphs", "synthetic_graphs"]
