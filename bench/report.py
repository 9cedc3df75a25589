"""Turn bench/results/results.jsonl into a markdown table: the latest row per device, op, dtype and impl.

Usage: ``python bench/report.py [results.jsonl]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "results.jsonl"


def table(path: Path = DEFAULT) -> str:
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "op" not in row or "median_ms" not in row:  # (the pipeline's images/s rows: not an op timing)
                continue
            latest[(row["device"], row["op"], row["dtype"], str(row["shape"]), row["impl"])] = row
    lines = ["| device | op | shape | dtype | impl | median ms | IQR ms | GB/s | extra MiB | date |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in latest.values():
        rate = row.get("GB_per_s") or row.get("GBps")  # (gpu_context.py names it GBps)
        bandwidth = f"{rate:.1f}" if rate else "-"
        extra = f"{row['extra_MiB']:.0f}" if row.get("extra_MiB") is not None else "-"
        lines.append(f"| {row['device']} | {row['op']} | {row['shape']} | {row['dtype']} | {row['impl']} | "
                     f"{row['median_ms']:.3f} | {row.get('iqr_ms', float('nan')):.3f} | {bandwidth} | {extra} | "
                     f"{row['date']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
