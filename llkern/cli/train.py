"""llkern train: build a model, cut it into K local modules, train them; llkern eval: evaluate a saved run.

train builds the model, cuts it into K local modules with the split planner (llkern.split), trains
them with llkern.LocalTrainer and prints one line per epoch (each module's training loss and accuracy,
the test accuracy, the peak saved activations, the time) and the test accuracy of every head at the
end. -k 1 trains the same model end to end. --recipe NAME starts from a published setting (llkern
recipes lists them); options on the command line override it.

--output-dir DIR collects the run: options.json (every option after recipe and command line; null: the
default for the data), log.json, checkpoint.pt, curves.png (where matplotlib is installed) and tensorboard/
(where tensorboard is installed).
llkern eval --checkpoint DIR rebuilds the network from them and evaluates it; llkern train
--resume --output-dir DIR continues the run, and a larger --epochs extends a finished one (the
learning-rate schedule is then planned for the new length).

MOLE (docs/mole.md): --loss mi --mode sequential, on digits as vectors (--data digits-vectors
--model mlp), as images (--data digits --model digits-cnn), and on graphs with --model gcn:
--data karate (node classification on Zachary's karate club) or --data synthetic-graphs.

Data parallel: torchrun --nproc-per-node N -m llkern train --distributed ... (every module under its
own DistributedDataParallel; --batch-size is the global batch; write --log-file for --log).
Pipeline: torchrun --nproc-per-node N -m llkern train --pipeline-stages S ... (the K modules on S
stages, one process each, N/S data-parallel replicas per stage; docs/pipeline.md).

Examples:
  llkern train -k 4 --epochs 10                          digits, 4 modules balanced by saved bytes
  llkern train --recipe infopro-resnet32-k4 --data-root ~/cifar-10-batches-py --output-dir run
  llkern eval --checkpoint run
  llkern train --data folder --data-root my_images/ --model resnet32 -k 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llkern.cli.options import (
    HelpFormatter,
    UsageError,
    byte_size,
    check_device,
    make_parents,
    nonnegative_float,
    output_path,
    plain_text,
    positive_float,
    positive_int,
)

__all__ = ["CHOICES", "build_parser", "evaluate_main", "main", "parse", "train"]

MODELS = ("digits-resnet", "digits-lenet", "digits-cnn", "mlp", "transformer", "resnet32", "resnet110", "vgg11",
          "vgg16", "gcn")
LOSSES = ("ce", "trgl", "supcon", "mi", "infopro")
HEADS = ("auto", "linear", "mlp-sr", "infopro")
DATA = ("digits", "digits-vectors", "cifar10", "folder", "karate", "synthetic-graphs")
GRAPH_DATA = ("karate", "synthetic-graphs")
GRAPH_LOSSES = ("ce", "mi")
# every option with a fixed set of values: argparse checks the command line, parse() checks a recipe
CHOICES = {"model": MODELS, "split": ("layers", "params", "saved_bytes", "time"), "loss": LOSSES, "heads": HEADS,
           "context": (None, "E", "R", "RE"), "mode": ("simultaneous", "sequential"), "data": DATA,
           "optimizer": ("sgd", "adam"), "schedule": ("constant", "cosine", "onecycle"),
           "precision": ("fp32", "bf16", "fp16"), "saved_dtype": ("fp32", "bf16", "fp16")}
# options that say where things go or how the run is shown, not what is trained: not taken from a
# checkpoint's saved options on --resume or by eval
RUN_OPTIONS = ("recipe", "log", "checkpoint", "resume", "output_dir", "tensorboard", "no_progress", "device",
               "distributed", "pipeline_stages")
NODE_STEPS_PER_EPOCH = 10  # karate: the whole graph is one batch; an epoch is this many steps on it


def build_parser(defaults: dict[str, Any] | None = None, prog: str | None = "llkern train") -> argparse.ArgumentParser:
    """The parser of ``llkern train``; ``defaults`` (a recipe's or a checkpoint's values) replace its defaults."""
    # a one-line usage: a bad option's message stays short (--help lists every option)
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__), formatter_class=HelpFormatter,
                                     usage="%(prog)s [options]")
    what = parser.add_argument_group("what to train")
    what.add_argument("--recipe", help="an installed recipe's name (llkern recipes lists them) or a JSON file of "
                                       "option values; the command line overrides it")
    what.add_argument("--model", choices=MODELS, default="digits-resnet", help="the network")
    what.add_argument("-k", "--modules", dest="k", type=positive_int, default=4,
                      help="K local modules (1: end to end)")
    what.add_argument("--split", choices=CHOICES["split"], default="saved_bytes",
                      help="what the planner balances between the modules")
    what.add_argument("--loss", choices=LOSSES, default="ce",
                      help="local loss: cross-entropy, TRGL (--tau), supervised contrastive, mutual information, "
                           "InfoPro (reconstruction + supervised contrastive; published weights for ResNet-32/110)")
    what.add_argument("--heads", choices=HEADS, default="auto",
                      help="auxiliary heads (auto: linear; projection heads for supcon, InfoPro's for infopro, "
                           "token classifiers for the transformer)")
    what.add_argument("--relu-masks", action="store_true", help="save 1-bit ReLU masks instead of ReLU outputs")
    what.add_argument("--recompute-bn-relu", action="store_true",
                      help="recompute BatchNorm+ReLU in the backward instead of saving their outputs")
    what.add_argument("--saved-dtype", choices=CHOICES["saved_dtype"], default="fp32",
                      help="store the tensors saved for backward in this dtype (saved_tensors_in: about half the "
                           "saved bytes; approximate gradients, relative errors of the order of 2^-8 for bf16; "
                           "fp16 overflows above 65504)")
    what.add_argument("--recompute-segments", type=positive_int, default=1, metavar="S",
                      help="cut each module into S segments (at most one per child) balanced by saved bytes and "
                           "recompute all but the last in the backward (keeps their inputs only; about one more "
                           "forward per step; 1: off)")
    what.add_argument("--memory-budget", type=byte_size, default=None, metavar="SIZE",
                      help="choose -k and --recompute-segments for this activation budget (e.g. 40MiB): the fewest "
                           "modules, then the fewest segments, whose largest module with its head and local loss "
                           "saves at most SIZE for backward at --batch-size (per process under torchrun), measured "
                           "on the CPU with --relu-masks / --recompute-bn-relu / --saved-dtype applied and under "
                           "--precision's autocast (llkern.fit_memory; each candidate also run on a copy with its "
                           "heads and losses); the choice replaces -k and --recompute-segments, and is what the "
                           "run saves")
    what.add_argument("--tau", type=positive_float, default=1.0, help="TRGL's transport weight 1/tau")
    what.add_argument("--context", choices=CHOICES["context"][1:], default=None,
                      help="ContSup context for modules 1..K-1 (image encoder, previous boundary, both)")
    what.add_argument("--mode", choices=CHOICES["mode"], default="simultaneous",
                      help="simultaneous: every module on every batch; sequential: one module after another")
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATA, default="digits",
                      help="digits (scikit-learn), cifar10 (local files), folder (one subfolder of images per "
                           "class), graphs")
    data.add_argument("--data-root", help="cifar10: the extracted CIFAR-10 folder (nothing is downloaded); folder: "
                                          "the folder of class folders")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                      help="random crop (4-pixel padding) and horizontal flip of training images (default: on for "
                           "cifar10, off otherwise)")
    data.add_argument("--image-size", type=positive_int, default=None,
                      help="folder: resize every image to this height and width (default: keep; all must agree)")
    data.add_argument("--labelled-per-class", type=positive_int, default=3,
                      help="karate: labelled members per faction (the others are predicted)")
    data.add_argument("--gcn-depth", type=positive_int, default=None,
                      help="gcn: graph-convolution layers (default 2 for karate, 3 for synthetic-graphs)")
    data.add_argument("--gcn-hidden", type=positive_int, default=None,
                      help="gcn: hidden features (default 16 for karate, 32 for synthetic-graphs)")
    how = parser.add_argument_group("how to train")
    how.add_argument("--epochs", type=positive_int, default=10,
                     help="epochs in all (sequential mode: a multiple of K; each module gets epochs / K)")
    how.add_argument("--batch-size", type=positive_int, default=64, help="samples per step")
    how.add_argument("--accumulate", type=positive_int, default=1, metavar="N",
                     help="batches per optimizer step: the gradient of an N × --batch-size batch in the activation "
                          "memory of one batch (not with --pipeline-stages)")
    how.add_argument("--optimizer", choices=CHOICES["optimizer"], default="adam", help="SGD (Nesterov) or AdamW")
    how.add_argument("--lr", type=positive_float, default=None,
                     help="peak learning rate (default: sgd 0.1, adam 2e-3; karate 1e-2, synthetic-graphs 5e-3)")
    how.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="weight decay")
    how.add_argument("--schedule", choices=CHOICES["schedule"], default="onecycle", help="learning-rate schedule")
    how.add_argument("--precision", choices=CHOICES["precision"], default="fp32", help="autocast precision")
    how.add_argument("--clip", type=positive_float, default=None, help="largest gradient norm per module")
    how.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    how.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and shuffling")
    how.add_argument("--distributed", action="store_true",
                     help="data parallel over the processes torchrun starts (gloo on the CPU, nccl on CUDA); "
                          "--batch-size is the global batch; rank 0 prints, logs and checkpoints")
    how.add_argument("--pipeline-stages", type=positive_int, default=None, metavar="S",
                     help="decoupled pipeline over the processes torchrun starts: the modules on S stages (one "
                          "process each, balanced by module count; world size / S replicas per stage); every "
                          "stage trains its modules at once, only forward messages travel; checkpoints are one "
                          "file per stage")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", help="collect options.json, log.json, checkpoint.pt, curves.png and "
                                          "tensorboard/ here")
    out.add_argument("--log", "--log-file", dest="log",
                     help="per-epoch log (.json, .jsonl or .csv; default OUTPUT_DIR/log.json); under torchrun "
                          "write --log-file")
    out.add_argument("--checkpoint", help="save the trainer here after each epoch (default OUTPUT_DIR/checkpoint.pt)")
    out.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint; its saved options are the defaults, and a larger --epochs "
                          "extends a finished run")
    out.add_argument("--tensorboard", help="write TensorBoard scalars here (default OUTPUT_DIR/tensorboard where "
                                           "tensorboard is installed)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(**(defaults or {}))
    return parser


def _check_values(values: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> None:
    """A recipe's or checkpoint's values: known options with allowed values (argparse checks the
    command line only, not defaults)."""
    known = set(vars(parser.parse_args([])))
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{source} has unknown options {unknown}")
    for name, value in values.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise UsageError(f"{source} sets {name} to {value!r}; expected one of {list(CHOICES[name])}")


def _checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint given as a file or as an output directory holding checkpoint.pt (the file need not exist)."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def _checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The file of a checkpoint given as a file or an output directory; for a pipeline run's checkpoint
    (one shard per stage), stage 0's shard, which holds the options like every shard."""
    path = _checkpoint_path(path)
    shard = path.with_name(f"{path.stem}.stage0{path.suffix}")
    if not path.is_file() and shard.is_file():
        return shard
    if not path.is_file():
        raise UsageError(f"--checkpoint: {path} does not exist")
    return path


