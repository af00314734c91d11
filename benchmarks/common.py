"""What the benchmark scripts share: timing, tables, JSON, and the VQ cases (vq_kernel runs them,
vq_compile compiles them)."""

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


# (name, layout, rows B, groups G, codes K, dim d, latents L)
VQ_CASES = [
    ("LAPO B=128", "lapo", 128, 2, 64, 16, 4),
    ("LAPO B=4096", "lapo", 4096, 2, 64, 16, 4),
    ("LAPO B=65536", "lapo", 65536, 2, 64, 16, 4),
    ("K64 d16 N=65536", "grouped", 65536, 1, 64, 16, 1),
    ("K1024 d64 N=8192", "grouped", 8192, 1, 1024, 64, 1),
    ("K8192 d256 N=1024", "grouped", 1024, 1, 8192, 256, 1),
]

# VQ-VAE tokenizers' codebooks (one codebook, K codes of d dims): rows up to 65,536, fewer where
# K x d is large, so that a row tile of the PyTorch reference stays a few GFLOP on a CPU.
TOKENIZER_CASES = [(f"tokenizer K{K} d{d}", "grouped", min(65536, max(1024, 2**31 // (K * d))), 1, K, d, 1)
                   for K in (1024, 8192, 16384) for d in (8, 32, 64, 256)]
