"""MOLE against end-to-end training of the same model, on vector, grid and graph data.

Four settings, each trained twice from the same initial weights with the same data, optimizer and
total epoch budget E:

* ``digits-mlp``   digits as 64-vectors, ``llkern.models.mlp`` (64 → 256 → 256 → 256 → 10), K = 3;
* ``digits-cnn``   digits as 1×8×8 images, ``llkern.models.digits_lenet_caffe`` (conv-pool | conv-pool | MLP), K = 3;
* ``karate``       Zachary's karate club, 3 labelled members per faction, the other 28 predicted,
                   ``llkern.models.gcn_nodes`` (2 graph convolutions), K = 2, full batch;
* ``graphs``       synthetic graphs from four networkx generators (``llkern.data.graphs.synthetic_graphs``),
                   ``llkern.models.gcn_graphs`` (3 graph convolutions, masked-mean readout), K = 3.

MOLE: ``LocalTrainer(mode="sequential")``, module k trained for E/K epochs by
``MutualInformation`` (−I(T; Y), matrix-based Rényi-2, T the module's output; for graphs the
per-graph readout), then frozen; the last module by cross-entropy through its head. End to end:
the same layers as one module with the last head, cross-entropy, E epochs. Adam with a one-cycle
schedule per training phase. Test accuracy of the last head, over seeds (the seed sets the split,
the labelled nodes, the initial weights and the order).

    OMP_NUM_THREADS=1 python bench/mole.py [--seeds 0 1 2] [--settings ...] [--out bench/results/mole-2026-11-23.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

import llkern
from llkern.data.graphs import karate_club, split_graphs, synthetic_graphs
from llkern.data.images import load_digits
from llkern.models import GraphHead, digits_lenet_caffe, gcn_graphs, gcn_nodes, mlp
from llkern.nn.graph import Graph
from llkern.nn.heads import LinearHead

SETTINGS = ("digits-mlp", "digits-cnn", "karate", "graphs")


@dataclass
class Setting:
    """One task: MOLE's modules and heads, the end-to-end module and head, data and budget."""

    modules: list[nn.Module]
    heads: list[nn.Module]
    readout: nn.Module | None
    train: object               # (x, y) tensors or an iterable of batches
    evaluate: Callable[[llkern.LocalNet], float]
    example: torch.Tensor
    epochs: int
    lr: float
    weight_decay: float
    steps_per_epoch: int
    batch_size: int = 64


def _digits_accuracy(x_test: torch.Tensor, y_test: torch.Tensor) -> Callable[[llkern.LocalNet], float]:
    @torch.no_grad()
    def evaluate(net: llkern.LocalNet) -> float:
        net.eval()
        return (net(x_test).argmax(1) == y_test).float().mean().item()
    return evaluate