def saved_options(path: str | os.PathLike[str], run_options: bool = False) -> dict[str, Any]:
    """The options a run saved with its checkpoint (``llkern train`` keeps them in the trainer's metadata);
    without the options of :data:`RUN_OPTIONS` unless ``run_options``."""
    file = _checkpoint_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--checkpoint: {file} is not a checkpoint torch can read ({error})") from None
    options = (state.get("metadata") or {}).get("options") if isinstance(state, dict) else None
    if not isinstance(options, dict):
        raise UsageError(f"--checkpoint: {file} holds no llkern train options (written by LocalTrainer.save "
                         "outside llkern train?)")
    return dict(options) if run_options else {k: v for k, v in options.items() if k not in RUN_OPTIONS}


def _check_pipeline_resume(saved: dict[str, Any], stages: int | None, checkpoint: str) -> None:
    """A checkpoint resumes in the layout it was saved in: a pipeline's stage shards under the same number of
    stages, a single trainer's file without --pipeline-stages."""
    trained = saved.get("pipeline_stages")
    if trained == stages:
        return
    if not stages:
        raise UsageError(f"--resume: {checkpoint} holds the shards of a {trained}-stage pipeline run; resume it the "
                         f"way it was trained: torchrun --nproc-per-node {trained} -m llkern train "
                         f"--pipeline-stages {trained} --resume ... (more processes: replicas per stage)")
    if not trained:
        raise UsageError(f"--resume --pipeline-stages {stages}: {checkpoint} was not trained as a pipeline")
    raise UsageError(f"--resume --pipeline-stages {stages}: {checkpoint} was trained with {trained} stages")


