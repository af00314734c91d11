"""The memory layout of the convolutions' inputs and weights: channels_last (several times faster
on CPUs and GPUs). The reference code's is contiguous; the two differ by round-off only, so
check-reference runs both (reference_layout) to tell a near-tie that round-off flips (a ReLU's
sign, a max-pool's or VQ's choice) from a real difference."""

from __future__ import annotations

import contextlib

import torch

_LAYOUT = [torch.channels_last]


def memory_format() -> torch.memory_format:
    """The layout stack_frames, build_lam and prepare_obs use now."""
    return _LAYOUT[-1]


@contextlib.contextmanager
def reference_layout():
    """Within the block, the models' inputs and build_lam use contiguous memory, as the reference code."""
    _LAYOUT.append(torch.contiguous_format)
    try:
        yield
    finally:
        _LAYOUT.pop()
