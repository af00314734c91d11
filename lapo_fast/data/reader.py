"""FrameDataset: read, verify and cache a dataset written by DatasetWriter."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lapo_fast.runtime.files import atomic_write

from .format import MANIFEST, DatasetError, Manifest, crc32, decompress


class FrameDataset:
    """A dataset directory opened for reading. Frames are decoded chunk by chunk; `cache()`
    decodes everything once into a raw uint8 memory map that the window sampler gathers from."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.manifest = Manifest.load(self.dir)
        m = self.manifest
        self._meta: dict[str, np.ndarray] = {}
        self.episodes = self._episodes()
        if len(self.episodes) != m.num_episodes:
            raise DatasetError(f"{self.dir}: the episode index holds {len(self.episodes)} episodes, the manifest "
                               f"says {m.num_episodes}")
        self.index = []
        for shard in m.shards:
            path = self.dir / shard.file.replace(".bin", ".idx.npy")
            if not path.exists():
                raise DatasetError(f"{path}: chunk index missing")
            self.index.append(np.load(path))

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
            return np.load(self.dir / "episodes.npy")
        return np.concatenate([self._shard_array(i, "episodes") for i in range(len(m.shards))]).reshape(-1, 2)

    def _shard_array(self, i: int, part: str) -> np.ndarray:
        path = self.dir / self.manifest.shard_file(i, part)
        if not path.exists():
            raise DatasetError(f"{path}: missing ({part} of shard {i})")
        return np.load(path)

    def meta(self, key: str) -> np.ndarray:
        """Per-frame metadata (per-episode for episode_return), read-only."""
        if key not in self.manifest.meta_keys:
            raise KeyError(f"{self.dir} has no metadata {key!r}; it has {self.manifest.meta_keys}")
        if self.manifest.version == 1:
            return np.load(self.dir / "meta" / f"{key}.npy", mmap_mode="r")
        if key not in self._meta:
            parts = [self._shard_array(i, key) for i in range(len(self.manifest.shards))]
            self._meta[key] = np.concatenate(parts) if parts else np.zeros(0)
            self._meta[key].flags.writeable = False
        return self._meta[key]

    # -- decoding ------------------------------------------------------------------------------

    def _read_shard(self, i: int) -> bytes:
        shard = self.manifest.shards[i]
        path = self.dir / shard.file
        if not path.exists():
            raise DatasetError(f"{path}: shard missing")
        data = path.read_bytes()
        if len(data) != shard.nbytes:
            raise DatasetError(f"{path}: truncated or resized shard ({len(data)} bytes, expected {shard.nbytes})")
        return data

    def _read_chunk(self, i: int, row) -> bytes:
        """One chunk's bytes, read with a seek (not the whole shard); the shard's size is still checked."""
        shard = self.manifest.shards[i]
        path = self.dir / shard.file
        if not path.exists():
            raise DatasetError(f"{path}: shard missing")
        size = path.stat().st_size
        if size != shard.nbytes:
            raise DatasetError(f"{path}: truncated or resized shard ({size} bytes, expected {shard.nbytes})")
        offset, nbytes = int(row[0]), int(row[1])
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(nbytes)

    def _decode_chunk(self, i: int, data: bytes, row, out: np.ndarray, *, whole_shard: bool = True) -> None:
        """Decodes the chunk `row` of shard i into out; `data` is the whole shard, or with
        whole_shard=False just this chunk's bytes."""
        offset, nbytes, first, frames, checksum = (int(v) for v in row)
        blob = data[offset:offset + nbytes] if whole_shard else data
        path = self.dir / self.manifest.shards[i].file
        if len(blob) != nbytes or crc32(blob) != checksum:
            raise DatasetError(f"{path}: chunk at byte {offset} is corrupt (checksum mismatch)")
        fb = self.manifest.frame_bytes
        try:
            raw = decompress(self.manifest.codec, blob, frames * fb)
        except Exception as e:  # the codec's own error for bad data
            raise DatasetError(f"{path}: chunk at byte {offset} does not decode ({e})") from e
        if len(raw) != frames * fb:
            raise DatasetError(f"{path}: chunk at byte {offset} decodes to {len(raw)} bytes, expected {frames * fb}")
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

    def cache(self, path=None, threads: int | None = None) -> np.ndarray:
        """All frames as a read-only (N, H, W, C) uint8 memmap, decoded once (in parallel) to
        `path` (default: DIR/cache.u8); reused when it is already complete and newer."""
        path = Path(path) if path else self.dir / "cache.u8"
        shape = (self.num_frames, *self.manifest.frame_shape)
        done = path.with_name(path.name + ".done")
        if not (path.exists() and done.exists() and done.read_text() == self.manifest.to_json()):
            atomic_write(path, lambda tmp: self._decode_all(tmp, shape, threads))
            atomic_write(done, self.manifest.to_json())
        if shape[0] == 0:
            return np.zeros(shape, np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)

    def _decode_all(self, path: Path, shape: tuple, threads: int | None) -> None:
        if not shape[0]:
            path.write_bytes(b"")
            return
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
        shards = self.manifest.shards
        with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
            list(pool.map(lambda i: self.decode_shard(i, mm[shards[i].first_frame:][:shards[i].frames]),
                          range(len(shards))))
        mm.flush()
        del mm

    # -- checks --------------------------------------------------------------------------------

    def verify(self) -> dict:
        """Checks every shard's size and checksums and that every chunk decodes; raises DatasetError."""
        m = self.manifest
        frames = 0
        for i, shard in enumerate(m.shards):
            data = self._read_shard(i)
            if crc32(data) != shard.crc32:
                raise DatasetError(f"{self.dir / shard.file}: shard checksum mismatch (corrupt)")
            scratch = np.empty((m.chunk_frames, *m.frame_shape), np.uint8)
            for row in self.index[i]:
                self._decode_chunk(i, data, row, scratch[:int(row[3])])
            if shard.first_frame != frames:
                raise DatasetError(f"{self.dir / shard.file}: starts at frame {shard.first_frame}, expected {frames}")
            frames += shard.frames
        if frames != m.num_frames:
            raise DatasetError(f"{self.dir / MANIFEST}: shards hold {frames} frames, manifest says {m.num_frames}")
        ep = self.episodes
        if len(ep) and (ep[0, 0] != 0 or (ep[1:, 0] != ep[:-1, 0] + ep[:-1, 1]).any() or ep[-1].sum() != frames):
            raise DatasetError(f"{self.dir}: the episode index does not tile the frames")
        for k in m.meta_keys:
            n = len(self.meta(k))
            want = m.num_episodes if k == "episode_return" else frames
            if n != want:
                raise DatasetError(f"{self.dir}: metadata {k!r} has {n} values, expected {want}")
        return self.info()

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