def parse(argv: list[str], prog: str | None = "llkern train") -> argparse.Namespace:
    """``llkern train``'s options: defaults < recipe < the checkpoint's options (with --resume) < command line."""
    # With --help, the options are read first without it, so that the help shows a recipe's or a resumed
    # checkpoint's values as the defaults; if they cannot be read, the plain help.
    asks_help = any(a in ("-h", "--help") for a in argv)
    if asks_help:
        try:
            defaults = _defaults(build_parser(prog=prog).parse_args([a for a in argv if a not in ("-h", "--help")]),
                                 prog)
        except (UsageError, SystemExit):
            defaults = {}
        build_parser(defaults, prog=prog).parse_args(argv)  # prints the help and exits
    args = build_parser(prog=prog).parse_args(argv)
    defaults = _defaults(args, prog)
    if defaults:
        args = build_parser(defaults, prog=prog).parse_args(argv)
    return args


def _defaults(args: argparse.Namespace, prog: str | None) -> dict[str, Any]:
    """The defaults that replace the parser's: a recipe's values, then (with --resume) the checkpoint's."""
    from llkern.cli.recipes import load_recipe

    defaults: dict[str, Any] = {}
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        _check_values(recipe, build_parser(prog=prog), f"--recipe {args.recipe}")
        defaults.update(recipe)
    if args.output_dir is not None:
        folder = Path(args.output_dir)
        defaults.setdefault("log", str(folder / "log.json"))
        defaults.setdefault("checkpoint", str(folder / "checkpoint.pt"))
    if args.resume:
        checkpoint = args.checkpoint or defaults.get("checkpoint")
        if checkpoint is None:
            raise UsageError("--resume: give --checkpoint FILE or --output-dir DIR of the run to continue")
        saved = saved_options(checkpoint, run_options=True)
        _check_pipeline_resume(saved, args.pipeline_stages, checkpoint)
        saved = {k: v for k, v in saved.items() if k not in RUN_OPTIONS}
        _check_values(saved, build_parser(prog=prog), f"the options saved in {checkpoint}")
        defaults.update(saved)
    return defaults


def _check_options(args: argparse.Namespace) -> None:
    """Everything that can be checked before any data is read."""
    check_device(args.device)
    if args.memory_budget is not None and args.split != "saved_bytes":
        from llkern.cli.recipes import load_recipe

        recipe_sets = args.recipe is not None and load_recipe(args.recipe).get("split") == args.split
        source = f" (as --recipe {args.recipe} sets it)" if recipe_sets else ""
        raise UsageError(f"--memory-budget balances the modules by saved bytes; it does not combine with --split "
                         f"{args.split}{source}: add --split saved_bytes")
    if args.memory_budget is not None and args.resume:
        raise UsageError("--resume rebuilds the saved network (its -k and --recompute-segments, which a budget chose "
                         "when it did); drop --memory-budget")
    if args.data in ("cifar10", "folder"):
        if not args.data_root:
            raise UsageError(f"--data {args.data} needs --data-root (the extracted CIFAR-10 folder for cifar10, a "
                             "folder of class folders for folder; nothing is downloaded)")
        root = Path(args.data_root).expanduser()
        if not root.is_dir():
            raise UsageError(f"--data-root: {args.data_root} is not a folder")
        if not any(root.iterdir()):
            raise UsageError(f"--data-root: {args.data_root} is empty")
    if args.image_size is not None and args.data != "folder":
        raise UsageError("--image-size is for --data folder")
    if args.log is not None:
        from llkern.local.logs import check_log_path

        try:
            check_log_path(args.log)
        except ValueError as error:
            raise UsageError(f"--log: {error}") from None
    if args.tensorboard is not None:
        from llkern.local.logs import tensorboard_available

        if not tensorboard_available():
            raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)")
    if args.resume and not args.checkpoint:
        raise UsageError("--resume: give --checkpoint FILE or --output-dir DIR of the run to continue")
    # Output paths, before any data is read or any epoch trained: a path that cannot be written fails now.
    if args.checkpoint is not None:
        args.checkpoint = str(_checkpoint_path(args.checkpoint))  # a run folder names its checkpoint.pt
    for option, path, folder in (("--output-dir", args.output_dir, True), ("--log", args.log, False),
                                 ("--checkpoint", args.checkpoint, False), ("--tensorboard", args.tensorboard, True)):
        if path is not None:
            output_path(option, path, folder=folder)


