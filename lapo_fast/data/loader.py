"""Batch loaders feeding training. Each draws its batches from a sampler (windows.WindowSampler or
RowSampler: an rng, the frames, and `draw()` -> frame indices plus per-row extras) and yields
dicts of tensors on the training device, frames as uint8 (normalised there, by `normalize`):

- PrefetchLoader: a background thread gathers (or decodes) batches `prefetch` ahead into pinned
  memory and they are copied non-blocking (on a CPU-only machine: in the training thread); for
  frames in host memory (the decoded cache through data.cached.CachedFrames, a RAM copy, or the
  compressed shards through data.compressed.CompressedFrames).
- DeviceResidentLoader: every frame already in GPU memory; batches are gathered there.
- DaliDecodeLoader: the compressed shards decoded on the GPU by DALI's LZ4 inflate.

Every loader's `rng` is the sampler's stream as of the last batch handed out (not the batches
prefetched), so a checkpoint saves it and resuming continues with the next batch.
`data.planner` picks one of them for a stage.
"""

from __future__ import annotations

import atexit
import collections
import functools
import queue
import threading
import warnings
import weakref

import numpy as np
import torch

from .compressed import CompressedFrames, DecodePlan, plan_decode
from .format import DatasetError
from .stores import as_store


def normalize(obs: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float (..., C, H, W) in [-0.5, 0.5], as LAPO's models expect."""
    return obs.permute(*range(obs.dim() - 3), -1, -3, -2).float().div_(255.0).sub_(0.5)


def prepare_obs(obs: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float (N, C, H, W) in channels_last memory (the layout the
    convolutions run fastest in; lapo_fast.layout), as the policies take them."""
    from lapo_fast.layout import memory_format

    return normalize(obs).contiguous(memory_format=memory_format())


def in_order(frames, batches: list[np.ndarray], device):
    """A loader over InOrder(frames, batches): frames in GPU memory gathered there, else
    prefetched (pinned, non-blocking) when the device is CUDA."""
    from .windows import InOrder

    return host_or_device_loader(InOrder(frames, batches), device)


def host_or_device_loader(sampler, device, prefetch: int | None = None):
    """DeviceResidentLoader when the sampler's frames are in GPU memory, else a PrefetchLoader:
    `prefetch` batches ahead (default 4 on CUDA, none on the CPU)."""
    if sampler.frames.gathers_on_device:
        return DeviceResidentLoader(sampler, sampler.frames)
    if prefetch is None:
        prefetch = 4 if torch.device(device).type == "cuda" else 0
    return PrefetchLoader(sampler, device=device, prefetch=prefetch)


def frames_at(frames, idx, device) -> torch.Tensor:
    """frames[idx] as a uint8 tensor on `device`, from any frames (a FrameStore, an array, a tensor)."""
    store = as_store(frames)
    idx = np.asarray(idx, np.int64)
    out = torch.empty((*idx.shape, *store.shape[1:]), dtype=torch.uint8, device=store.device)
    store.read_into(idx, out)
    return out.to(device)


class _ConsumedStream:
    """The sampler's rng as of the last batch handed out: before the first batch, the sampler's own
    generator (so `resume` can restore it); after, a copy advanced batch by batch."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._copy: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        return self.sampler.rng if self._copy is None else self._copy

    def consumed(self, state: dict | None) -> None:
        if state is None:  # a sampler without a stream (InOrder)
            return
        if self._copy is None:
            self._copy = np.random.Generator(type(self.sampler.rng.bit_generator)())
        self._copy.bit_generator.state = state


_RUNNING: "weakref.WeakSet[PrefetchLoader]" = weakref.WeakSet()


@atexit.register
def _stop_threads() -> None:
    """A sampling thread still inside torch when the interpreter exits aborts the process: stop
    them first. A backstop for loaders used outside the stages (runtime.loop closes the stages')."""
    for loader in list(_RUNNING):
        loader.close()


class PrefetchLoader:
    """Batches gathered on a background thread `prefetch` ahead, pinned when the device is CUDA and
    copied to it non-blocking. The thread starts with the first batch (after any resume).
    prefetch=0 gathers in the caller's thread instead: on a CPU-only machine training already
    keeps every core busy, and there the hand-over between threads measured slower."""

    def __init__(self, sampler, *, device="cpu", prefetch: int = 4, pin_memory=None):
        self.sampler = sampler
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.prefetch = max(0, prefetch)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stream = _ConsumedStream(sampler)

    @property
    def rng(self) -> np.random.Generator:
        return self._stream.rng

    def _make(self) -> tuple[dict, dict | None]:
        """The next batch on the host (pinned for CUDA), and the rng state after drawing it."""
        idx, extras = self.sampler.draw()
        state = self.sampler.rng.bit_generator.state if hasattr(self.sampler, "rng") else None
        out = torch.empty((*idx.shape, *self.sampler.frames.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        self.sampler.frames.read_into(idx, out)
        batch = {"obs": out}
        for k, v in extras.items():
            batch[k] = torch.from_numpy(np.ascontiguousarray(v))
            if self.pin:
                batch[k] = batch[k].pin_memory()
        return batch, state

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch, state = self._make()
                while not self._stop.is_set():
                    try:
                        self._queue.put((batch, state), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except StopIteration:  # an InOrder pass is over: nothing more to make
            pass
        except BaseException as e:  # surfaced to the consumer on its next batch
            self._error = e
            self._queue.put(None)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch == 0:  # in the caller's thread
            batch, state = self._make()
            self._stream.consumed(state)
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        item = self._queue.get()
        if item is None:
            if isinstance(self._error, DatasetError):  # a damaged dataset: its own message
                raise self._error
            raise RuntimeError("the loader's sampling thread failed") from self._error
        batch, state = item
        self._stream.consumed(state)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __del__(self):
        self._stop.set()


class DeviceResidentLoader:
    """Every frame already on `frames`' device (a DeviceFrames): windows are gathered there, so no
    frame crosses PCIe during training."""

    def __init__(self, sampler, frames):
        self.sampler = sampler
        self.frames = frames

    @property
    def rng(self) -> np.random.Generator:
        return self.sampler.rng

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx, extras = self.sampler.draw()
        batch = {"obs": frames_at(self.frames, idx, self.frames.device)}
        for k, v in extras.items():
            batch[k] = torch.from_numpy(np.ascontiguousarray(v)).to(self.frames.device)
        return batch

    def close(self) -> None:
        pass


@functools.cache
def dali_available(device_id: int | None = None) -> bool:
    """DALI importable and, for a GPU, able to run there: a one-sample pipeline is built and run
    on device_id once, so an old driver or a CPU-only build falls back here instead of failing
    when a stage builds its pipeline."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    if device_id is None:
        return True
    try:
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=1, num_threads=1, device_id=device_id)
        def probe():
            return fn.external_source(source=lambda: np.zeros(4, np.uint8), batch=False).gpu()

        pipe = probe()
        pipe.build()
        pipe.run()
    except Exception as e:  # DALI raises RuntimeError for driver/CUDA faults, others for odd builds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"DALI is installed but cannot run on GPU {device_id} ({first}); using the CPU path")
        return False
    return True


def chunk_inputs(frames: CompressedFrames, idx: np.ndarray) -> tuple[list, list, DecodePlan]:
    """What a GPU decoder is fed for frames[idx]: one sample per chunk the batch touches (its
    compressed bytes, checksum-verified on first use, and its decoded shape), and the plan whose
    `gather` picks the frames out of the decoded chunks padded to equal slots."""
    plan = plan_decode(frames.table, idx, whole_chunks=True)
    blobs = [frames.chunk_bytes(int(k)) for k in plan.chunks]
    shapes = [np.array([int(frames.table.frames[k]), *frames.shape[1:]], np.int32) for k in plan.chunks]
    return blobs, shapes, plan


def assemble(decoded: torch.Tensor, plan: DecodePlan, frame_shape) -> torch.Tensor:
    """The batch's frames from the decoded chunks ((n, slot, H, W, C), on any device)."""
    rows = decoded.reshape(-1, int(np.prod(frame_shape)))
    at = torch.from_numpy(plan.gather(decoded.shape[1])).to(decoded.device, non_blocking=True)
    return rows.index_select(0, at).view(*plan.shape, *frame_shape)


class DaliDecodeLoader:
    """The compressed shards decoded on GPU `device_id` by DALI: each batch's chunks (read from the
    memory-mapped shards on the host) go through fn.decoders.inflate (nvCOMP LZ4), are padded to
    equal slots, and the windows are gathered on the GPU; DALI runs `prefetch` batches ahead.

    inflate=False with device_id=None is the same pipeline on DALI's CPU backend with the chunks
    decoded by python-lz4 before DALI sees them (inflate runs on GPUs only): the tests' stand-in."""

    def __init__(self, sampler, frames: CompressedFrames, *, device_id: int | None, prefetch: int = 2,
                 num_threads: int = 2, inflate: bool = True):
        from nvidia.dali import fn, pipeline_def, types

        if frames.ds.manifest.codec != "lz4":
            raise ValueError(f"{frames.ds.dir}: DALI decodes LZ4 shards; this dataset is {frames.ds.manifest.codec}")
        self.sampler, self.frames, self.device_id = sampler, frames, device_id
        self._stream = _ConsumedStream(sampler)
        self._fed: collections.deque = collections.deque()  # per batch fed to DALI: (plan, extras, rng state)
        self._copied = None  # a CUDA event after the last batch's copy out of DALI's buffers

        def source():
            idx, extras = sampler.draw()
            state = sampler.rng.bit_generator.state
            blobs, shapes, plan = chunk_inputs(frames, idx)
            if not inflate:
                import lz4.block

                blobs = [np.frombuffer(lz4.block.decompress(b, uncompressed_size=int(np.prod(s))), np.uint8)
                         for b, s in zip(blobs, shapes)]
            self._fed.append((plan, extras, state))
            return blobs, shapes

        # At most one chunk per frame of a batch: the pipeline's (largest) batch size.
        @pipeline_def(batch_size=sampler.draw_size, num_threads=num_threads, device_id=device_id,
                      prefetch_queue_depth=prefetch, exec_dynamic=True)
        def pipe():
            data, shape = fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
            chunks = (fn.decoders.inflate(data.gpu(), shape=shape, algorithm="LZ4") if inflate
                      else fn.reshape(data, shape=shape))
            return fn.pad(chunks, axes=[0], shape=[frames.chunk_slot])  # short chunks (shard tails) padded

        self.pipe = pipe()
        self.pipe.build()

    @property
    def rng(self) -> np.random.Generator:
        return self._stream.rng

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._copied is not None:  # the last batch's copy read DALI buffers that run() recycles
            self._copied.synchronize()
        (out,) = self.pipe.run()
        plan, extras, state = self._fed.popleft()
        dense = out.as_tensor()
        if self.device_id is None:
            decoded = torch.from_numpy(np.array(dense))
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            decoded = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            stream = torch.cuda.current_stream(self.device_id)
            feed_ndarray(dense, decoded, cuda_stream=stream)
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        self._stream.consumed(state)
        batch = {"obs": assemble(decoded, plan, self.frames.shape[1:])}
        for k, v in extras.items():
            batch[k] = torch.from_numpy(np.ascontiguousarray(v)).to(decoded.device, non_blocking=True)
        return batch

    def close(self) -> None:
        del self.pipe
