"""The decoded cache (FrameDataset.cache(): every frame raw in one uint8 file) as the training
loaders read it: with pread into each batch's buffer, not through a memory map. A mapped file
truncated while a run reads it kills the process with SIGBUS, which no handler can turn into an
error; a short pread is a DatasetError naming the file, and the rerun rebuilds the cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .format import DatasetError, FrameReader, frame_indices


class CachedFrames(FrameReader):
    """A dataset's decoded cache file, indexable like the cache array (`frames[idx]`) and read
    into batches with `read_into` (one pread per run of consecutive frames). Thread-safe."""

    def __init__(self, path, shape: tuple):
        self.path = Path(path)
        self.shape = tuple(int(v) for v in shape)
        self.frame_bytes = int(np.prod(self.shape[1:]))
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)
        if os.fstat(self._fd).st_size != self.nbytes:
            error = self._damaged()
            self.close()
            raise error

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.frame_bytes

    def read_into(self, idx, out) -> None:
        """Frames idx into `out` (a contiguous uint8 numpy array or CPU tensor of idx.shape + frame
        shape); a window's frames, consecutive in the file, are one read."""
        flat = frame_indices(idx, len(self)).reshape(-1)  # (a short read must mean a truncated file)
        if not flat.size:
            return
        target = out.numpy() if hasattr(out, "numpy") else out
        if not target.flags.c_contiguous:
            raise ValueError("read_into needs a contiguous output")
        buf = memoryview(target.reshape(-1))
        fb = self.frame_bytes
        breaks = np.flatnonzero(np.diff(flat) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, flat.size].tolist()):
            if os.preadv(self._fd, [buf[lo * fb:hi * fb]], int(flat[lo]) * fb) != (hi - lo) * fb:
                raise self._damaged()

    def _damaged(self) -> DatasetError:
        size = os.fstat(self._fd).st_size
        return DatasetError(f"{self.path}: the decoded cache holds {size:,} bytes, {self.nbytes:,} expected (truncated "
                            "while in use?); rerun the same command: a damaged cache is rebuilt")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