@dataclass
class ImageData:
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Any = None  # a batch transform for the training inputs, or None


def _data(args: argparse.Namespace) -> ImageData:
    from llkern.data.augment import black_fill
    from llkern.data.images import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, load_digits

    fill = None
    if args.data == "digits":
        x, y, x_test, y_test = load_digits(seed=args.seed)
    elif args.data == "digits-vectors":
        x, y, x_test, y_test = load_digits(seed=args.seed)
        x, x_test = x.flatten(1), x_test.flatten(1)
    elif args.data == "cifar10":
        try:
            x, y = load_cifar10(args.data_root, train=True, normalize=True)
            x_test, y_test = load_cifar10(args.data_root, train=False, normalize=True)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"--data-root {args.data_root}: {error}") from None
        fill = list(black_fill(CIFAR10_MEAN, CIFAR10_STD))  # pad with black, as before normalisation
    else:
        from llkern.data.folder import load_image_folder

        try:
            folder = load_image_folder(args.data_root, image_size=args.image_size, seed=args.seed)
        except (FileNotFoundError, NotADirectoryError, ValueError) as error:
            raise UsageError(f"--data-root {args.data_root}: {error}") from None
        x, y, x_test, y_test = folder.x_train, folder.y_train, folder.x_test, folder.y_test
        fill = list(black_fill(folder.mean, folder.std))
    if len(y) == 0 or len(y_test) == 0:
        raise UsageError(f"--data {args.data}: the training or test set is empty")
    augment = None
    if args.augment if args.augment is not None else args.data == "cifar10":
        if x.dim() != 4:
            raise UsageError(f"--augment: crops and flips images, and --data {args.data} holds vectors")
        from llkern.data.augment import RandomCropFlip

        generator = torch.Generator(device=args.device).manual_seed(args.seed + 1)
        augment = RandomCropFlip(padding=4, flip=True, fill=fill, generator=generator)
    return ImageData(x, y, x_test, y_test, int(max(y.max(), y_test.max())) + 1, augment)


def _model(name: str, example: torch.Tensor) -> nn.Sequential:
    """The model as one nn.Sequential of cuttable units."""
    from llkern import models

    channels = example.shape[1] if example.dim() == 4 else None
    if name == "gcn":
        raise UsageError("--model gcn needs graph data (--data karate or --data synthetic-graphs)")
    if name == "digits-resnet":
        model = models.digits_resnet(1)[0]
    elif name == "digits-lenet":
        model = models.digits_lenet()
    elif name == "digits-cnn":
        model = models.digits_lenet_caffe()
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
        raise UsageError(f"--model {name} does not take this data's inputs of shape {list(example.shape[1:])} "
                         f"({error})") from None
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
    """The LocalTrainer of ``args`` (optimizer, schedule per training phase, mode, precision); and the
    epochs per module."""
    import llkern

    lr = args.lr if args.lr is not None else (0.1 if args.optimizer == "sgd" else default_lr)
    accumulate = getattr(args, "accumulate", 1)
    # the schedules count optimizer steps: an epoch's batches in groups of accumulate, its last group shorter
    steps_per_epoch = math.ceil(steps_per_epoch / accumulate)
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

    options = dict(mode=args.mode, optimizer=optimizer, scheduler=scheduler if args.schedule != "constant" else None,
                   scheduler_interval="step", precision=args.precision, clip_grad_norm=args.clip,
                   epochs_per_module=epochs_per_module, measure_memory=measure_memory, seed=args.seed,
                   accumulate=accumulate)
    if getattr(args, "pipeline_stages", None):
        try:
            trainer = llkern.PipelineTrainer(net, args.pipeline_stages, **options)
        except ValueError as error:
            raise UsageError(f"--pipeline-stages {args.pipeline_stages}: {error}") from None
        _say(f"pipeline: {trainer.placement}")
    else:
        trainer = llkern.LocalTrainer(net, distributed=args.distributed, **options)
    trainer.metadata["options"] = {k: v for k, v in vars(args).items() if k not in ("command",)}
    return trainer, epochs_per_module


# a schedule's length lives in these attributes (OneCycleLR: total_steps and its phases' end steps;
# CosineAnnealingLR: T_max); a resumed run that trains longer keeps the new values, not the checkpoint's
_SCHEDULE_LENGTH = ("total_steps", "_schedule_phases", "T_max")


