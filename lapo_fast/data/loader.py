"""Batch loaders feeding training, all drawing from one WindowSampler: a CPU prefetcher (numpy
gathers on a background thread, pinned memory when CUDA is there), an NVIDIA DALI pipeline, and a
device-resident mode for datasets that fit in GPU memory. `make_loader` picks one."""

from __future__ import annotations

import functools
import queue
import threading
import warnings

import numpy as np
import torch

from .windows import WindowSampler


def normalize(obs: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float (..., C, H, W) in [-0.5, 0.5], as LAPO's models expect."""
    return obs.permute(*range(obs.dim() - 3), -1, -3, -2).float().div_(255.0).sub_(0.5)


def prepare_obs(obs: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float (N, C, H, W) in channels_last memory (the layout the
    convolutions run fastest in), as the policies take them."""
    return normalize(obs).contiguous(memory_format=torch.channels_last)


class PrefetchLoader:
    """Yields dicts of torch tensors (obs uint8 (B, W, H, W, C) plus metadata), sampled on a
    background thread `prefetch` batches ahead; moved to `device` (non-blocking from pinned
    memory when that is CUDA)."""

    def __init__(self, sampler: WindowSampler, *, device="cpu", prefetch: int = 4, pin_memory=None):
        self.sampler = sampler
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch = {k: torch.from_numpy(v) for k, v in self.sampler.sample().items()}
                if self.pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer on its next batch
            self._error = e
            self._queue.put(None)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._queue.get()
        if batch is None:
            raise RuntimeError("the loader's sampling thread failed") from self._error
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __del__(self):
        self._stop.set()


class DeviceResidentLoader:
    """The whole frame array copied once to `device` (when it fits in GPU memory): windows are
    gathered there, so no frame crosses PCIe during training. Same batches as the sampler."""

    def __init__(self, sampler: WindowSampler, device="cuda"):
        self.sampler = sampler
        self.device = torch.device(device)
        with warnings.catch_warnings():  # a read-only memmap: torch warns, and we never write to it
            warnings.simplefilter("ignore", UserWarning)
            self.frames = torch.from_numpy(np.asarray(sampler.frames)).to(self.device)
        self.meta = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in sampler.meta.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.sampler.sample_indices()).to(self.device, non_blocking=True)
        batch = {"obs": self.frames[idx]}
        for k, v in self.meta.items():
            batch[k] = v[idx]
        return batch


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


class DaliLoader:
    """The same batches through an NVIDIA DALI pipeline: our sampler feeds fn.external_source,
    DALI transfers them (device_id=None: a CPU-only pipeline, used by the tests), and yields
    torch tensors. On a GPU the copy to device memory is DALI's, prefetched `prefetch` deep."""

    def __init__(self, sampler: WindowSampler, *, device_id: int | None = None, prefetch: int = 2,
                 num_threads: int = 2):
        from nvidia.dali import fn, pipeline_def

        self.sampler = sampler
        self.device_id = device_id
        self._copied = None  # a CUDA event after the last batch's copies out of DALI's buffers
        keys = ["obs", *sorted(sampler.meta)]
        self.keys = keys

        def source():
            batch = sampler.sample()
            return [batch[k] for k in keys]

        @pipeline_def(batch_size=1, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch,
                      exec_dynamic=True)
        def pipe():
            outs = fn.external_source(source=source, num_outputs=len(keys), batch=False)
            return tuple(o.gpu() for o in outs) if device_id is not None else tuple(outs)

        self.pipe = pipe()
        self.pipe.build()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._copied is not None:  # the last batch's copies read DALI buffers that run() recycles
            self._copied.synchronize()
            self._copied = None
        outs = self.pipe.run()
        batch = {}
        for k, o in zip(self.keys, outs):
            if self.device_id is None:
                batch[k] = torch.from_numpy(np.array(o.as_array()[0]))
                continue
            # Straight from DALI's device buffer into a torch CUDA tensor, on the current stream.
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            dense = o.as_tensor()  # (1, ...): the pipeline's batch is one of our batches
            out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=f"cuda:{self.device_id}")
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            batch[k] = out[0]
        if self.device_id is not None:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device_id))
        return batch


def make_loader(sampler: WindowSampler, device="cpu", prefer_dali: bool = True, resident_fraction: float = 0.5):
    """On CUDA: the frames resident in GPU memory when they take under `resident_fraction` of
    what is free, else DALI when installed, else the CPU prefetcher with pinned memory.
    On CPU: the prefetcher."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if sampler.frames.nbytes < resident_fraction * free:
            return DeviceResidentLoader(sampler, device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if prefer_dali and dali_available(index):
            return DaliLoader(sampler, device_id=index)
    return PrefetchLoader(sampler, device=device)
