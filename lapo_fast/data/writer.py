"""DatasetWriter: append whole episodes; shards and the manifest are committed atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .format import (
    CODECS, MANIFEST, DatasetError, Manifest, ShardInfo, atomic_save_npy, atomic_write_bytes,
    compress, crc32,
)

META_DTYPES = {"action": np.uint8, "reward": np.float32, "done": np.bool_, "value": np.float32}


class DatasetWriter:
    """Writes episodes of uint8 frames (T, H, W, C) into a dataset directory.

    A shard is closed (written, renamed, and the manifest committed) once it holds at least
    `shard_frames` frames, at an episode end. `resume=True` reopens an existing dataset and
    appends after its last committed episode; anything uncommitted from an interrupted run is
    discarded.
    """

    def __init__(self, directory, *, frame_shape=(64, 64, 3), codec: str = "lz4", chunk_frames: int = 256,
                 shard_frames: int = 16384, source: dict | None = None, resume: bool = False,
                 level: int | None = None):
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
        if chunk_frames < 1 or shard_frames < 1:
            raise ValueError("chunk_frames and shard_frames must be >= 1")
        self.dir = Path(directory)
        self.level = level
        self.shard_frames = shard_frames
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.dir / "meta").mkdir(exist_ok=True)
        if (self.dir / MANIFEST).exists():
            if not resume:
                raise DatasetError(f"{self.dir} already holds a dataset; pass resume=True to append to it")
            self.manifest = Manifest.load(self.dir)
            self.episodes = np.load(self.dir / "episodes.npy").tolist() if self.manifest.num_episodes else []
            self.meta = {k: [np.load(self.dir / "meta" / f"{k}.npy")] for k in self.manifest.meta_keys}
        else:
            self.manifest = Manifest(tuple(frame_shape), codec, chunk_frames, source=source or {})
            self.episodes = []
            self.meta = {}
        self._meta_keys = self.manifest.meta_keys if self.manifest.num_episodes else None
        for stale in self.dir.glob("shards/*.tmp"):  # an interrupted shard: never committed
            stale.unlink()
        self._pending: list[np.ndarray] = []   # frames of the open shard
        self._pending_eps: list[tuple[int, int]] = []
        self._pending_meta: dict[str, list[np.ndarray]] = {}
        self._pending_frames = 0

    @property
    def num_frames(self) -> int:
        return self.manifest.num_frames + self._pending_frames

    def add_episode(self, frames: np.ndarray, **meta) -> None:
        """frames: (T, H, W, C) uint8. meta: per-frame arrays of length T (action, reward, done,
        value), and episode_return (a scalar)."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != self.manifest.frame_shape:
            raise ValueError(f"frames must be uint8 of shape (T, {', '.join(map(str, self.manifest.frame_shape))}), "
                             f"got {frames.dtype} {frames.shape}")
        if len(frames) == 0:
            raise ValueError("an episode needs at least one frame")
        keys = sorted(meta)
        if self._meta_keys is None:
            self._meta_keys = keys
        elif keys != self._meta_keys:
            raise ValueError(f"every episode needs the same metadata keys: {self._meta_keys}, got {keys}")
        for k, v in meta.items():
            v = np.asarray(v)
            if k == "episode_return":
                v = v.reshape(1).astype(np.float32)
            elif len(v) != len(frames):
                raise ValueError(f"meta {k!r} has {len(v)} values for {len(frames)} frames")
            else:
                v = v.astype(META_DTYPES.get(k, v.dtype))
            self._pending_meta.setdefault(k, []).append(v)
        start = self.num_frames
        self._pending.append(np.ascontiguousarray(frames))
        self._pending_eps.append((start, len(frames)))
        self._pending_frames += len(frames)
        if self._pending_frames >= self.shard_frames:
            self.flush()

    def flush(self) -> None:
        """Commits the open shard (if any): shard file, index, episodes, metadata, then manifest."""
        if not self._pending:
            return
        m = self.manifest
        frames = np.concatenate(self._pending)
        first = m.num_frames
        name = f"shards/{len(m.shards):05d}"
        chunks, index, offset = [], [], 0
        for i in range(0, len(frames), m.chunk_frames):
            raw = frames[i:i + m.chunk_frames]
            blob = compress(m.codec, raw.tobytes(), self.level)
            index.append((offset, len(blob), first + i, len(raw), crc32(blob)))
            chunks.append(blob)
            offset += len(blob)
        data = b"".join(chunks)
        atomic_save_npy(self.dir / f"{name}.idx.npy", np.array(index, dtype=np.int64))
        atomic_write_bytes(self.dir / f"{name}.bin", data)

        self.episodes += self._pending_eps
        atomic_save_npy(self.dir / "episodes.npy", np.array(self.episodes, dtype=np.int64).reshape(-1, 2))
        for k, parts in self._pending_meta.items():
            self.meta.setdefault(k, [])
            self.meta[k] += parts
            atomic_save_npy(self.dir / "meta" / f"{k}.npy", np.concatenate(self.meta[k]))
        m.shards.append(ShardInfo(f"{name}.bin", first, len(frames), len(data), crc32(data)))
        m.num_frames += len(frames)
        m.num_episodes = len(self.episodes)
        m.meta_keys = sorted(self.meta)
        atomic_write_bytes(self.dir / "manifest.json", m.to_json().encode())
        self._pending, self._pending_eps, self._pending_meta, self._pending_frames = [], [], {}, 0

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        # On error, keep what was committed; the open shard is dropped (its episodes never landed).
        if exc_type is None:
            self.close()

