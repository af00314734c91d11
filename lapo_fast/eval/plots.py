"""What the run report (stages/report.py) and a sweep's aggregate (sweep/aggregate.py) both draw
with: pyplot without a display, atomic figure files, PPO-style training curves of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lapo_fast.runtime.files import atomic_write

SCRATCH_RUNS = ("ppo", "demo")  # a PPO-from-scratch curve: a dedicated run, else the demonstrator's own


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, path: Path) -> str:
    """Writes a figure atomically and closes it; returns its file name (what reports link)."""
    fig.tight_layout()
    atomic_write(path, fig.savefig)
    pyplot().close(fig)
    return path.name


def smooth(y: np.ndarray, k: int = 5) -> np.ndarray:
    """A centred running mean of k points (edges padded), as long as y."""
    if len(y) < k:
        return y
    return np.convolve(np.pad(y, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, mode="valid")


def training_curve(run, stage: str):
    """(env steps, mean return of the episodes that ended) of a PPO-style stage of a RunDir, None
    without any."""
    rows = [r for r in run.read_metrics(stage) if r.get("episode_return") is not None]
    return (np.array([r["env_steps"] for r in rows]), np.array([r["episode_return"] for r in rows])) if rows else None
