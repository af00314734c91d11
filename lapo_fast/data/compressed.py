"""Frames read straight from the compressed shards, with no decoded copy anywhere.

The shards are memory-mapped (so every process on a node shares one page cache of them). A read
of any set of frame indices is planned first (`plan_decode`: which chunks, how many of their
frames, which decoded frame each requested one is), then executed by a decoder: CPU
threads here, or DALI's GPU inflate (loader.DaliDecodeLoader) on the very same plan. On the CPU,
LZ4 chunks are decoded only as far as the last frame a read needs (liblz4's partial decode, when
the system has liblz4 >= 1.9; else python-lz4's whole-chunk decode); each chunk's checksum is
verified the first time this process reads it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .format import DatasetError, FrameStore, crc32, decompress_exact
from .reader import FrameDataset


@dataclass
class ChunkTable:
    """Every chunk of a dataset in frame order (the per-shard .idx.npy files, concatenated)."""

    shard: np.ndarray    # int32: which shard
    number: np.ndarray   # int32: its position in that shard
    offset: np.ndarray   # int64: byte offset in the shard file
    nbytes: np.ndarray   # int64: compressed size
    first: np.ndarray    # int64: dataset-wide index of its first frame
    frames: np.ndarray   # int64: frames it holds
    crc32: np.ndarray    # int64

    @staticmethod
    def of(ds: FrameDataset) -> "ChunkTable":
        rows = [np.asarray(ix, np.int64).reshape(-1, 5) for ix in ds.index]
        rows = np.concatenate(rows) if rows else np.zeros((0, 5), np.int64)
        shard = np.concatenate([np.full(len(ix), i, np.int32) for i, ix in enumerate(ds.index)]
                               or [np.zeros(0, np.int32)])
        number = np.concatenate([np.arange(len(ix), dtype=np.int32) for ix in ds.index] or [np.zeros(0, np.int32)])
        return ChunkTable(shard, number, rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4])

    def __len__(self) -> int:
        return len(self.first)

    def chunk_of(self, frames: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, frames, side="right") - 1


@dataclass
class DecodePlan:
    """How to produce the frames `idx` (any shape) from compressed chunks: decode the first need[j]
    frames of each chunk chunks[j]; requested frame i (idx flattened) is then frame within[i] of
    chunk chunks[slot[i]]."""

    chunks: np.ndarray   # unique chunk ids, ascending
    need: np.ndarray     # frames to decode from each (a prefix of the chunk, or all of it)
    slot: np.ndarray     # per requested frame: its chunk's position in `chunks`
    within: np.ndarray   # per requested frame: its index inside that chunk
    shape: tuple         # idx.shape

    def gather(self, stride: int) -> np.ndarray:
        """Row of every requested frame when chunk j is decoded to rows j * stride ... (a padded
        layout of equal slots, as a batched GPU decoder's output)."""
        return self.slot * stride + self.within

    def copies(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The copies out of the decoded chunks, as runs of consecutive frames (a window's frames
        in one chunk are one run): (dest, src, length, cuts); chunk j's runs are cuts[j]:cuts[j + 1],
        run r copies its frames src[r]... to requested positions dest[r]..."""
        order = np.argsort(self.slot, kind="stable")  # by chunk; in request order within one
        dest, src, chunk = order, self.within[order], self.slot[order]
        new = np.ones(len(dest), bool)
        new[1:] = (np.diff(dest) != 1) | (np.diff(src) != 1) | (np.diff(chunk) != 0)
        first = np.flatnonzero(new)
        length = np.diff(np.append(first, len(dest)))
        return dest[first], src[first], length, np.searchsorted(chunk[first], np.arange(len(self.chunks) + 1))


def plan_decode(table: ChunkTable, idx, *, whole_chunks: bool = False) -> DecodePlan:
    """The plan for frames `idx`. whole_chunks: decode every touched chunk entirely (decoders that
    cannot stop early: python-lz4, zstd, DALI); else up to the furthest frame asked of each."""
    idx = np.asarray(idx, np.int64)
    flat = idx.reshape(-1)
    chunk = table.chunk_of(flat)
    chunks, slot = np.unique(chunk, return_inverse=True)
    within = flat - table.first[chunk]
    if whole_chunks:
        need = table.frames[chunks].copy()
    else:
        need = np.zeros(len(chunks), np.int64)
        np.maximum.at(need, slot, within + 1)
    return DecodePlan(chunks, need, slot.reshape(-1), within, idx.shape)


@functools.cache
def _lz4_partial():
    """liblz4's LZ4_decompress_safe_partial through ctypes (which releases the GIL), or None."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("lz4") or "liblz4.so.1")
        if lib.LZ4_versionNumber() < 10900:  # partial decoding is exact from 1.9 on
            return None
        f = lib.LZ4_decompress_safe_partial
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    f.restype = ctypes.c_int
    return f


def default_threads(world: int = 1) -> int:
    """Decode threads per process: this machine's cores shared by the ranks on it."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, world)))


class CompressedFrames(FrameStore):
    """A dataset's frames, indexable like its decoded cache (`frames[idx]` for an integer array,
    an int or a slice) but decoded on the fly from the memory-mapped shards. Thread-safe."""

    def __init__(self, ds: FrameDataset, *, threads: int | None = None, partial: bool = True):
        self.ds = ds
        m = ds.manifest
        self.shape = (m.num_frames, *m.frame_shape)
        self.frame_bytes = m.frame_bytes
        self.table = ChunkTable.of(ds)
        self.stored_bytes = sum(s.nbytes for s in m.shards)
        self._maps = []
        for i, shard in enumerate(m.shards):
            path = ds.shard_path(i)
            # A plain ndarray view of the map: slicing a np.memmap costs microseconds per chunk.
            self._maps.append(np.asarray(np.memmap(path, np.uint8, "r")) if shard.nbytes else np.zeros(1, np.uint8))
        # Each chunk's address in memory (for liblz4) and its size, as Python ints.
        shard_at = np.array([m.ctypes.data for m in self._maps], np.int64)
        self._src = (shard_at[self.table.shard] + self.table.offset).tolist() if len(self.table) else []
        self._size = self.table.nbytes.tolist()
        self._partial = _lz4_partial() if partial and m.codec == "lz4" else None
        self._checked = np.zeros(len(self.table), bool)  # chunks whose checksum this process verified
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        self._local = threading.local()

    @property
    def nbytes(self) -> int:
        """Bytes of the frames decoded (what a decoded copy would take), as for an array."""
        return self.shape[0] * self.frame_bytes

    @property
    def chunk_slot(self) -> int:
        """Frames of the largest chunk: the slot each chunk takes in a padded decoded batch."""
        return int(self.table.frames.max()) if len(self.table) else 1

    def chunk_bytes(self, k: int) -> np.ndarray:
        """Chunk k's compressed bytes (a view of the mapped shard), its checksum verified the first
        time this process reads it."""
        t = self.table
        blob = self._maps[t.shard[k]][t.offset[k]:t.offset[k] + t.nbytes[k]]
        if not self._checked[k]:
            if crc32(blob) != t.crc32[k]:
                raise self._corrupt(k, "checksum mismatch")
            self._checked[k] = True
        return blob

    def plan(self, idx) -> DecodePlan:
        return plan_decode(self.table, idx, whole_chunks=self._partial is None)

    def read_into(self, idx, out) -> None:
        """Frames idx into `out` (a uint8 numpy array or CPU torch tensor of idx.shape + frame shape).

        Each chunk is decoded into a small per-thread buffer (it stays in the core's cache) and its
        requested frames copied out at once: measured 1.5x faster than decoding all of a batch's
        chunks into one buffer and gathering from it."""
        plan = self.plan(idx)
        target = out.numpy() if hasattr(out, "numpy") else out
        if not target.flags.c_contiguous:  # (a reshape would copy, and the frames land in the copy)
            raise ValueError("read_into needs a contiguous output")
        flat = target.reshape(-1, self.frame_bytes)
        runs = [a.tolist() for a in plan.copies()]
        jobs = np.array_split(np.arange(len(plan.chunks)), min(self.threads, max(1, len(plan.chunks))))
        pending = [self._pool.submit(self._decode_some, plan, part, runs, flat) for part in jobs[1:]]
        self._decode_some(plan, jobs[0], runs, flat)
        for p in pending:
            p.result()

    def _decode_some(self, plan: DecodePlan, part: np.ndarray, runs: list, flat: np.ndarray) -> None:
        fb = self.frame_bytes
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or len(scratch) < self.chunk_slot:
            scratch = self._local.scratch = np.empty((self.chunk_slot, fb), np.uint8)
        at = scratch.ctypes.data
        chunks, need = plan.chunks.tolist(), plan.need.tolist()
        dest, src, length, cuts = runs
        for j in part.tolist():
            k = chunks[j]
            if not self._checked[k]:
                self.chunk_bytes(k)
            n = need[j] * fb
            if self._partial is not None:
                got = self._partial(self._src[k], at, self._size[k], n, n)
                if got != n:
                    raise self._corrupt(k, f"does not decode (liblz4 returned {got}, expected {n} bytes)")
                frames = scratch
            else:
                frames = self._whole(k)
            for r in range(cuts[j], cuts[j + 1]):  # slice copies (numpy drops the GIL for them)
                flat[dest[r]:dest[r] + length[r]] = frames[src[r]:src[r] + length[r]]

    def _whole(self, k: int) -> np.ndarray:
        """Chunk k decoded entirely by the dataset's codec (python-lz4 or zstd), (frames, frame_bytes)."""
        size = int(self.table.frames[k]) * self.frame_bytes
        try:
            raw = decompress_exact(self.ds.manifest.codec, self.chunk_bytes(k), size)
        except ValueError as e:
            raise self._corrupt(k, str(e)) from e
        return np.frombuffer(raw, np.uint8).reshape(-1, self.frame_bytes)

    def _corrupt(self, k: int, why: str) -> DatasetError:
        t = self.table
        path = self.ds.dir / self.ds.manifest.shards[t.shard[k]].file
        first = int(t.first[k])
        return DatasetError(f"{path}: chunk {int(t.number[k])} (frames {first}-{first + int(t.frames[k]) - 1}, "
                            f"byte {int(t.offset[k])}) is corrupt: {why}; run `lapo-fast data verify {self.ds.dir}`"
                            " and re-collect or re-import the dataset")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def decode_all(ds: FrameDataset, out, *, threads: int | None = None) -> None:
    """Every frame of `ds` into `out` ((N, H, W, C) uint8: a numpy array, or a torch tensor on any
    device), shard by shard on `threads` threads; nothing is written to disk."""
    import torch

    shards = ds.manifest.shards
    on_torch = isinstance(out, torch.Tensor)

    def fill(i: int) -> None:
        s = shards[i]
        if not on_torch:
            ds.decode_shard(i, out[s.first_frame:s.first_frame + s.frames])
            return
        # Pageable, not pinned: a shard is up to ~200 MB, once per run, on every decode thread.
        out[s.first_frame:s.first_frame + s.frames].copy_(torch.from_numpy(ds.decode_shard(i)))

    with ThreadPoolExecutor(threads or default_threads()) as pool:
        list(pool.map(fill, range(len(shards))))
