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

    Linux's peak-RSS counter (VmHWM) is reset after ``setup`` (writing 5 to
    /proc/self/clear_refs), so the figure counts every allocation of the step (PyTorch's,
    llkern's buffer cache, BLAS workspaces), not just tensors.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch, torch.nn.functional as F, llkern

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1])  # kB

        {setup}
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        base = status("VmRSS:")
        for _ in range({repeats}):
            {step}
        print((status("VmHWM:") - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
