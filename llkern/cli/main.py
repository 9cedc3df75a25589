"""The ``llkern`` command line.

    llkern train [--recipe FILE] [--model digits-resnet] [-k 4] [--split saved_bytes] [--loss ce]
                 [--mode simultaneous] [--data digits] [--epochs 10] [--precision fp32] [--seed 0]
                 [--log run.json] [--checkpoint run.pt] [--resume] ...
    llkern compress ...   (the MIRACLE demonstration: python -m llkern.cli.compress_demo --help)

``train`` builds the model, cuts it into K local modules with the split planner
(:func:`llkern.split`), trains them with :class:`llkern.LocalTrainer` (a progress bar; one log row
per epoch with each module's loss and accuracy, the step time and the peak saved bytes) and prints
the test accuracy of the last head. ``-k 1`` is end-to-end training of the same model. A recipe is
a JSON file of option values (``{"model": "resnet32", "k": 4, ...}``, names as the long options with
``_`` for ``-``); options given on the command line override it. recipes/ holds the published
settings.

MOLE (docs/mole.md): ``--loss mi --mode sequential`` on digits as vectors (``--data digits-vectors
--model mlp``), as images (``--data digits --model digits-cnn``) and on graphs with ``--model gcn``:
``--data karate`` (node classification on Zachary's karate club, ``--labelled-per-class`` labelled
members per faction, the others predicted; the whole graph is one batch and an epoch is 10 steps on
it) or ``--data synthetic-graphs`` (graph classification on synthetic networkx graphs). A GCN is cut
into K modules of whole graph-convolution layers (``--gcn-depth`` layers, K ≤ depth).

Data parallel: ``torchrun --nproc-per-node N -m llkern train --distributed ...`` (every module under its
own ``DistributedDataParallel``; ``--batch-size`` is the global batch; write ``--log-file`` for ``--log``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["build_parser", "main", "train"]

MODELS = ("digits-resnet", "digits-lenet", "digits-cnn", "mlp", "transformer", "resnet32", "resnet110", "vgg11",
          "vgg16", "gcn")
LOSSES = ("ce", "trgl", "supcon", "mi", "infopro")
HEADS = ("auto", "linear", "mlp-sr", "infopro")
DATA = ("digits", "digits-vectors", "cifar10", "karate", "synthetic-graphs")
GRAPH_DATA = ("karate", "synthetic-graphs")
GRAPH_LOSSES = ("ce", "mi")
# every option with a fixed set of values: argparse checks the command line, _parse checks a recipe
CHOICES = {"model": MODELS, "split": ("layers", "params", "saved_bytes"), "loss": LOSSES, "heads": HEADS,
           "context": (None, "E", "R", "RE"), "mode": ("simultaneous", "sequential"), "data": DATA,
           "optimizer": ("sgd", "adam"), "schedule": ("constant", "cosine", "onecycle"),
           "precision": ("fp32", "bf16", "fp16")}


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser; ``defaults`` (a recipe's values) replace train's defaults."""
    parser = argparse.ArgumentParser(prog="llkern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a network with local learning")
    train.add_argument("--recipe", help="a JSON file of option values (the command line overrides it)")
    train.add_argument("--model", choices=MODELS, default="digits-resnet")
    train.add_argument("-k", "--modules", dest="k", type=int, default=4, help="K local modules (1: end to end)")
    train.add_argument("--split", choices=CHOICES["split"], default="saved_bytes",
                       help="how the planner balances the modules")
    train.add_argument("--loss", choices=LOSSES, default="ce",
                       help="local loss: cross-entropy, TRGL (--tau), supervised contrastive, mutual information, "
                            "InfoPro (reconstruction + supervised contrastive; published weights for ResNet-32/110)")
    train.add_argument("--heads", choices=HEADS, default="auto",
                       help="auxiliary heads (auto: linear; projection heads for supcon, InfoPro's for infopro, "
                            "token classifiers for the transformer)")
    train.add_argument("--relu-masks", action="store_true", help="save 1-bit ReLU masks (llkern.nn.activation_memory)")
    train.add_argument("--recompute-bn-relu", action="store_true",
                       help="recompute BatchNorm+ReLU in the backward instead of saving their outputs")
    train.add_argument("--tau", type=float, default=1.0, help="TRGL's transport weight 1/τ")
    train.add_argument("--context", choices=CHOICES["context"][1:], default=None,
                       help="ContSup context supply for modules 1..K-1 (image encoder, previous boundary, both)")
    train.add_argument("--mode", choices=CHOICES["mode"], default="simultaneous")
    train.add_argument("--epochs", type=int, default=10,
                       help="epochs in all (sequential mode: each module gets epochs / K)")
    train.add_argument("--data", choices=DATA, default="digits")
    train.add_argument("--data-root", help="CIFAR-10's folder (the binary or Python distribution, extracted)")
    train.add_argument("--labelled-per-class", type=int, default=3,
                       help="karate: labelled members per faction (the others are predicted)")
    train.add_argument("--gcn-depth", type=int, default=None,
                       help="gcn: graph-convolution layers (default 2 for karate, 3 for synthetic-graphs)")
    train.add_argument("--gcn-hidden", type=int, default=None,
                       help="gcn: hidden features (default 16 for karate, 32 for synthetic-graphs)")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--optimizer", choices=CHOICES["optimizer"], default="adam")
    train.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default: sgd 0.1, adam 2e-3; adam on karate 1e-2, "
                            "synthetic-graphs 5e-3)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--schedule", choices=CHOICES["schedule"], default="onecycle")
    train.add_argument("--precision", choices=CHOICES["precision"], default="fp32")
    train.add_argument("--clip", type=float, default=None, help="largest gradient norm per module")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log", "--log-file", dest="log",
                       help="per-epoch log file (.json, .jsonl or .csv); under torchrun write --log-file (torchrun "
                            "takes --log for an abbreviation of its own options)")
    train.add_argument("--checkpoint", help="save the trainer here after each epoch")
    train.add_argument("--resume", action="store_true",
                       help="continue from --checkpoint (with the same options: a schedule's length is the first "
                            "run's --epochs)")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--distributed", action="store_true",
                       help="data parallel over the processes torchrun starts (gloo on the CPU, nccl on CUDA, one "
                            "GPU per process by LOCAL_RANK); --batch-size is the global batch; rank 0 prints, logs "
                            "and checkpoints")
    train.set_defaults(**(defaults or {}))
    commands.add_parser("compress", help="MIRACLE compression demo (python -m llkern.cli.compress_demo --help)",
                        add_help=False)
    return parser


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse ``argv``; with ``--recipe``, the recipe's values become the defaults the command line overrides."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "recipe", None) is None:
        return parser, args
    path = Path(args.recipe)
    if not path.is_file():
        parser.error(f"--recipe: {path} does not exist")
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        parser.error(f"--recipe: {path} is not valid JSON ({error})")
    if not isinstance(recipe, dict):
        parser.error(f"--recipe: {path} must hold a JSON object of option values")
    recipe.pop("description", None)  # a recipe may say what it reproduces
    unknown = sorted(set(recipe) - set(vars(parser.parse_args(["train"]))))
    if unknown:
        parser.error(f"--recipe: {path} has unknown options {unknown}")
    for name, value in recipe.items():  # argparse checks choices on the command line only, not on defaults
        if name in CHOICES and value not in CHOICES[name]:
            parser.error(f"--recipe: {path} sets {name} to {value!r}; expected one of {list(CHOICES[name])}")
    parser = build_parser(recipe)
    return parser, parser.parse_args(argv)


