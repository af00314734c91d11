"""The decoded cache: every frame of a dataset raw in one uint8 file, built and checked
(DecodedCache, what FrameDataset.cache() opens), and read by the training loaders (CachedFrames):
with pread into each batch's buffer, not through a memory map. A mapped file
truncated while a run reads it kills the process with SIGBUS, which no handler can turn into an
error; a short pread is a DatasetError naming the file, and the rerun rebuilds the cache."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lapo_fast.runtime.files import atomic_write

from .format import DatasetError, FrameStore, crc32, frame_indices


class CachedFrames(FrameStore):
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

class DecodedCache:
    """A dataset's decoded cache: every frame raw in one uint8 file, with a record beside it
    (`<file>.done`: the manifest it was made from and per-shard checksums). Built once, in
    parallel, atomically; reused only while it matches the dataset, rebuilt when it does not."""

    def __init__(self, ds, path: Path):
        self.ds, self.path = ds, Path(path)
        self.done = self.path.with_name(self.path.name + ".done")
        self.shape = (ds.num_frames, *ds.manifest.frame_shape)

    def open(self, threads: int | None = None) -> np.ndarray:
        """The frames as a read-only memmap, checked against the dataset (built or rebuilt first)."""
        if self.shape[0] == 0:
            return np.zeros(self.shape, np.uint8)
        problem = self.problem(threads)
        if problem is not None:
            if problem != "absent":
                print(f"data: {self.path}: {problem}; rebuilding it")
            self._write(threads)
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)

    def ready(self) -> bool:
        """Made from this manifest and of the right size (its checksums are checked by open)."""
        return self._record()[0] is None

    def verify(self) -> str:
        """'none', 'ok', or what was wrong with the cache, which is then removed (the next stage
        that reads frames rebuilds it)."""
        problem = self.problem()
        if problem is None:
            return "ok"
        if problem == "absent":
            return "none"
        self.path.unlink(missing_ok=True)
        self.done.unlink(missing_ok=True)
        return f"removed ({problem}); rebuilt on next use"

    def _record(self) -> tuple[str | None, dict]:
        """(what is wrong with the cache short of its checksums, or None; its record)."""
        if not self.path.exists() or not self.done.exists():
            return "absent", {}
        try:
            record = json.loads(self.done.read_text())
        except (json.JSONDecodeError, OSError):
            return "its record is damaged", {}
        if not isinstance(record, dict) or record.get("manifest") != self.ds.manifest.to_json():
            return "it was made from another version of the dataset", {}
        if self.path.stat().st_size != self.ds.num_frames * self.ds.manifest.frame_bytes:
            return "it has the wrong size", {}
        return None, record

    def problem(self, threads: int | None = None) -> str | None:
        """None when the cache holds exactly the dataset's frames, else what is wrong."""
        problem, record = self._record()
        if problem is not None:
            return problem
        sums = self._shard_sums(np.memmap(self.path, dtype=np.uint8, mode="r"), threads)
        bad = [i for i, (a, b) in enumerate(zip(sums, record.get("crc32", []))) if a != b]
        if bad or len(record.get("crc32", [])) != len(sums):
            return f"it disagrees with the dataset (shard {bad[0] if bad else '?'}: checksum mismatch)"
        return None

    def _shard_sums(self, mm: np.ndarray, threads: int | None) -> list[int]:
        fb = self.ds.manifest.frame_bytes
        with ThreadPoolExecutor(threads or os.cpu_count()) as pool:  # zlib releases the GIL
            return list(pool.map(lambda s: crc32(mm[s.first_frame * fb:(s.first_frame + s.frames) * fb]),
                                 self.ds.manifest.shards))

    def _write(self, threads: int | None) -> None:
        path, shape = self.path, self.shape
        nbytes = int(np.prod(shape))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"{path.parent}: cannot create the cache folder ({e.strerror}); "
                               "set LAPO_FAST_CACHE_DIR to a writable folder") from e
        free = shutil.disk_usage(path.parent).free
        if free < nbytes:
            raise DatasetError(f"{path}: the decoded cache needs {nbytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB "
                               "are free there: free space, or set LAPO_FAST_CACHE_DIR to a disk with room")
        sums: list[int] = []

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # the space is allocated for real: a full disk fails here, not mid-write
                try:
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                except OSError as e:
                    raise DatasetError(f"{path}: cannot allocate the {nbytes / 2**30:.2f} GiB decoded cache "
                                       f"({e.strerror}); free space or set LAPO_FAST_CACHE_DIR") from e
            mm = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)
            shards = self.ds.manifest.shards

            def fill(i: int) -> int:
                part = mm[shards[i].first_frame:][:shards[i].frames]
                self.ds.decode_shard(i, part)
                return crc32(part)

            with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
                sums.extend(pool.map(fill, range(len(shards))))
            mm.flush()

        atomic_write(path, write)
        atomic_write(self.done, json.dumps({"manifest": self.ds.manifest.to_json(), "crc32": sums}))