def _short(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (a state dict's mismatch lists every key)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _resume(trainer: Any, checkpoint: str, epochs: int, mode: str) -> None:
    """Load the checkpoint into ``trainer``; a simultaneous run asked for more epochs than it was planned
    for keeps the schedules built for the new length (the run continues as if started with it)."""
    planned = [None if s is None else {k: getattr(s, k) for k in _SCHEDULE_LENGTH if hasattr(s, k)}
               for s in trainer.schedulers]
    options = trainer.metadata["options"]
    from llkern.local.pipeline import PipelineTrainer

    try:
        # a pipeline stage finds its own shard from the checkpoint's name
        trainer.load(_checkpoint_path(checkpoint) if isinstance(trainer, PipelineTrainer)
                     else _checkpoint_file(checkpoint))
    except (ValueError, KeyError, RuntimeError) as error:
        raise UsageError(f"--resume: {checkpoint} does not fit these options ({_short(error)})") from None
    saved = trainer.metadata.get("options", {})
    saved_epochs = saved.get("epochs", epochs)
    saved_accumulate = saved.get("accumulate", 1)  # checkpoints from before --accumulate trained with 1
    if options.get("accumulate", 1) != saved_accumulate and any(s is not None for s in trainer.schedulers):
        # (the loaded schedules count that run's optimizer steps: OneCycleLR failed after the epoch's work)
        raise UsageError(f"--resume --accumulate {options.get('accumulate', 1)}: {checkpoint} was trained with "
                         f"--accumulate {saved_accumulate}, and its schedules count that run's optimizer steps; "
                         f"resume with --accumulate {saved_accumulate}, or start a new run")
    trainer.metadata["options"] = options
    if epochs < trainer.epoch:
        raise UsageError(f"--epochs {epochs}: the checkpoint has trained {trainer.epoch} epochs already")
    if epochs == saved_epochs:
        return
    if mode == "sequential":
        raise UsageError(f"--resume --epochs {epochs}: a sequential run keeps its per-module epochs "
                         f"({saved_epochs} in all); extend a simultaneous run, or start a new one")
    for scheduler, lengths in zip(trainer.schedulers, planned, strict=True):
        if scheduler is None:
            continue
        for key, value in lengths.items():
            setattr(scheduler, key, value)
        if hasattr(scheduler, "_get_closed_form_lr"):  # cosine's recursive form assumes an unchanged T_max
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler._get_closed_form_lr(), strict=True):
                group["lr"] = lr


@dataclass
class Run:
    """Everything a train or eval command works with, built from the options."""

    trainer: Any
    epochs: int  # the total the trainer trains to
    train_data: Any
    batch_size: int
    eval_data: Any  # per-epoch test set: (x, y) tensors or a list of batches
    test: Any  # the final evaluation: () -> dict
    what: str  # what the test set is, for the printed line
    last_head_only: bool  # heads 0..K-2 are projections or untrained: report the last one only
    augment: Any = None
    plan: Any = None
    extra: dict = field(default_factory=dict)


def _graph_run(args: argparse.Namespace) -> Run:
    """A GCN cut into K modules of whole layers, on karate (nodes) or synthetic graphs."""
    import llkern
    from llkern.data.graphs import karate_club, split_graphs, synthetic_graphs
    from llkern.models import GraphHead, gcn_graphs, gcn_nodes
    from llkern.nn.graph import Graph
    from llkern.nn.heads import LinearHead

    if args.model != "gcn":
        raise UsageError(f"--data {args.data} is graph data; it needs --model gcn, got {args.model}")
    if args.data not in GRAPH_DATA:
        raise UsageError(f"--model gcn needs graph data (--data {' or --data '.join(GRAPH_DATA)}), got --data "
                         f"{args.data}")
    if args.loss not in GRAPH_LOSSES:
        raise UsageError(f"a GCN trains with --loss {' or '.join(GRAPH_LOSSES)}, got {args.loss}")
    if args.context or args.relu_masks or args.recompute_bn_relu or args.heads not in ("auto", "linear") \
            or args.augment or args.recompute_segments > 1 or args.memory_budget is not None:
        raise UsageError("--context, --relu-masks, --recompute-bn-relu, --recompute-segments, --memory-budget, "
                         "--augment and --heads other than linear are for image models, not for --model gcn")
    if args.distributed:
        raise UsageError("--distributed shards tensor data (digits, cifar10, folder); graph data is one graph or a "
                         "list of graph batches that every process would see whole")
    nodes = args.data == "karate"
    depth = args.gcn_depth if args.gcn_depth is not None else (2 if nodes else 3)
    hidden = args.gcn_hidden if args.gcn_hidden is not None else (16 if nodes else 32)
    if args.k > depth:
        raise UsageError(f"-k/--modules: a GCN of {depth} layers (--gcn-depth) makes at most {depth} modules of "
                         f"whole layers, got K={args.k}")
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
        eval_data = None
        test_batches = [(x, data.test_target().to(device))]
        what = f"the {int((~data.labelled).sum())} unlabelled members"
    else:
        train_set, test_set = split_graphs(synthetic_graphs(seed=args.seed), 0.3, seed=args.seed)
        graph = Graph()
        num_classes = len(train_set.class_names)
        model = gcn_graphs(graph, train_set.num_features, num_classes, hidden=hidden, depth=depth)
        train_data = train_set.batches(graph, args.batch_size, shuffle=True, seed=args.seed)
        example, _ = train_set.batch(graph, [0, 1])
        steps_per_epoch, default_lr = len(train_data), 5e-3
        eval_data = test_batches = test_set.batches(graph, 256)
        what = f"the {len(test_set)} test graphs"
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
    return Run(trainer, epochs, train_data, args.batch_size, eval_data,
               lambda: trainer.evaluate(test_batches, exit="all"), what, args.loss == "mi")


def _process_batch(args: argparse.Namespace) -> int:
    """The samples one process runs per step: --batch-size is the global batch under torchrun."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return args.batch_size
    replicas = dist.get_world_size() // (args.pipeline_stages or 1)
    return max(1, args.batch_size // max(1, replicas))


def _fit_memory_budget(args: argparse.Namespace, model: nn.Sequential, data: ImageData, tokens: bool) -> None:
    """--memory-budget: set -k and --recompute-segments to llkern.fit_memory's choice (the saved options then
    rebuild the same network on --resume and in llkern eval, without fitting again).

    fit_memory measures the blocks; the heads, local losses and context encoders save on top of them. Each candidate
    whose blocks fit is therefore run as the run will run it (a copy, local steps on the CPU) and taken only when
    the whole fits, so the choice is the first in fit_memory's order (fewest modules, then fewest segments) that
    fits with its heads."""
    import llkern
    from llkern.local.planner import _format_bytes

    budget, batch = args.memory_budget, _process_batch(args)
    what = f"--memory-budget {_format_bytes(budget)}"
    # (K, most segments in a module, the largest module's peak with its head and loss) of every candidate checked
    whole: list[tuple[int, int, int]] = []

    refused: list[str] = []  # why candidates could not run with the heads, losses and context

    def fits_with_heads(modules: list[nn.Module]) -> bool:
        try:
            peak = _largest_step_peak(args, modules, data, tokens, batch)
        except (TypeError, ValueError) as error:  # e.g. a ContSup context at a module boundary that is not an image
            refused.append(f"K = {len(modules)}: {error}")
            return False
        whole.append((len(modules), max(getattr(m, "segments", 1) for m in modules), peak))
        return peak <= budget

    stages = args.pipeline_stages or 1
    try:
        # (cut as _image_run cuts, by fp32 bytes; what each candidate saves measured under the run's autocast)
        fit = llkern.fit_memory(model, budget, example_input=data.x[:32], batch_size=batch, min_k=stages,
                                transform=_activation_options(args), autocast=_dtype(args.precision),
                                saved_dtype=_dtype(args.saved_dtype), accept=fits_with_heads)
    except ValueError as error:
        if "min_k=" in str(error):
            raise UsageError(f"{what} --pipeline-stages {stages}: {error}; use fewer --pipeline-stages") from None
        with_heads = ""
        if whole:
            k, s, least = min(whole, key=lambda item: item[2])
            with_heads = (f"with the heads, local losses and context the least was {_format_bytes(least)} (K = {k}, "
                          f"{s} segment{'s' if s > 1 else ''}); ")
        if refused:
            with_heads += f"{len(refused)} candidates could not run with them ({refused[-1]}); "
        layers = {type(m) for m in model.modules()}  # (the options that would change something in this model)
        lighter = [option for option, off in (("--relu-masks", not args.relu_masks and nn.ReLU in layers),
                                              ("--recompute-bn-relu", not args.recompute_bn_relu
                                               and nn.BatchNorm2d in layers and nn.ReLU in layers),
                                              ("--precision bf16", args.precision == "fp32"),
                                              ("--saved-dtype bf16", args.saved_dtype == "fp32")) if off]
        also = f", or add {' / '.join(lighter)}" if lighter else ""
        # (the rest, and max_k, are for the Python call)
        found = re.sub(r"; max_k=\d+\)", ")", str(error).split(". Try ")[0])
        raise UsageError(f"{what}: {with_heads}{found}. Try a smaller --batch-size or lighter --heads{also}") from None
    _say(fit)
    _say(f"with its heads, local losses and context the largest module saves {_format_bytes(whole[-1][2])} for a "
         f"batch of {batch}")  # (the candidate accepted is the last one checked)
    args.k, args.recompute_segments, args.memory_budget = fit.k, fit.segments, None
    try:
        _check_sequential_epochs(args)
    except UsageError as error:
        raise UsageError(f"{what} chose K = {fit.k} modules, and {error}") from None


def _dtype(name: str) -> torch.dtype | None:
    """The dtype of a --precision or --saved-dtype value (None for fp32: autocast off, saved tensors as they are)."""
    from llkern.local.trainer import PRECISIONS

    return PRECISIONS[name]


def _saved_tensors(args: argparse.Namespace) -> Any:
    """saved_tensors_in(--saved-dtype), or nothing."""
    from llkern.local.fit import _saved_in

    return _saved_in(_dtype(args.saved_dtype))


def _activation_options(args: argparse.Namespace) -> Any:
    """--relu-masks / --recompute-bn-relu as a function converting one module (None without them)."""
    if not (args.relu_masks or args.recompute_bn_relu):
        return None
    from llkern.nn.activation_memory import convert

    return lambda module: convert(module, relu_masks=args.relu_masks, bn_relu_recompute=args.recompute_bn_relu)


def _largest_step_peak(args: argparse.Namespace, modules: list[nn.Module], data: ImageData, tokens: bool,
                       batch: int) -> int:
    """The largest saved-for-backward peak of one local step of ``modules`` as LocalNet trains them with the run's
    heads, losses and context, for a batch of ``batch``: on copies, on the CPU, under --precision's autocast and
    with --saved-dtype's copies, the RNG restored. Measured at three small batches and extrapolated on the parabola
    through them (saved bytes grow linearly with the batch, a contrastive or MI loss's N×N matrices quadratically), so
    that a large batch is not run on the CPU."""
    import copy

    sizes = sorted({min(batch, n, len(data.x)) for n in (8, 16, 32)})
    peaks = []
    probe = argparse.Namespace(**{**vars(args), "k": len(modules)})  # the heads and loss weights depend on K
    with torch.random.fork_rng(devices=[]), _saved_tensors(args):
        net = _local_net(probe, copy.deepcopy(modules), data, tokens)
        for n in sizes:
            rows = net.memory_profile(data.x[:n].clone(), data.y[:n].clone(), autocast=_dtype(args.precision))
            peaks.append(max(row.peak_saved_bytes for row in rows))
    if batch in sizes:
        return peaks[sizes.index(batch)]
    if len(sizes) < 3:  # (fewer samples than that: in proportion)
        return round(peaks[-1] * batch / sizes[-1])
    # the parabola through the three points (Lagrange form), at the batch
    (x0, x1, x2), (y0, y1, y2) = sizes, peaks
    b = batch
    value = (y0 * (b - x1) * (b - x2) / ((x0 - x1) * (x0 - x2)) + y1 * (b - x0) * (b - x2) / ((x1 - x0) * (x1 - x2))
             + y2 * (b - x0) * (b - x1) / ((x2 - x0) * (x2 - x1)))
    return max(peaks[-1], round(value))


def _local_net(args: argparse.Namespace, modules: list[nn.Module], data: ImageData, tokens: bool) -> Any:
    import llkern

    return llkern.LocalNet(modules, num_classes=data.num_classes, heads=_heads(args, data.num_classes, tokens),
                           losses=_loss(args, modules, data.x), example_input=data.x[:2], context=args.context)


def _image_run(args: argparse.Namespace) -> Run:
    import llkern

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = _data(args)
    model, tokens = _body(_model(args.model, data.x[:8]))
    if args.memory_budget is not None:
        _fit_memory_budget(args, model, data, tokens)
    plan = None
    if args.k == 1 and args.recompute_segments > 1:  # recomputed at the planner's units, as fit_memory measures
        modules = llkern.split(model, 1, by="layers").modules
    elif args.k == 1:
        modules = [model]  # end to end: one module, one head, the whole graph kept
    else:
        try:
            plan = llkern.split(model, args.k, by=args.split, example_input=data.x[:32])
        except ValueError as error:
            raise UsageError(f"-k/--modules {args.k}: {error}") from None
        modules = plan.modules
    if args.relu_masks or args.recompute_bn_relu:
        from llkern.nn.activation_memory import convert

        # after planning, per module: the planner chains units end to end, where a converted conv would skip
        # saving an input that it must save at a module boundary (a detached input cannot be recomputed)
        for module in modules:
            convert(module, relu_masks=args.relu_masks, bn_relu_recompute=args.recompute_bn_relu)
    if args.recompute_segments > 1:
        from llkern.nn.recompute import recompute_modules

        try:  # each module measured on its own input; a module allowing fewer segments gets fewer
            modules = recompute_modules(modules, args.recompute_segments, example_input=data.x[:32])
        except (TypeError, ValueError) as error:
            raise UsageError(f"--recompute-segments {args.recompute_segments}: {error}") from None
    net = _local_net(args, modules, data, tokens).to(device)
    steps_per_epoch = -(-len(data.y) // args.batch_size)
    trainer, epochs_per_module = _trainer(args, net, steps_per_epoch)
    epochs = epochs_per_module * args.k if args.mode == "sequential" else args.epochs
    x, y, x_test, y_test = (t.to(device) for t in (data.x, data.y, data.x_test, data.y_test))
    return Run(trainer, epochs, (x, y), args.batch_size, (x_test, y_test),
               lambda: trainer.evaluate(x_test, y_test, exit="all"), f"the {len(y_test)} test samples",
               args.loss in ("supcon", "mi", "infopro"), augment=data.augment, plan=plan)


def _say(*values: Any) -> None:
    """``print`` on rank 0 only (every process runs the same command under torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*values, flush=True)


def _start_distributed(args: argparse.Namespace) -> bool:
    """Join torchrun's process group for ``--distributed`` or ``--pipeline-stages``; True if this call
    started it."""
    import torch.distributed as dist

    option = "--pipeline-stages" if args.pipeline_stages else "--distributed"
    if args.pipeline_stages and args.distributed:
        raise UsageError("--pipeline-stages and --distributed: give one (a pipeline's stages are data parallel "
                         "over their replicas already: run world size = stages × replicas processes)")
    if args.pipeline_stages and args.accumulate > 1:
        raise UsageError("--pipeline-stages: --accumulate works without the pipeline only (a stage steps after every "
                         "micro-batch); drop --accumulate, or give --distributed data parallelism")
    if args.pipeline_stages and args.mode == "sequential":
        raise UsageError("--pipeline-stages: --mode sequential trains one module at a time, so the stages would "
                         "take turns; use --mode simultaneous")
    if args.data in GRAPH_DATA or args.model == "gcn":
        raise UsageError(f"{option} shards tensor data (digits, cifar10, folder); graph data is one graph or a "
                         "list of graph batches that every process would see whole")
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        raise UsageError(f"{option} runs under torchrun (e.g. torchrun --nproc-per-node 2 -m llkern train "
                         f"{option}{' 2' if args.pipeline_stages else ''} ...), which sets RANK, WORLD_SIZE and "
                         "MASTER_ADDR")
    if torch.device(args.device).type == "cuda":
        # more processes than GPUs (two pipeline stages on one GPU) share them round robin; NCCL may refuse
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % max(1, torch.cuda.device_count())}"
        torch.cuda.set_device(args.device)
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.device(args.device).type == "cuda" else "gloo")
    return True