def _data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from llkern.data.images import load_cifar10, load_digits

    if args.data == "digits":
        return load_digits(seed=args.seed)
    if args.data == "digits-vectors":
        x, y, x_test, y_test = load_digits(seed=args.seed)
        return x.flatten(1), y, x_test.flatten(1), y_test
    if args.data_root is None:
        raise SystemExit("llkern train: --data cifar10 needs --data-root (the extracted CIFAR-10 folder; nothing "
                         "is downloaded)")
    x, y = load_cifar10(args.data_root, train=True, normalize=True)
    x_test, y_test = load_cifar10(args.data_root, train=False, normalize=True)
    return x, y, x_test, y_test


def _model(name: str, example: torch.Tensor) -> nn.Sequential:
    """The model as one nn.Sequential of cuttable units."""
    from llkern import models

    channels = example.shape[1] if example.dim() == 4 else None
    if name == "digits-resnet":
        model = models.digits_resnet(1)[0]
    elif name == "digits-lenet":
        model = models.digits_lenet()
    elif name == "digits-cnn":
        model = models.digits_lenet_caffe()
    elif name == "gcn":
        raise SystemExit("llkern train: --model gcn needs graph data (--data karate or --data synthetic-graphs)")
    elif name == "mlp":
        model = models.mlp(in_features=example[0].numel())
    elif name == "transformer":
        model = models.transformer_encoder(in_channels=channels or 1, image_size=example.shape[-1])
    else:
        model = {"resnet32": models.resnet32, "resnet110": models.resnet110, "vgg11": models.vgg11,
                 "vgg16": models.vgg16}[name]()
    try:
        with torch.no_grad():
            model.eval()(example[:2])
    except RuntimeError as error:
        raise SystemExit(f"llkern train: model {name} does not take this data's inputs of shape "
                         f"{list(example.shape[1:])} ({error})") from error
    return model.train()