def digits_mlp(seed: int, epochs: int) -> Setting:
    x, y, x_test, y_test = load_digits(seed=seed)
    x, x_test = x.flatten(1), x_test.flatten(1)
    torch.manual_seed(seed)
    model = mlp(in_features=64, width=256, depth=3)
    modules = [nn.Sequential(model.flatten, model.layer_0), model.layer_1, model.layer_2]
    heads = [LinearHead(10, 256) for _ in modules]
    return Setting(modules, heads, None, (x, y), _digits_accuracy(x_test, y_test), x[:2], epochs, 2e-3, 0.0,
                   -(-len(y) // 64))


def digits_cnn(seed: int, epochs: int) -> Setting:
    x, y, x_test, y_test = load_digits(seed=seed)
    torch.manual_seed(seed)
    lenet = digits_lenet_caffe()  # conv 1→20, ReLU, pool, conv 20→50, ReLU, pool, flatten, 200→500, ReLU, 500→10
    modules = [lenet[0:3], lenet[3:6], lenet[6:9]]
    heads = [LinearHead(10, 20), LinearHead(10, 50), LinearHead(10, 500)]
    return Setting(modules, heads, None, (x, y), _digits_accuracy(x_test, y_test), x[:2], epochs, 2e-3, 0.0,
                   -(-len(y) // 64))


def karate(seed: int, epochs: int) -> Setting:
    data = karate_club(labelled_per_class=3, seed=seed)
    torch.manual_seed(seed)
    graph = Graph(data.adjacency)
    model = gcn_nodes(graph, data.x.shape[1], 2, hidden=16, depth=2, dropout=0.5)
    modules = [model.layer_0, model.layer_1]
    heads = [LinearHead(2, 16) for _ in modules]
    test = ~data.labelled

    @torch.no_grad()
    def evaluate(net: llkern.LocalNet) -> float:
        net.eval()
        return (net(data.x).argmax(1)[test] == data.y[test]).float().mean().item()

    # the whole graph is one batch; an "epoch" is 10 full-batch steps
    return Setting(modules, heads, None, [(data.x, data.train_target())] * 10, evaluate, data.x, epochs, 1e-2, 5e-4,
                   10)


def graphs(seed: int, epochs: int) -> Setting:
    train, test = split_graphs(synthetic_graphs(100, seed=seed), 0.3, seed=seed)
    torch.manual_seed(seed)
    graph = Graph()
    model = gcn_graphs(graph, train.num_features, 4, hidden=32, depth=3)
    modules = [model.layer_0, model.layer_1, model.layer_2]
    heads = [GraphHead(4, 32, graph) for _ in modules]
    batches = train.batches(graph, 32, shuffle=True, seed=seed)
    example, _ = train.batch(graph, [0, 1])

    @torch.no_grad()
    def evaluate(net: llkern.LocalNet) -> float:
        net.eval()
        correct = 0
        for xb, yb in test.batches(graph, 64):
            correct += (net(xb).argmax(1) == yb).sum().item()
        return correct / len(test)

    return Setting(modules, heads, model.readout, batches, evaluate, example, epochs, 5e-3, 0.0, len(batches))


BUILDERS = {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn, "karate": karate, "graphs": graphs}
EPOCHS = {"digits-mlp": 30, "digits-cnn": 30, "karate": 20, "graphs": 60}


def build(setting: Setting, method: str, seed: int) -> tuple[llkern.LocalNet, llkern.LocalTrainer, int]:
    """The net and trainer of one setting as MOLE (``"mole"``) or end to end (``"e2e"``), and its epoch count."""
    modules, heads = setting.modules, setting.heads  # built per run from the seed: the same initial weights
    if method == "mole":
        K = len(modules)
        losses = [llkern.MutualInformation(readout=setting.readout) for _ in range(K)]
        net = llkern.LocalNet(modules, heads=heads, losses=losses, example_input=setting.example)
        phase, mode, epochs_per_module = setting.epochs // K, "sequential", setting.epochs // K
        epochs = epochs_per_module * K
    elif method == "e2e":
        net = llkern.LocalNet([nn.Sequential(*modules)], heads=[heads[-1]], losses=llkern.CrossEntropy(),
                              example_input=setting.example)
        phase, mode, epochs_per_module = setting.epochs, "simultaneous", 1
        epochs = setting.epochs
    else:
        raise ValueError(f"expected method 'mole' or 'e2e', got {method!r}")
    trainer = llkern.LocalTrainer(
        net, mode=mode, epochs_per_module=epochs_per_module, seed=seed, measure_memory=False,
        optimizer=lambda p: torch.optim.AdamW(p, lr=setting.lr, weight_decay=setting.weight_decay),
        scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=setting.lr,
                                                                  total_steps=phase * setting.steps_per_epoch),
        scheduler_interval="step")
    return net, trainer, epochs


def train(setting: Setting, method: str, seed: int) -> tuple[float, llkern.LocalTrainer]:
    """Train one setting as MOLE (``"mole"``) or end to end (``"e2e"``); the test accuracy and the trainer."""
    net, trainer, epochs = build(setting, method, seed)
    trainer.fit(setting.train, epochs, batch_size=setting.batch_size, progress=False)
    return setting.evaluate(net), trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=None, help="override every setting's epoch budget E")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], float] = {}
    jobs = [(s, m, seed) for s in args.settings for m in ("mole", "e2e") for seed in args.seeds]
    for name, method, seed in tqdm(jobs, desc="runs"):
        setting = BUILDERS[name](seed, args.epochs or EPOCHS[name])
        start = time.perf_counter()
        accuracy, _ = train(setting, method, seed)
        seconds[name, method] = seconds.get((name, method), 0.0) + time.perf_counter() - start
        results.setdefault((name, method), []).append(accuracy)
        tqdm.write(f"{name:11s} {method:4s} seed {seed}: {100 * accuracy:.2f} %")
    lines = table(args, results, seconds)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def table(args: argparse.Namespace, results: dict, seconds: dict) -> list[str]:
    command = "OMP_NUM_THREADS=1 python bench/mole.py " + " ".join(sys.argv[1:])
    lines = ["| setting | K | epochs E | MOLE (%) | end to end (%) | MOLE − e2e (points) | MOLE per seed | "
             "e2e per seed | s per run (MOLE / e2e) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.settings:
        mole, e2e = results[name, "mole"], results[name, "e2e"]
        k = {"karate": 2}.get(name, 3)
        gap = 100 * (statistics.mean(mole) - statistics.mean(e2e))
        per = [", ".join(f"{100 * a:.2f}" for a in r) for r in (mole, e2e)]
        time_per = " / ".join(f"{seconds[name, m] / len(args.seeds):.1f}" for m in ("mole", "e2e"))
        lines.append(f"| {name} | {k} | {args.epochs or EPOCHS[name]} | {_mean_std(mole)} | {_mean_std(e2e)} | "
                     f"{gap:+.2f} | {per[0]} | {per[1]} | {time_per} |")
    header = [
        "# MOLE against end-to-end training of the same model (CPU, 2026-11-23)", "",
        f"`{command.strip()}` (seeds {', '.join(map(str, args.seeds))}; torch {torch.__version__}, CPU, 1 thread).", "",
        "Test accuracy of the last head. MOLE: `LocalTrainer(mode=\"sequential\")`, module k trained alone for E/K "
        "epochs by `MutualInformation` (−I(T; Y), matrix-based Rényi-2, T the module's output, for graphs the "
        "per-graph masked-mean readout), then frozen; the last module by cross-entropy. End to end: the same layers "
        "and last head, one module, cross-entropy, E epochs. Same initial weights, data, AdamW and one-cycle "
        "schedule per phase. The seed sets the split, the labelled nodes, the weights and the order.", "",
        "- digits-mlp: scikit-learn digits as 64-vectors (1437 train / 360 test), MLP 64→256→256→256→10, "
        "a module per hidden layer; lr 2e-3, batch 64.",
        "- digits-cnn: digits as 1×8×8 images, LeNet-5-Caffe (conv-pool | conv-pool | 200→500 MLP); lr 2e-3, batch 64.",
        "- karate: Zachary's karate club (networkx), 3 labelled members per faction, the other 28 predicted; "
        "2-layer GCN (identity features, 16 hidden, dropout 0.5) on the sparse normalised adjacency, a module per "
        "layer; full batch, an epoch is 10 steps; lr 1e-2, weight decay 5e-4.",
        "- graphs: **synthetic** graphs from networkx generators (Erdős–Rényi, Barabási–Albert, Watts–Strogatz, "
        "2-D grids; 100 each, 12–24 nodes, one-hot degree features), 280 train / 120 test; 3-layer GCN (32 hidden) "
        "on block-diagonal sparse adjacencies of padded batches, masked-mean readout; lr 5e-3, batch 32.", "",
    ]
    return header + lines


if __name__ == "__main__":
    main()
