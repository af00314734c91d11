"""Training from a dataset without its decoded cache on disk, in bounded RAM.

PooledSampler keeps a random subset of whole episodes decoded in one fixed buffer of
`capacity_frames` frames and samples windows from it (uniformly over the resident windows). Every
`swap_every` batches it evicts `swap_fraction` of the resident episodes and decodes others in their
place, so over training every episode is visited while memory stays bounded. Use it when the disk
cannot hold the raw uint8 cache (`FrameDataset.cache()`), which remains the faster, exactly
uniform path.
"""

from __future__ import annotations

import numpy as np

from .reader import FrameDataset
from .windows import WindowSampler


class PooledSampler:
    def __init__(self, dataset: FrameDataset, capacity_frames: int, *, context: int = 1, batch_size: int = 128,
                 seed: int = 0, swap_every: int = 100, swap_fraction: float = 0.25, meta_keys=()):
        lengths = dataset.episodes[:, 1]
        window = context + 2
        self.usable = np.flatnonzero(lengths >= window)
        if len(self.usable) == 0:
            raise ValueError(f"no episode has {window} frames: nothing to sample")
        if lengths[self.usable].max() > capacity_frames:
            raise ValueError(f"capacity_frames={capacity_frames} is smaller than the longest episode "
                             f"({int(lengths.max())} frames)")
        if not 0 < swap_fraction <= 1:
            raise ValueError(f"swap_fraction must be in (0, 1], got {swap_fraction}")
        self.ds = dataset
        self.context, self.batch_size = context, batch_size
        self.swap_every, self.swap_fraction = swap_every, swap_fraction
        self.rng = np.random.default_rng(seed)
        self.buffer = np.empty((capacity_frames, *dataset.manifest.frame_shape), np.uint8)
        self.meta_keys = tuple(meta_keys)
        self._meta_src = {k: dataset.meta(k) for k in self.meta_keys}
        self.meta = {k: np.empty(capacity_frames, self._meta_src[k].dtype) for k in self.meta_keys}
        self.resident: list[int] = []   # episode ids, in buffer order
        self.visited: set[int] = set()
        self._batches = 0
        self._fill()

    @property
    def capacity(self) -> int:
        return len(self.buffer)

    def _used(self) -> int:
        return int(self.ds.episodes[self.resident, 1].sum()) if self.resident else 0

    def _fill(self) -> None:
        """Decodes random non-resident episodes into the free tail of the buffer while they fit."""
        candidates = self.rng.permutation(np.setdiff1d(self.usable, self.resident))
        at = self._used()
        for e in candidates:
            first, n = (int(v) for v in self.ds.episodes[e])
            if at + n > self.capacity:
                continue
            self.buffer[at:at + n] = self.ds.frames(first, first + n)
            for k in self.meta_keys:
                self.meta[k][at:at + n] = self._meta_src[k][first:first + n]
            self.resident.append(int(e))
            self.visited.add(int(e))
            at += n
        self._rebuild_sampler()

    def _rebuild_sampler(self) -> None:
        lengths = self.ds.episodes[self.resident, 1]
        local = np.stack([np.cumsum(lengths) - lengths, lengths], axis=1)
        used = int(lengths.sum())
        self.sampler = WindowSampler(self.buffer[:used], local, context=self.context, batch_size=self.batch_size,
                                     seed=int(self.rng.integers(2**63)),
                                     meta={k: v[:used] for k, v in self.meta.items()})

    def _swap(self) -> None:
        n_out = max(1, int(len(self.resident) * self.swap_fraction))
        evict = set(self.rng.choice(len(self.resident), n_out, replace=False).tolist())
        keep, at, src = [], 0, 0
        for pos, e in enumerate(self.resident):  # compact the kept episodes to the front, in order
            n = int(self.ds.episodes[e, 1])
            if pos not in evict:
                if at != src:
                    self.buffer[at:at + n] = self.buffer[src:src + n]
                    for k in self.meta_keys:
                        self.meta[k][at:at + n] = self.meta[k][src:src + n]
                keep.append(e)
                at += n
            src += n
        self.resident = keep
        self._fill()

    def sample(self) -> dict[str, np.ndarray]:
        if self._batches and self._batches % self.swap_every == 0:
            self._swap()
        self._batches += 1
        return self.sampler.sample()

    def __iter__(self):
        while True:
            yield self.sample()