def _body(model: nn.Sequential) -> tuple[nn.Sequential, bool]:
    """The model without its final linear classifier (every module's auxiliary head classifies, the
    last one in its place), and whether its features are token-shaped (then the heads are token
    classifiers: LayerNorm, mean over tokens, linear, as the model's own)."""
    from llkern.models import TokenClassifier

    children = list(model.named_children())
    name, last = children[-1]
    if isinstance(last, TokenClassifier):
        return nn.Sequential(OrderedDict(children[:-1])), True
    if isinstance(last, nn.Linear):
        return nn.Sequential(OrderedDict(children[:-1])), False
    if isinstance(last, nn.Sequential) and isinstance(last[-1], nn.Linear):  # keep its activation, pooling
        return nn.Sequential(OrderedDict([*children[:-1], (f"{name}_features", last[:-1])])), False
    return model, False  # no classifier of its own (digits-resnet ends with BN-ReLU)


def _loss(args: argparse.Namespace, modules: list[nn.Module], example: torch.Tensor) -> Any:
    import llkern

    if args.loss == "ce":
        return llkern.CrossEntropy()
    if args.loss == "trgl":
        return llkern.TransportRegularized(tau=args.tau)
    if args.loss == "supcon":
        return llkern.SupervisedContrastive()
    if args.loss == "mi":
        return llkern.MutualInformation()
    if args.loss != "infopro":
        raise ValueError(f"llkern train: unknown loss {args.loss!r}")
    from llkern.nn.losses import INFOPRO_WEIGHTS

    # InfoPro's published (λ1, λ2) where there are some; else reconstruction 1 → 0, contrastive 1
    weights = INFOPRO_WEIGHTS.get((args.model, args.k), ((1.0, 1.0), (0.0, 1.0)))
    recon, task = llkern.infopro_schedule(*weights)
    decoder = llkern.reconstruction_decoders(example.shape[1:])
    shapes = llkern.nn.heads.feature_shapes(modules, example[:2])

    def losses(k: int, num_modules: int) -> Any:
        terms = [(llkern.SupervisedContrastive(), task)]
        if recon(k, num_modules) > 0:  # (InfoPro's last module, whose output is flattened, has no decoder)
            terms.insert(0, (llkern.Reconstruction(decoder(k, shapes[k])), recon))
        return llkern.Composite(terms)

    return losses


def _heads(args: argparse.Namespace, num_classes: int, tokens: bool) -> Any:
    import llkern
    from llkern.nn.heads import contrastive_heads, mlp_sr_heads

    kind = args.heads
    if kind == "auto":
        kind = {"supcon": "projection", "infopro": "infopro"}.get(args.loss, "token" if tokens else "linear")
    if kind == "linear":
        return None
    if kind == "projection":
        return contrastive_heads(num_classes, args.k)
    if kind == "infopro":
        return llkern.infopro_heads(num_classes, args.k, out_dim=128 if args.loss in ("supcon", "infopro") else None)
    if kind == "mlp-sr":
        return mlp_sr_heads(num_classes)
    from llkern.models import TokenClassifier

    return lambda k, shape: TokenClassifier(shape[-1], num_classes)


def _trainer(args: argparse.Namespace, net: Any, steps_per_epoch: int, default_lr: float = 2e-3,
             measure_memory: bool = True) -> tuple[Any, int]:
    """The LocalTrainer of ``args`` (optimizer, schedule per training phase, mode, precision), resumed from
    ``--checkpoint`` with ``--resume``; and the epochs per module."""
    import llkern

    lr = args.lr if args.lr is not None else (0.1 if args.optimizer == "sgd" else default_lr)
    epochs_per_module = max(1, args.epochs // args.k) if args.mode == "sequential" else 1
    phase_epochs = epochs_per_module if args.mode == "sequential" else args.epochs

    def optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if args.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        if args.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=phase_epochs * steps_per_epoch)
        if args.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, phase_epochs * steps_per_epoch)
        return None

    trainer = llkern.LocalTrainer(net, mode=args.mode, optimizer=optimizer,
                                  scheduler=scheduler if args.schedule != "constant" else None,
                                  scheduler_interval="step", precision=args.precision, clip_grad_norm=args.clip,
                                  epochs_per_module=epochs_per_module, measure_memory=measure_memory,
                                  seed=args.seed, distributed=args.distributed)
    if args.resume:
        if not args.checkpoint or not Path(args.checkpoint).is_file():
            raise SystemExit("llkern train: --resume needs --checkpoint pointing at a saved trainer")
        trainer.load(args.checkpoint)
    return trainer, epochs_per_module


