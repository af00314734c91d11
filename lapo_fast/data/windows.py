"""Batch sampling: windows (o_{t-k}, ..., o_t, o_{t+1}) that never cross an episode boundary
(WindowSampler), or single rows with their targets (RowSampler); both exactly uniform, with
replacement, from a seeded stream, over any FrameStore (arrays and tensors are wrapped in one)."""

from __future__ import annotations

import numpy as np

from .stores import as_store


def valid_starts(episodes: np.ndarray, window: int) -> np.ndarray:
    """First-frame indices of every window of `window` frames lying inside one episode."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    firsts, lengths = episodes[:, 0], episodes[:, 1]
    counts = np.maximum(lengths - window + 1, 0)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"no episode has {window} frames: nothing to sample")
    # For each valid window: its episode's first frame + its offset within the episode.
    ep_of = np.repeat(np.arange(len(episodes)), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return firsts[ep_of] + offset


class WindowSampler:
    """Uniform batches of windows over valid positions (with replacement), seeded.

    context k: windows hold k + 2 frames, o_{t-k} .. o_t, o_{t+1} (LAPO's IDM: k = 1).
    Returns frames (B, k+2, H, W, C) uint8 gathered from `frames`, and optionally the per-frame
    metadata windows (e.g. true actions for probes).
    """

    def __init__(self, frames, episodes: np.ndarray, *, context: int = 1,
                 batch_size: int = 128, seed: int = 0, meta: dict[str, np.ndarray] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.frames = as_store(frames)
        self.window = context + 2
        self.batch_size = batch_size
        self.starts = valid_starts(np.asarray(episodes), self.window)
        self.rng = np.random.default_rng(seed)
        self.meta = meta or {}
        self._offsets = np.arange(self.window)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def draw_size(self) -> int:
        """Frames per batch."""
        return self.batch_size * self.window

    def sample_indices(self) -> np.ndarray:
        """(B, window) frame indices of one batch."""
        pick = self.rng.integers(0, len(self.starts), self.batch_size)
        return self.starts[pick][:, None] + self._offsets

    def draw(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One batch's frame indices and metadata windows (what the loaders gather)."""
        idx = self.sample_indices()
        return idx, {k: np.asarray(v[idx]) for k, v in self.meta.items()}

    def sample(self) -> dict[str, np.ndarray]:
        idx, extras = self.draw()
        return {"obs": np.asarray(self.frames[idx]), **extras}

    def __iter__(self):
        while True:
            yield self.sample()


class RowSampler:
    """Uniform batches of rows (with replacement), seeded: row r is frame frame_of[r] with
    targets[k][r] (stage 2: o_t and its IDM label)."""

    def __init__(self, frames, frame_of: np.ndarray, targets: dict[str, np.ndarray], *, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.frames = as_store(frames)
        self.frame_of = np.asarray(frame_of)
        self.targets = targets
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    @property
    def draw_size(self) -> int:
        return self.batch_size

    def draw(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        pick = self.rng.integers(0, len(self.frame_of), self.batch_size)
        return self.frame_of[pick], {k: v[pick] for k, v in self.targets.items()}


class InOrder:
    """Given batches of frame indices, in order, once (a pass over a dataset: labelling windows,
    projecting latents); the loaders take it as they take a sampler."""

    def __init__(self, frames, batches: list[np.ndarray]):
        self.frames = as_store(frames)
        self.batches = batches
        self.draw_size = max((b.size for b in batches), default=1)
        self._next = iter(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def draw(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return next(self._next), {}
