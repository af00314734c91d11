"""What the benchmark scripts share: timing, tables, JSON. (The VQ cases are the package's:
lapo_fast/ops/vq_cases.py, which the selftest shares.)"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> float:
    """Median wall time of fn() in seconds over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def dump_json(path: str, payload: dict) -> None:
    if path == "-":
        print(json.dumps(payload, indent=2))
    else:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