NODE_STEPS_PER_EPOCH = 10  # karate: the whole graph is one batch; an epoch is this many steps on it


def _train_graph(args: argparse.Namespace) -> dict:
    """``llkern train --model gcn --data karate|synthetic-graphs``: a GCN cut into K modules of whole layers."""
    import llkern
    from llkern.data.graphs import karate_club, split_graphs, synthetic_graphs
    from llkern.models import GraphHead, gcn_graphs, gcn_nodes
    from llkern.nn.graph import Graph
    from llkern.nn.heads import LinearHead

    if args.model != "gcn":
        raise SystemExit(f"llkern train: --data {args.data} is graph data; it needs --model gcn, got {args.model}")
    if args.data not in GRAPH_DATA:
        raise SystemExit(f"llkern train: --model gcn needs graph data (--data {' or --data '.join(GRAPH_DATA)}), "
                         f"got --data {args.data}")
    if args.loss not in GRAPH_LOSSES:
        raise SystemExit(f"llkern train: a GCN trains with --loss {' or '.join(GRAPH_LOSSES)}, got {args.loss}")
    if args.context or args.relu_masks or args.recompute_bn_relu or args.heads not in ("auto", "linear"):
        raise SystemExit("llkern train: --context, --relu-masks, --recompute-bn-relu and --heads other than linear "
                         "are for image models, not for --model gcn")
    nodes = args.data == "karate"
    depth = args.gcn_depth if args.gcn_depth is not None else (2 if nodes else 3)
    hidden = args.gcn_hidden if args.gcn_hidden is not None else (16 if nodes else 32)
    if depth < 1 or hidden < 1:
        raise SystemExit(f"llkern train: expected --gcn-depth and --gcn-hidden >= 1, got {depth} and {hidden}")
    if args.k > depth:
        raise SystemExit(f"llkern train: -k/--modules: a GCN of {depth} layers (--gcn-depth) makes at most {depth} "
                         f"modules of whole layers, got K={args.k}")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if nodes:
        data = karate_club(args.labelled_per_class, seed=args.seed)
        graph = Graph(data.adjacency)
        num_classes = data.num_classes
        model = gcn_nodes(graph, data.x.shape[1], num_classes, hidden=hidden, depth=depth, dropout=0.5)
        x, target = data.x.to(device), data.train_target().to(device)
        train_data: Any = [(x, target)] * NODE_STEPS_PER_EPOCH
        example, steps_per_epoch, default_lr = data.x, NODE_STEPS_PER_EPOCH, 1e-2
    else:
        train_set, test_set = split_graphs(synthetic_graphs(seed=args.seed), 0.3, seed=args.seed)
        graph = Graph()
        num_classes = len(train_set.class_names)
        model = gcn_graphs(graph, train_set.num_features, num_classes, hidden=hidden, depth=depth)
        train_data = train_set.batches(graph, args.batch_size, shuffle=True, seed=args.seed)
        example, _ = train_set.batch(graph, [0, 1])
        steps_per_epoch, default_lr = len(train_data), 5e-3
    layers = list(model)[:depth]  # the GCNLayer units; the readout and the linear classifier are the heads' job
    bounds = [round(i * depth / args.k) for i in range(args.k + 1)]
    modules = [nn.Sequential(*layers[bounds[i]:bounds[i + 1]]) for i in range(args.k)]
    heads = [LinearHead(num_classes, hidden) if nodes else GraphHead(num_classes, hidden, graph) for _ in modules]
    readout = None if nodes else model.readout
    losses = [llkern.MutualInformation(readout=readout) if args.loss == "mi" else llkern.CrossEntropy()
              for _ in modules]
    net = llkern.LocalNet(modules, heads=heads, losses=losses, example_input=example).to(device)
    trainer, epochs_per_module = _trainer(args, net, steps_per_epoch, default_lr)
    epochs = epochs_per_module * args.k if args.mode == "sequential" else args.epochs
    eval_data = None if nodes else test_set.batches(graph, 256)
    rows = trainer.fit(train_data, epochs, eval_data=eval_data, progress=not args.no_progress, log=args.log,
                       checkpoint=args.checkpoint)
    if nodes:
        # the whole graph is one batch; the labelled (training) nodes are ignore_index in the test target
        result: dict[str, Any] = trainer.evaluate([(x, data.test_target().to(device))], exit="all")
        what = f"{int((~data.labelled).sum())} unlabelled members"
    else:
        result = trainer.evaluate(test_set.batches(graph, 256), exit="all")
        what = f"{len(test_set)} test graphs"
    if args.loss == "mi":  # heads 0..K-2 are untrained
        _say(f"test accuracy of the last head on the {what}: {100 * result['accuracy'][-1]:.2f} %")
    else:
        accuracies = ", ".join(f"{100 * a:.2f}" for a in result["accuracy"])
        _say(f"test accuracy per head on the {what} (%): {accuracies}")
    return {"evaluation": result, "history": rows}


