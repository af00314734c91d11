"""What acts in an environment: an Actor maps a batch of observations to actions, and
sample_actions turns a policy's logits into them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Actor = Callable[[np.ndarray], np.ndarray]  # obs (N, 64, 64, 3) uint8 -> actions (N,) int


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None, *,
                   greedy: bool = False) -> torch.Tensor:
    """(N, A) logits -> (N,) int64 actions: the argmax, or a sample of softmax(logits) in fp32."""
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]
