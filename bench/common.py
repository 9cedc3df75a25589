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