def _say(*values: Any) -> None:
    """``print`` on rank 0 only (every process runs the same script under torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*values)


def _start_distributed(args: argparse.Namespace) -> bool:
    """Join torchrun's process group for ``--distributed``; True if this call started it."""
    import os

    import torch.distributed as dist

    if args.data in GRAPH_DATA or args.model == "gcn":
        raise SystemExit("llkern train: --distributed shards tensor data (digits, cifar10); graph data is one graph "
                         "or a list of graph batches that every process would see whole")
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        raise SystemExit("llkern train: --distributed runs under torchrun (e.g. torchrun --nproc-per-node 2 -m llkern "
                         "train --distributed ...), which sets RANK, WORLD_SIZE and MASTER_ADDR")
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.device(args.device).type == "cuda" else "gloo")
    return True


def train(args: argparse.Namespace) -> dict:
    """Run ``llkern train`` with parsed arguments; returns the final evaluation and the log rows."""
    started = _start_distributed(args) if args.distributed else False
    try:
        return _train(args)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> dict:
    import llkern

    if args.data in GRAPH_DATA or args.model == "gcn":
        return _train_graph(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x, y, x_test, y_test = _data(args)
    model, tokens = _body(_model(args.model, x[:8]))
    if args.k == 1:
        modules = [model]  # end to end: one module, one head, the whole graph kept
    else:
        plan = llkern.split(model, args.k, by=args.split, example_input=x[:32])
        _say(plan)
        modules = plan.modules
    if args.relu_masks or args.recompute_bn_relu:
        from llkern.nn.activation_memory import convert

        # after planning, per module: the planner chains units end to end, where a converted conv would skip
        # saving an input that it must save at a module boundary (a detached input cannot be recomputed)
        for module in modules:
            convert(module, relu_masks=args.relu_masks, bn_relu_recompute=args.recompute_bn_relu)
    num_classes = int(y.max()) + 1
    heads = _heads(args, num_classes, tokens)
    net = llkern.LocalNet(modules, num_classes=num_classes, heads=heads, losses=_loss(args, modules, x),
                          example_input=x[:2], context=args.context).to(device)
    steps_per_epoch = -(-len(y) // args.batch_size)
    trainer, epochs_per_module = _trainer(args, net, steps_per_epoch)
    epochs = epochs_per_module * args.k if args.mode == "sequential" else args.epochs
    x, y, x_test, y_test = (t.to(device) for t in (x, y, x_test, y_test))
    rows = trainer.fit((x, y), epochs, batch_size=args.batch_size, eval_data=(x_test, y_test),
                       progress=not args.no_progress, log=args.log, checkpoint=args.checkpoint)
    result = trainer.evaluate(x_test, y_test, exit="all")
    if args.loss in ("supcon", "mi", "infopro"):  # heads 0..K-2 are projections, not classifiers
        _say(f"test accuracy of the last head: {100 * result['accuracy'][-1]:.2f} %")
    else:
        accuracies = ", ".join(f"{100 * a:.2f}" for a in result["accuracy"])
        _say(f"test accuracy per head (%): {accuracies}; last head {100 * result['accuracy'][-1]:.2f} %")
    return {"evaluation": result, "history": rows}


def main(argv: list[str] | None = None) -> int:
    """The ``llkern`` command: exit status 0 on success (the results go to the terminal as lines, and to
    ``--log`` as JSON); bad options exit with status 2 and a short message, as argparse does."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> Any:
    """What ``llkern ARGS`` does, returning its results (``train``: the evaluation and the per-epoch
    history; ``compress``: the compression result) instead of an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compress"]:
        from llkern.cli.compress_demo import main as compress

        return compress(argv[1:])
    parser, args = _parse(argv)
    if args.k < 1:
        parser.error(f"-k/--modules: expected K >= 1, got {args.k}")
    if args.epochs < 1:
        parser.error(f"--epochs: expected at least 1, got {args.epochs}")
    return train(args)


if __name__ == "__main__":
    main()