def _report(run: Run, result: dict) -> None:
    if run.last_head_only:
        _say(f"test accuracy of the last head on {run.what}: {100 * result['accuracy'][-1]:.2f} %")
    else:
        accuracies = ", ".join(f"{100 * a:.2f}" for a in result["accuracy"])
        _say(f"test accuracy per head on {run.what} (%): {accuracies}; last head {100 * result['accuracy'][-1]:.2f} %")


def _is_lead() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_sequential_epochs(args: argparse.Namespace) -> None:
    if args.mode == "sequential" and args.epochs % args.k:
        low = max(args.k, args.epochs - args.epochs % args.k)
        raise UsageError(f"--epochs {args.epochs}: sequential mode trains each of the {args.k} modules for epochs / K "
                         f"epochs; give a multiple of {args.k} (e.g. {low} or {low + args.k})")


def train(args: argparse.Namespace) -> dict:
    """Run ``llkern train`` with parsed options; returns the final evaluation and the log rows."""
    _check_options(args)
    if args.memory_budget is None:  # else once the budget has chosen K
        _check_sequential_epochs(args)
    started = _start_distributed(args) if args.distributed or args.pipeline_stages else False
    try:
        return _train(args)
    finally:
        import torch.distributed as dist

        if started and dist.is_initialized():  # a failed pipeline stage closes the group itself
            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> dict:
    from llkern.local.logs import EpochPrinter, TensorBoardLogger, plot_history, tensorboard_available

    run = _graph_run(args) if args.data in GRAPH_DATA or args.model == "gcn" else _image_run(args)
    trainer = run.trainer
    if run.plan is not None:
        _say(run.plan)
        changed = [option for option, on in (("--relu-masks", args.relu_masks),
                                             ("--recompute-bn-relu", args.recompute_bn_relu),
                                             (f"--recompute-segments {args.recompute_segments}",
                                              args.recompute_segments > 1),
                                             (f"--precision {args.precision}", args.precision != "fp32"),
                                             (f"--saved-dtype {args.saved_dtype}", args.saved_dtype != "fp32")) if on]
        if changed:  # (the plan's bytes are what it balanced, not what this run saves)
            _say(f"(the plan's bytes are the plain layers' in fp32; with {' '.join(changed)} the run saves others: "
                 "the epoch lines give its peak)")
    if args.resume:
        _resume(trainer, args.checkpoint, run.epochs, args.mode)
        _say(f"resumed from {args.checkpoint} after epoch {trainer.epoch}")
    folder = Path(args.output_dir) if args.output_dir else None
    sinks: list[Any] = [EpochPrinter(run.epochs)]
    tensorboard = None
    if _is_lead():
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "options.json").write_text(json.dumps(trainer.metadata["options"], indent=1) + "\n")
        if args.log:
            sinks.append(make_parents(args.log))
        board = args.tensorboard or (str(folder / "tensorboard") if folder and tensorboard_available() else None)
        if board:
            tensorboard = TensorBoardLogger(board)
            sinks.append(tensorboard)
    if args.checkpoint:
        make_parents(args.checkpoint)  # every stage of a pipeline writes its own shard there
    try:
        with _saved_tensors(args):  # (the trainer's memory meter counts the copies it stores)
            rows = trainer.fit(run.train_data, run.epochs, batch_size=run.batch_size, eval_data=run.eval_data,
                               progress=not args.no_progress, log=sinks, checkpoint=args.checkpoint,
                               transform=run.augment)
    finally:
        if tensorboard is not None:
            tensorboard.close()
    result = run.test()
    _report(run, result)
    if folder is not None and _is_lead() and rows and plot_history(rows, folder / "curves.png"):
        _say(f"options, log, checkpoint and curves.png in {folder}")
    return {"evaluation": result, "history": rows}


