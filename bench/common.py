"""Shared by the benchmarks: the results file and the machine description."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "results.jsonl"


def machine() -> dict:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "host": os.uname().nodename}


def append_result(row: dict, path: Path = RESULTS) -> None:
    """Append one measurement (op, shape, dtype, impl, median_ms, iqr_ms, ...) with the machine's facts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({**machine(), **row}) + "\n")


def peak_rss_extra_mib(setup: str, step: str, repeats: int = 5) -> float:
    """Peak resident memory (MiB) that ``step`` adds over what ``setup`` left, in a fresh process.

    ``ru_maxrss`` cannot be reset, so each measurement runs in its own interpreter: it counts
    every allocation (PyTorch's, llkern's buffer cache, BLAS workspaces), not just tensors.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, torch, torch.nn.functional as F, llkern
        {setup}
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range({repeats}):
            {step}
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
