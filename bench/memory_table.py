"""Peak activation memory and step time of one training step: model × K × method.

    python bench/memory_table.py [--model resnet32] [--batch 128] [--ks 2 4 8 16] [--device cpu]
                                 [--out bench/results/memory-resnet32-cpu] [--steps 3]

Methods, for each K (the end-to-end row is the same for every K):
* ``end to end``: ``F.cross_entropy(model(x), y).backward()``;
* ``checkpoint``: the model in K segments through ``torch.utils.checkpoint`` (non-reentrant): only
  the segment boundaries are kept, each segment is recomputed in the backward. The meter sees the
  boundaries and the last segment (run without checkpointing), not the recomputation, which saves
  through checkpoint's own hooks: the figure is the larger of what the meter saw and the peak of a
  recomputation (the segment inputs still kept plus that segment's saved bytes, measured by running
  it alone);
* ``local, equal layers``: :class:`llkern.LocalNet` on ``llkern.split(model, K, by="layers")``;
* ``local, balanced``: the same on ``llkern.split(model, K, by="saved_bytes")`` (the default);
* with :mod:`llkern.nn.activation_memory` present, ``local, balanced + masks/recompute``: the
  balanced split with 1-bit ReLU masks and BatchNorm+ReLU recomputed in the backward;
* ``local, balanced + S segments``: the balanced split with every module cut into ``--segments`` S
  recomputed segments (:func:`llkern.recompute_modules`: checkpointing inside a module, measured by the
  meter, recomputation included), and the same on top of masks/recompute.

Memory: the peak bytes of tensors saved for backward (``llkern.MemoryMeter``, each storage counted
once), and on CUDA also ``max_memory_allocated`` above the level before the step (parameters,
gradients and optimizer state excluded, since they exist before). Step time: the median of
``--steps`` steps after one warm-up. The local heads are the default (fused linear head). Writes
``<out>.md`` (the table) and ``<out>.png`` (peak memory against K, as a share of end to end).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import signal
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import pytorch_activation_ops
from torch.utils.checkpoint import checkpoint_sequential

import llkern
from llkern import models

MODELS = {"resnet32": models.resnet32, "resnet110": models.resnet110, "vgg11": models.vgg11,
          "vgg16": models.vgg16}


def measure(step, device: torch.device, steps: int, exclude) -> tuple[int, int | None, float]:
    """(peak saved bytes, CUDA peak bytes or None, median step seconds) of ``step()``."""
    step()  # warm-up (lazy heads, cuDNN autotuning, allocator)
    peaks, cuda_peaks, times = [], [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with llkern.MemoryMeter(exclude=exclude, device=device if device.type == "cuda" else None) as meter:
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peaks.append(meter.peak_saved_bytes)
        cuda_peaks.append(meter.cuda_peak_bytes)
    return max(peaks), (max(cuda_peaks) if device.type == "cuda" else None), statistics.median(times)


def recompute_peak_bytes(model: torch.nn.Sequential, segments: int, x: torch.Tensor) -> int:
    """Saved bytes while checkpoint_sequential recomputes its largest segment in the backward: the
    inputs kept for the segments not yet recomputed plus that segment's own saved tensors (each
    segment run alone with gradients). The last segment is not checkpointed: the meter sees it."""
    size = len(model) // segments  # checkpoint_sequential's cut: equal counts, the rest in the last
    bounds = [i * size for i in range(segments)] + [len(model)]
    inputs, own, h = [], [], x
    for start, end in itertools.pairwise(bounds[:-1]):
        inputs.append(h.untyped_storage().nbytes())
        with llkern.MemoryMeter(exclude=model.parameters(), device=None) as meter:
            out = model[start:end](h)
        own.append(meter.peak_saved_bytes)
        h = out.detach()
        del out
    # recomputing segment i (backwards from the last checkpointed one) keeps the inputs of 0..i
    return max((sum(inputs[:i + 1]) + own[i] for i in range(len(own))), default=0)


def zero_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def run(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Measures every method into ``rows`` (the caller's list: what was measured stays there if a time limit
    stops the run). A method that fails is reported and skipped."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = MODELS[args.model]().to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def add(method: str, k: int, result: tuple[int, int | None, float]) -> None:
        saved, cuda, seconds = result
        rows.append({"method": method, "K": k, "saved_bytes": saved, "cuda_peak_bytes": cuda, "step_s": seconds})
        cuda_text = f", CUDA peak {cuda / 2**20:.0f} MiB" if cuda is not None else ""
        print(f"{method:40s} K={k:2d}: saved {saved / 2**20:8.1f} MiB{cuda_text}, {1e3 * seconds:8.1f} ms", flush=True)

    model = copy.deepcopy(base)

    def end_to_end() -> None:
        zero_grads(model)
        F.cross_entropy(model(x), y).backward()

    add("end to end", 1, measure(end_to_end, device, args.steps, model.parameters()))
    try:
        from llkern import activation_memory
    except ImportError:
        activation_memory = None

    def local_row(method: str, k: int, by: str, smaller: bool, segments: int = 1) -> None:
        local_model = copy.deepcopy(base)
        plan = llkern.split(local_model, k, by=by, example_input=x[:8])
        if smaller:  # per module, after planning: a module's first conv cannot recompute a detached input
            for module in plan.modules:
                activation_memory.convert(module, relu_masks=True, bn_relu_recompute=True)
        modules = plan.modules
        if segments > 1:
            modules = llkern.recompute_modules(modules, segments, example_input=x[:8])
        net = llkern.LocalNet(modules, num_classes=10, example_input=x[:2]).to(device)

        def local(net: llkern.LocalNet = net, pytorch_ops: bool = method.endswith("PyTorch ops")) -> None:
            zero_grads(net)
            with pytorch_activation_ops(pytorch_ops):
                net.local_step(x, y)

        add(method, k, measure(local, device, args.steps, net.parameters()))

    for k in args.ks:
        if k > len(base):
            print(f"K={k}: more than the model's {len(base)} units, skipped")
            continue

        def checkpointed(k: int = k) -> None:
            zero_grads(model)
            F.cross_entropy(checkpoint_sequential(model, k, x, use_reentrant=False), y).backward()

        try:
            saved, cuda, seconds = measure(checkpointed, device, args.steps, model.parameters())
            add("checkpoint", k, (max(saved, recompute_peak_bytes(model, k, x)), cuda, seconds))
        except Exception as error:  # (out of memory, say): the other rows still come
            print(f"checkpoint K={k} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        variants = [("local, equal layers", "layers", False, 1), ("local, balanced", "saved_bytes", False, 1)]
        if activation_memory is not None:
            variants.append(("local, balanced + masks/recompute", "saved_bytes", True, 1))
            if args.pytorch_ops:  # the same on PyTorch ops instead of the compiled relu_with_mask / batch_norm_relu
                variants.append(("local, balanced + masks/recompute, PyTorch ops", "saved_bytes", True, 1))
        if args.segments > 1:
            variants.append((f"local, balanced + {args.segments} segments", "saved_bytes", False, args.segments))
            if activation_memory is not None:
                variants.append((f"local, balanced + masks/recompute + {args.segments} segments", "saved_bytes",
                                 True, args.segments))
        for method, by, smaller, segments in variants:
            try:
                local_row(method, k, by, smaller, segments)
            except Exception as error:
                print(f"{method} K={k} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
    return rows


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def write(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    end = next(r for r in rows if r["method"] == "end to end")
    key = "cuda_peak_bytes" if end["cuda_peak_bytes"] is not None else "saved_bytes"
    name = "CUDA peak above the parameters" if key == "cuda_peak_bytes" else "peak saved activations"
    lines = [f"# {args.model}, batch {args.batch}, {args.device}: {name} and step time",
             "", f"`python bench/memory_table.py {' '.join(args.argv)}`"
             + (f" (torch.backends.cudnn.benchmark = {torch.backends.cudnn.benchmark})"
                if torch.device(args.device).type == "cuda" else ""), "",
             "| method | K | saved activations | share of end to end | step time | vs end to end |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        share = r[key] / end[key]
        lines.append(f"| {r['method']} | {r['K']} | {r['saved_bytes'] / 2**20:.1f} MiB"
                     + (f" (CUDA {r['cuda_peak_bytes'] / 2**20:.0f} MiB)" if r["cuda_peak_bytes"] is not None else "")
                     + f" | {100 * share:.0f} % | {1e3 * r['step_s']:.1f} ms | {r['step_s'] / end['step_s']:.2f}× |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "end to end"):
        points = [(r["K"], 100 * r[key] / end[key]) for r in rows if r["method"] == method]
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.axhline(100, color="gray", linestyle="--", label="end to end")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (modules or checkpoint segments)")
    ax.set_ylabel(f"{name}, % of end to end")
    ax.set_title(f"{args.model}, batch {args.batch}, {args.device}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pytorch-ops", action="store_true",
                        help="add the masks/recompute row on PyTorch ops instead of llkern's compiled ops")
    parser.add_argument("--segments", type=int, default=3,
                        help="recomputed segments per module in the segments rows (1: no such rows)")
    parser.add_argument("--out", default=None, help="output path without suffix (default bench/results/memory-…)")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    out = Path(args.out or f"bench/results/memory-{args.model}-{torch.device(args.device).type}")
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, _stop)  # a time limit's TERM: the table still gets the rows measured so far
    try:
        run(args, rows)
    finally:
        if any(r["method"] == "end to end" for r in rows):
            write(rows, args, out)


if __name__ == "__main__":
    main()
