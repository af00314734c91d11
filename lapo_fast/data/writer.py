"""DatasetWriter: append whole episodes; shards and the manifest are committed atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lapo_fast.envs.games import OBS_SHAPE
from lapo_fast.runtime.files import atomic_write

from .format import (
    CHUNK_FRAMES, CODECS, MANIFEST, DatasetError, Manifest, ShardInfo,
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

    def __init__(self, directory, *, frame_shape=OBS_SHAPE, codec: str = "lz4", chunk_frames: int = CHUNK_FRAMES,
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
        if (self.dir / MANIFEST).exists():
            if not resume:
                raise DatasetError(f"{self.dir} already holds a dataset; pass resume=True to append to it")
            self.manifest = Manifest.load(self.dir)
            if self.manifest.version == 1:
                _upgrade_v1(self.dir, self.manifest)
        else:
            self.manifest = Manifest(tuple(frame_shape), codec, chunk_frames, source=source or {})
        self._meta_keys = self.manifest.meta_keys if self.manifest.num_episodes else None
        for stale in self.dir.glob("shards/.*.tmp*"):  # an interrupted shard: never committed
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
        """Commits the open shard (if any): its frames, index, episodes and metadata, then the
        manifest that makes them part of the dataset."""
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
        _save_npy(self.dir / f"{name}.idx.npy", np.array(index, dtype=np.int64))
        _save_npy(self.dir / f"{name}.episodes.npy", np.array(self._pending_eps, dtype=np.int64).reshape(-1, 2))
        for k, parts in self._pending_meta.items():
            _save_npy(self.dir / f"{name}.{k}.npy", np.concatenate(parts))
        atomic_write(self.dir / f"{name}.bin", data)

        m.shards.append(ShardInfo(f"{name}.bin", first, len(frames), len(data), crc32(data)))
        m.num_frames += len(frames)
        m.num_episodes += len(self._pending_eps)
        m.meta_keys = sorted(self._pending_meta)
        atomic_write(self.dir / "manifest.json", m.to_json().encode())
        self._pending, self._pending_eps, self._pending_meta, self._pending_frames = [], [], {}, 0

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        # On error, keep what was committed; the open shard is dropped (its episodes never landed).
        if exc_type is None:
            self.close()


def _upgrade_v1(directory: Path, m: Manifest) -> None:
    """Rewrites a version-1 dataset's whole-dataset episode and metadata files per shard (version
    2), then commits the new manifest; the old files go only after that, so an interruption
    leaves a dataset one of the two versions reads."""
    episodes = np.load(directory / "episodes.npy") if m.num_episodes else np.zeros((0, 2), np.int64)
    meta = {k: np.load(directory / "meta" / f"{k}.npy") for k in m.meta_keys}
    ep_first = 0
    for i, shard in enumerate(m.shards):
        ep_end = int(np.searchsorted(episodes[:, 0], shard.first_frame + shard.frames))
        base = directory / shard.file.replace(".bin", "")
        _save_npy(Path(f"{base}.episodes.npy"), episodes[ep_first:ep_end])
        for k, values in meta.items():
            part = (values[ep_first:ep_end] if k == "episode_return"
                    else values[shard.first_frame:shard.first_frame + shard.frames])
            _save_npy(Path(f"{base}.{k}.npy"), part)
        ep_first = ep_end
    m.version = 2
    atomic_write(directory / "manifest.json", m.to_json().encode())
    (directory / "episodes.npy").unlink(missing_ok=True)
    for k in meta:
        (directory / "meta" / f"{k}.npy").unlink(missing_ok=True)
    if (directory / "meta").is_dir() and not any((directory / "meta").iterdir()):
        (directory / "meta").rmdir()


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))
