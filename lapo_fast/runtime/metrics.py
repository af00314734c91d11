"""Per-step scalars kept on their device: a training step never waits for the GPU to report a
loss; the means since the last read come back in one host sync, when the loop logs or saves."""

from __future__ import annotations

import math

import torch


class StepMeans:
    def __init__(self, *names: str):
        self.names = names
        self._sums: torch.Tensor | None = None
        self._count = 0

    def add(self, *values: torch.Tensor) -> None:
        """One step's values, in the order of `names` (0-d tensors; no host read)."""
        step = torch.stack([v.detach().float().reshape(()) for v in values])
        self._sums = step if self._sums is None else self._sums + step
        self._count += 1

    def read(self) -> dict[str, float]:
        """The means since the last read (NaN/inf if any step had them), and a fresh start."""
        if self._sums is None:
            return {}
        means = dict(zip(self.names, (self._sums / self._count).tolist()))
        self._sums, self._count = None, 0
        return means

    def finite(self) -> bool:
        """Whether every step since the last read was finite (a host sync; for checkpoints)."""
        return self._sums is None or all(math.isfinite(v) for v in self._sums.tolist())
