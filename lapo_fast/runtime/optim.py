"""The optimiser of the supervised stages (1 and 2): AdamW, linear warm-up, then linear decay to 0
(the reference LAPO code's schedule)."""

from __future__ import annotations

import torch


def adamw_warmup_decay(params, *, lr: float, weight_decay: float, warmup_steps: int, steps: int):
    """(optimizer, scheduler); step the scheduler once per optimiser step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)) * max(0.0, 1 - s / steps))
    return optimizer, schedule


def optimizer_step(loss, params, optimizer, schedule, grad_clip: float) -> None:
    """One update: backward, gradient-norm clip, optimiser step, schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    schedule.step()
