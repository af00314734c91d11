"""The frame stores of decoded frames held in memory: ArrayFrames (a numpy array or memory map in
RAM) and DeviceFrames (a tensor in GPU memory). The others are CachedFrames (data.cached) and
CompressedFrames (data.compressed); all are FrameStores (data.format)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .format import FrameStore, frame_indices


class ArrayFrames(FrameStore):
    """Decoded frames in RAM: a batch is one torch index_select over whole frames (measured faster
    than numpy's fancy indexing), on a (N, frame bytes) view of the same memory."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        with warnings.catch_warnings():  # a read-only memmap: torch warns, and we never write to it
            warnings.simplefilter("ignore", UserWarning)
            self._rows = torch.from_numpy(np.asarray(array)).view(len(array), -1)

    def read_into(self, idx, out: torch.Tensor) -> torch.Tensor:
        at = torch.from_numpy(np.asarray(idx, np.int64).reshape(-1))
        return torch.index_select(self._rows, 0, at, out=out.view(-1, self._rows.shape[1])).view(out.shape)


class DeviceFrames(FrameStore):
    """Decoded frames in GPU memory: batches are gathered there, no frame crosses PCIe."""

    gathers_on_device = True

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.device = tensor.device
        self._rows = tensor.view(len(tensor), -1)

    def read_into(self, idx, out: torch.Tensor) -> torch.Tensor:
        at = torch.from_numpy(frame_indices(idx, len(self)).reshape(-1)).to(self.device)
        torch.index_select(self._rows, 0, at, out=out.view(-1, self._rows.shape[1]))
        return out


def as_store(frames) -> FrameStore:
    """A FrameStore as it is, or one over decoded frames (a numpy array or memmap, a tensor)."""
    if isinstance(frames, FrameStore):
        return frames
    if isinstance(frames, torch.Tensor):
        return DeviceFrames(frames) if frames.device.type != "cpu" else ArrayFrames(frames.numpy())
    return ArrayFrames(np.asarray(frames) if not isinstance(frames, np.memmap) else frames)