def main(argv: list[str] | None = None, prog: str | None = "llkern train") -> dict:
    """``llkern train ARGS``: the final evaluation and the per-epoch history."""
    return train(parse(list(argv or []), prog))


def build_eval_parser(prog: str | None = "llkern eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, usage="%(prog)s --checkpoint PATH [options]",
        description="Evaluate a network saved by llkern train: the options saved with its checkpoint rebuild "
                    "the data and the network, and every head is evaluated on the test set.\n\n"
                    "Example:\n  llkern train --output-dir run -k 4 --epochs 3\n  llkern eval --checkpoint run")
    parser.add_argument("--checkpoint", required=True,
                        help="the checkpoint file, or the --output-dir folder that holds checkpoint.pt")
    parser.add_argument("--data-root", help="where the data are now (default: as trained)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="samples per evaluation batch")
    return parser


def evaluate_main(argv: list[str] | None = None, prog: str | None = "llkern eval") -> dict:
    """``llkern eval --checkpoint PATH``: the evaluation of every head on the run's test set."""
    given = build_eval_parser(prog).parse_args(list(argv or []))
    options = saved_options(given.checkpoint)
    _check_values(options, build_parser(), f"the options saved in {given.checkpoint}")
    args = build_parser(options).parse_args([])
    args.device = given.device
    if given.data_root is not None:
        args.data_root = given.data_root
    args.no_progress = True
    _check_options(args)
    run = _graph_run(args) if args.data in GRAPH_DATA or args.model == "gcn" else _image_run(args)
    file = _checkpoint_file(given.checkpoint)
    try:
        shard = re.fullmatch(r"(.*)\.stage\d+", file.stem)
        if shard:  # a pipeline run (any stage's shard given): every stage's shard holds part of the net
            from llkern.local.pipeline import read_shards

            state = read_shards(file.with_name(shard.group(1) + file.suffix))
            run.trainer.net.load_state_dict(state["net"])
            run.trainer.epoch = int(state["epoch"])
        else:
            run.trainer.load(file, restore_rng=False)
    except (ValueError, KeyError, RuntimeError) as error:
        raise UsageError(f"--checkpoint: {given.checkpoint} does not match the network its options build "
                         f"({_short(error)})") from None
    if isinstance(run.eval_data, tuple):
        result = run.trainer.evaluate(*run.eval_data, exit="all", batch_size=given.batch_size)
    else:
        result = run.test()
    epochs = run.trainer.epoch
    _say(f"{_checkpoint_file(given.checkpoint)}: trained {epochs} epoch{'s' if epochs != 1 else ''}")
    _report(run, result)
    return {"evaluation": result, "epochs": run.trainer.epoch}

