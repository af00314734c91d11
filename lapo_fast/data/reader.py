"""FrameDataset: read, verify and cache a dataset written by DatasetWriter."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


from .cached import DecodedCache
from .format import MANIFEST, DatasetError, Manifest, crc32, decompress_exact, load_npy


class FrameDataset:
    """A dataset directory opened for reading. Frames are decoded chunk by chunk; `cache()`
    decodes everything once into a raw uint8 file (data.cached.DecodedCache).

    The episode index is checked when the dataset opens (cheap: lengths, order, bounds, and the
    `done` metadata when present), so no window can cross a damaged boundary. `frame_shape`, when
    given, is required of the frames (the stages take 64x64x3). `cache_dir` is where the decoded
    cache goes: by default $LAPO_FAST_CACHE_DIR, else beside the data when that is writable, else
    a per-dataset folder in the user's cache directory."""

    def __init__(self, directory, *, frame_shape: tuple | None = None, cache_dir=None):
        self.dir = Path(directory)
        self.manifest = Manifest.load(self.dir)
        m = self.manifest
        if frame_shape is not None and tuple(m.frame_shape) != tuple(frame_shape):
            raise DatasetError(f"{self.dir}: frames are {'x'.join(map(str, m.frame_shape))}, the stages take "
                               f"{'x'.join(map(str, frame_shape))} (ingest again with --size {frame_shape[0]})")
        self._meta: dict[str, np.ndarray] = {}
        self.episodes = self._episodes()
        self.index = [load_npy(self.dir / shard.file.replace(".bin", ".idx.npy")) for shard in m.shards]
        self._check_index()
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self._cached: dict[Path, np.ndarray] = {}  # the caches opened (and checked) by this object

    @property
    def num_frames(self) -> int:
        return self.manifest.num_frames

    def __len__(self) -> int:
        return self.manifest.num_frames

    def _episodes(self) -> np.ndarray:
        m = self.manifest
        if not m.num_episodes:
            return np.zeros((0, 2), np.int64)
        if m.version == 1:
            return load_npy(self.dir / "episodes.npy")
        return np.concatenate([self._shard_array(i, "episodes") for i in range(len(m.shards))]).reshape(-1, 2)

    def _shard_array(self, i: int, part: str) -> np.ndarray:
        path = self.dir / self.manifest.shard_file(i, part)
        if not path.exists():
            raise DatasetError(f"{path}: missing ({part} of shard {i})")
        return load_npy(path)

    def _check_index(self) -> None:
        """The episode and chunk indexes against the manifest: a damaged index must not let a
        window cross an episode or read past the frames."""
        m, ep = self.manifest, self.episodes
        fix = f"(run `lapo-fast data verify {self.dir}`; re-collect or re-import the dataset)"
        if ep.ndim != 2 or ep.shape[1] != 2 or len(ep) != m.num_episodes:
            raise DatasetError(f"{self.dir}: the episode index holds {len(ep)} episodes, the manifest says "
                               f"{m.num_episodes} {fix}")
        if len(ep):
            lengths = ep[:, 1]
            if (lengths < 1).any() or ep[0, 0] != 0 or (ep[1:, 0] != ep[:-1, 0] + lengths[:-1]).any() \
                    or int(lengths.sum()) != m.num_frames:
                raise DatasetError(f"{self.dir}: the episode index is damaged: its episodes do not tile the "
                                   f"{m.num_frames} frames in order {fix}")
        first = 0
        for shard, index in zip(m.shards, self.index):
            if shard.first_frame != first or index.ndim != 2 or index.shape[1] != 5 \
                    or int(index[:, 3].sum()) != shard.frames or (index[:, :2] < 0).any() \
                    or (index[:, 0] + index[:, 1] > shard.nbytes).any():
                raise DatasetError(f"{self.dir / shard.file}: its chunk index does not match the manifest {fix}")
            first += shard.frames
        if first != m.num_frames:
            raise DatasetError(f"{self.dir / MANIFEST}: shards hold {first} frames, the manifest says {m.num_frames}")
        if "done" in m.meta_keys and len(ep):
            done = np.asarray(self.meta("done"), bool)
            ends = np.zeros(m.num_frames, bool)
            ends[ep[:, 0] + ep[:, 1] - 1] = True
            if len(done) != m.num_frames or (done != ends).any():
                raise DatasetError(f"{self.dir}: the episode index disagrees with the `done` flags "
                                   f"(first at frame {int(np.argmax(done != ends)) if len(done) == len(ends) else 0}) "
                                   f"{fix}")

    def meta(self, key: str) -> np.ndarray:
        """Per-frame metadata (per-episode for episode_return), read-only."""
        if key not in self.manifest.meta_keys:
            raise KeyError(f"{self.dir} has no metadata {key!r}; it has {self.manifest.meta_keys}")
        if self.manifest.version == 1:
            return load_npy(self.dir / "meta" / f"{key}.npy", mmap=True)
        if key not in self._meta:
            parts = [self._shard_array(i, key) for i in range(len(self.manifest.shards))]
            self._meta[key] = np.concatenate(parts) if parts else np.zeros(0)
            self._meta[key].flags.writeable = False
        return self._meta[key]

    # -- decoding ------------------------------------------------------------------------------

    def shard_path(self, i: int) -> Path:
        """Shard i's file, checked to be there with the size the manifest records."""
        shard = self.manifest.shards[i]
        path = self.dir / shard.file
        if not path.exists():
            raise DatasetError(f"{path}: shard missing")
        size = path.stat().st_size
        if size != shard.nbytes:
            raise DatasetError(f"{path}: truncated or resized shard ({size} bytes, expected {shard.nbytes})")
        return path

    def _read_shard(self, i: int) -> bytes:
        path = self.shard_path(i)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DatasetError(f"{path}: cannot read this shard ({e.strerror})") from e
        if len(data) != self.manifest.shards[i].nbytes:  # (changed since it was checked)
            raise DatasetError(f"{path}: truncated or resized shard ({len(data)} bytes, expected "
                               f"{self.manifest.shards[i].nbytes})")
        return data

    def _read_chunk(self, i: int, row) -> bytes:
        """One chunk's bytes, read with a seek (not the whole shard); the shard's size is still checked."""
        path = self.shard_path(i)
        offset, nbytes = int(row[0]), int(row[1])
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(nbytes)
        except OSError as e:
            raise DatasetError(f"{path}: cannot read this shard ({e.strerror})") from e

    def _decode_chunk(self, i: int, data: bytes, row, out: np.ndarray, *, whole_shard: bool = True) -> None:
        """Decodes the chunk `row` of shard i into out; `data` is the whole shard, or with
        whole_shard=False just this chunk's bytes."""
        offset, nbytes, first, frames, checksum = (int(v) for v in row)
        blob = data[offset:offset + nbytes] if whole_shard else data
        path = self.dir / self.manifest.shards[i].file
        if len(blob) != nbytes or crc32(blob) != checksum:
            raise DatasetError(f"{path}: chunk at byte {offset} is corrupt (checksum mismatch)")
        try:
            raw = decompress_exact(self.manifest.codec, blob, frames * self.manifest.frame_bytes)
        except ValueError as e:
            raise DatasetError(f"{path}: chunk at byte {offset} {e}") from e
        out.reshape(-1)[:] = np.frombuffer(raw, np.uint8)

    def decode_shard(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        shard = self.manifest.shards[i]
        if out is None:
            out = np.empty((shard.frames, *self.manifest.frame_shape), np.uint8)
        data = self._read_shard(i)
        for row in self.index[i]:
            lo = int(row[2]) - shard.first_frame
            self._decode_chunk(i, data, row, out[lo:lo + int(row[3])])
        return out

    def frames(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop), decoding only the chunks that hold them."""
        if not 0 <= start <= stop <= self.num_frames:
            raise IndexError(f"frames [{start}, {stop}) outside [0, {self.num_frames})")
        out = np.empty((stop - start, *self.manifest.frame_shape), np.uint8)
        for i, shard in enumerate(self.manifest.shards):
            if shard.first_frame >= stop or shard.first_frame + shard.frames <= start:
                continue
            for row in self.index[i]:
                first, n = int(row[2]), int(row[3])
                lo, hi = max(start, first), min(stop, first + n)
                if lo >= hi:
                    continue
                blob = self._read_chunk(i, row)
                if lo == first and hi == first + n:
                    self._decode_chunk(i, blob, row, out[lo - start:hi - start], whole_shard=False)
                else:
                    chunk = np.empty((n, *self.manifest.frame_shape), np.uint8)
                    self._decode_chunk(i, blob, row, chunk, whole_shard=False)
                    out[lo - start:hi - start] = chunk[lo - first:hi - first]
        return out

    def episode(self, e: int) -> np.ndarray:
        first, length = (int(v) for v in self.episodes[e])
        return self.frames(first, first + length)

    def cache_path(self) -> Path:
        """Where the decoded cache of this dataset lives (see the class docstring)."""
        if self._cache_dir is not None:
            return self._cache_dir / "cache.u8"
        if os.environ.get("LAPO_FAST_CACHE_DIR"):
            return Path(os.environ["LAPO_FAST_CACHE_DIR"]) / self.identity() / "cache.u8"
        if os.access(self.dir, os.W_OK):
            return self.dir / "cache.u8"
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return home / "lapo_fast" / self.identity() / "cache.u8"

    def identity(self) -> str:
        """A short hash of the manifest: the same for the same frames, episodes and metadata."""
        return hashlib.sha256(self.manifest.to_json().encode()).hexdigest()[:16]

    def cache(self, path=None, threads: int | None = None) -> np.ndarray:
        """All frames as a read-only (N, H, W, C) uint8 memmap, decoded once (in parallel) to
        `path` (default: cache_path()): data.cached.DecodedCache."""
        path = Path(path) if path else self.cache_path()
        if path not in self._cached:  # checked once per opened dataset
            self._cached[path] = DecodedCache(self, path).open(threads)
        return self._cached[path]

    def cache_ready(self) -> bool:
        """A decoded cache made from this manifest, of the right size, is at cache_path() (its
        checksums are checked when it is opened)."""
        return DecodedCache(self, self.cache_path()).ready()

    # -- checks --------------------------------------------------------------------------------

    def verify(self) -> dict:
        """Checks every shard's size and checksums, that every chunk decodes, and the decoded cache
        when there is one (removed if it disagrees); raises DatasetError."""
        m = self.manifest
        for i, shard in enumerate(m.shards):
            data = self._read_shard(i)
            if crc32(data) != shard.crc32:
                raise DatasetError(f"{self.dir / shard.file}: shard checksum mismatch (corrupt)")
            scratch = np.empty((m.chunk_frames, *m.frame_shape), np.uint8)
            for row in self.index[i]:
                self._decode_chunk(i, data, row, scratch[:int(row[3])])
        info = self.info()
        info["cache"] = DecodedCache(self, self.cache_path()).verify()
        for k in m.meta_keys:  # (the indexes were checked when the dataset opened)
            n = len(self.meta(k))
            want = m.num_episodes if k == "episode_return" else m.num_frames
            if n != want:
                raise DatasetError(f"{self.dir}: metadata {k!r} has {n} values, expected {want}")
        return info

    def info(self) -> dict:
        m = self.manifest
        stored = sum(s.nbytes for s in m.shards)
        lengths = self.episodes[:, 1] if len(self.episodes) else np.zeros(0)
        info = {
            "directory": str(self.dir), "frames": m.num_frames, "episodes": m.num_episodes,
            "frame_shape": list(m.frame_shape), "codec": m.codec, "chunk_frames": m.chunk_frames,
            "shards": len(m.shards), "stored_bytes": stored,
            "bytes_per_frame": stored / max(m.num_frames, 1),
            "compression_ratio": m.num_frames * m.frame_bytes / max(stored, 1),
            "episode_length_mean": float(lengths.mean()) if len(lengths) else 0.0,
            "meta": m.meta_keys, "source": m.source,
        }
        if "episode_return" in m.meta_keys and m.num_episodes:
            info["episode_return_mean"] = float(np.mean(self.meta("episode_return")))
        return info
