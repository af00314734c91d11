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


def divergence_error(stage: str, step: int, cfg, directory) -> ValueError:
    """The error a training loop raises when its loss or latents became NaN/inf: where, and what to try."""
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(directory)
    resume = f"rerunning resumes from {last.name}" if last is not None else "no checkpoint was saved yet"
    return ValueError(f"{stage} diverged at step {step}: the loss became NaN or inf. Try a lower --lr (now "
                      f"{cfg.lr:g}), a tighter --grad-clip (now {cfg.grad_clip:g}) or more --warmup-steps (now "
                      f"{cfg.warmup_steps}); {resume}")
