"""Shared by the pipeline benchmarks: the model (a CIFAR ResNet cut into K local modules), fixed random
batches, and a launcher of forked gloo processes."""

from __future__ import annotations

import datetime
import io
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from torch import nn

import llkern
from llkern.models import cifar_resnet


def resnet_units(depth: int = 32, seed: int = 0) -> tuple[list[nn.Module], nn.Module]:
    """The CIFAR ResNet's stem and blocks (what local training splits), and its classifier head."""
    torch.manual_seed(seed)
    model = cifar_resnet(depth)
    children = list(model.children())
    return children[:-1], children[-1]


def local_net(depth: int = 32, k: int = 4, seed: int = 0, by: str = "saved_bytes") -> llkern.LocalNet:
    """ResNet-``depth`` without its classifier, split into ``k`` modules balanced by ``by`` (llkern.split),
    with LocalNet's default heads and cross-entropy."""
    import warnings

    units, _ = resnet_units(depth, seed)
    example = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = llkern.split(units, k, by=by, example_input=example if by != "time" else torch.randn(32, 3, 32, 32))
    torch.manual_seed(seed)
    return llkern.LocalNet(plan.modules, num_classes=10, example_input=example)


def batches(count: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, fn: Callable, queue, args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(threads)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        # as bytes: tensors through the queue would be shared memory, gone once this process exits
        buffer = io.BytesIO()
        torch.save(fn(rank, world, *args), buffer)
        queue.put((rank, buffer.getvalue()))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world: int, *args, threads: int = 1, timeout: float = 900) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` forked gloo processes of ``threads`` threads each;
    returns their results by rank."""
    context = mp.get_context("fork")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(r, world, port, threads, fn, queue, args))
                 for r in range(world)]
    for p in processes:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world:
        rank, value = queue.get(timeout=max(1.0, deadline - time.monotonic()))
        results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    for p in processes:
        p.join()
    if any(p.exitcode for p in processes):
        raise RuntimeError(f"a benchmark process failed: exit codes {[p.exitcode for p in processes]}")
    return [results[r] for r in range(world)]
