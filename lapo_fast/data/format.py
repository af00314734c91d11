"""The on-disk frame dataset format (version 2).

A dataset is a directory:

    manifest.json              small, versioned: frame shape, codec, counts, source, shard list
    shards/00000.bin           compressed chunks of frames, in episode order (whole episodes per shard)
    shards/00000.idx.npy       per chunk: byte offset, byte size, first frame, frame count, crc32
    shards/00000.episodes.npy  (E_shard, 2) int64: first frame (dataset-wide), length
    shards/00000.<key>.npy     optional per-frame metadata (action, reward, done, value) and
                               episode_return per episode; read only by evaluation and the small
                               labelled decoder set, never by the latent stages

Everything about a shard is written with it, so committing a shard costs the same at the 500th
shard as at the first. Version 1 kept episodes.npy and meta/<key>.npy for the whole dataset,
rewritten at every shard (quadratic I/O); it is still read, and a writer resuming a version-1
dataset converts it first.

Frames are raw (H, W, C) uint8, compressed losslessly chunk by chunk (the world model must
reconstruct 1-2 px sprites; lossy video codecs smear them). The default codec is LZ4 in its
high-compression mode as raw blocks of CHUNK_FRAMES frames (~6x smaller than raw on Procgen
frames; chunks are independent, so training decodes only those a batch needs), the format NVIDIA
DALI's fn.decoders.inflate decompresses on the GPU. zstd is the alternative (smaller, slower to
decode, CPU only).
Every shard is written to a temporary name and renamed when complete, and the manifest is
rewritten atomically after each shard, so an interrupted writer leaves a valid dataset.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
CODECS = ("lz4", "zstd")
INDEX_FIELDS = ("offset", "nbytes", "first_frame", "frames", "crc32")
# Frames per chunk of new datasets: training from the compressed shards decodes a chunk (up to the
# frame it needs) per window, so small chunks are fast to sample and large ones small on disk;
# 32 is the measured balance (docs/experiments.md, "Chunk size"). Any size still reads.
CHUNK_FRAMES = 32


class DatasetError(Exception):
    """A dataset is missing, malformed, truncated or corrupt; the message names the file."""


@dataclass
class ShardInfo:
    file: str        # relative to the dataset directory
    first_frame: int
    frames: int
    nbytes: int
    crc32: int       # of the whole shard file


@dataclass
class Manifest:
    frame_shape: tuple[int, int, int]
    codec: str
    chunk_frames: int
    num_frames: int = 0
    num_episodes: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    meta_keys: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # what made it: game, policy, seeds, options
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["frame_shape"] = list(self.frame_shape)
        return json.dumps(d, indent=1)

    @staticmethod
    def load(directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise DatasetError(f"{path}: no dataset manifest here (is {directory} a lapo_fast dataset?)")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise DatasetError(f"{path}: malformed manifest (a JSON object expected, found {type(d).__name__})")
            if d.get("version") not in READABLE_VERSIONS:
                raise DatasetError(f"{path}: format version {d.get('version')} is not one this lapo_fast reads "
                                   f"{READABLE_VERSIONS}: upgrade lapo_fast")
            d["frame_shape"] = tuple(d["frame_shape"])
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            m = Manifest(**d)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError) as e:
            raise DatasetError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
        shape = m.frame_shape
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape) or shape[2] not in (1, 3, 4):
            raise DatasetError(f"{path}: frame_shape must be [height, width, channels] (e.g. [64, 64, 3]), "
                               f"got {list(shape)}")
        if m.codec not in CODECS:
            raise DatasetError(f"{path}: unknown codec {m.codec!r}")
        if not isinstance(m.chunk_frames, int) or m.chunk_frames < 1:
            raise DatasetError(f"{path}: chunk_frames must be a positive integer, got {m.chunk_frames!r}")
        return m

    def shard_file(self, i: int, part: str) -> str:
        """Path (relative) of shard i's `part`: "episodes" or a metadata key (version 2)."""
        return self.shards[i].file.replace(".bin", f".{part}.npy")

    @property
    def frame_bytes(self) -> int:
        h, w, c = self.frame_shape
        return h * w * c


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    """A dataset's .npy file (never pickled data); any damage is a DatasetError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: missing")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: unreadable or damaged .npy file ({e})") from e


# -- codecs: one chunk of frames <-> bytes -------------------------------------------------------

def compress(codec: str, raw: bytes, level: int | None = None) -> bytes:
    if codec == "lz4":
        import lz4.block

        # Raw LZ4 block (no size header): the layout DALI's GPU inflate reads.
        return lz4.block.compress(raw, mode="high_compression", compression=level or 9, store_size=False)
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=level or 3).compress(raw)
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")


def decompress(codec: str, data: bytes, raw_size: int) -> bytes:
    if codec == "lz4":
        import lz4.block

        return lz4.block.decompress(data, uncompressed_size=raw_size)
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_size)


def decompress_exact(codec: str, data, raw_size: int) -> bytes:
    """decompress(), and ValueError saying what is wrong when `data` does not decode to exactly
    raw_size bytes (the codecs' own errors for bad data vary)."""
    try:
        raw = decompress(codec, data, raw_size)
    except Exception as e:
        raise ValueError(f"does not decode ({e})") from e
    if len(raw) != raw_size:
        raise ValueError(f"decodes to {len(raw)} bytes, expected {raw_size}")
    return raw


class FrameStore:
    """Where a stage's frames are read from, as the planner opened them (data.planner.open_frames):
    a uint8 (N, H, W, C) store that gathers any frames into a batch's buffer (`read_into`) and
    indexes like an array. Stores: ArrayFrames (decoded, in RAM), DeviceFrames (decoded, in GPU
    memory), CachedFrames (the decoded cache file, pread), CompressedFrames (the shards, decoded
    per batch). `device` is where `read_into` writes: the loaders pick by it, never by type."""

    dtype = np.dtype(np.uint8)
    shape: tuple
    device = torch.device("cpu")
    gathers_on_device = False  # batches are gathered where the frames are (DeviceFrames), not on a host thread

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = frame_indices(idx, len(self))
        out = torch.empty((*idx.shape, *self.shape[1:]), dtype=torch.uint8, device=self.device)
        self.read_into(idx, out)
        return out.cpu().numpy()

    def read_into(self, idx, out: torch.Tensor) -> torch.Tensor:
        """frames[idx] into `out` (contiguous uint8, idx.shape + frame shape, on self.device)."""
        raise NotImplementedError


def frame_indices(idx, length: int) -> np.ndarray:
    """An int, slice or integer array of frame indices as an array, checked against `length`."""
    if isinstance(idx, slice):
        idx = np.arange(*idx.indices(length))
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"frames are indexed by integers, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= length):
        raise IndexError(f"frame index out of [0, {length})")
    return idx
