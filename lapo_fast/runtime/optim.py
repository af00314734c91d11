"""The optimiser of the supervised stages (1 and 2): AdamW with the reference LAPO code's
piecewise-linear schedule: from warmup_from x lr up to lr over warmup_steps, then linearly to
final_lr x lr at steps + 1."""

from __future__ import annotations

import numpy as np
import torch


def adamw_warmup_decay(params, *, lr: float, weight_decay: float, warmup_steps: int, steps: int,
                       warmup_from: float, final_lr: float):
    """(optimizer, scheduler); step the scheduler once per optimiser step (step k uses the
    schedule's value at k, as the reference's lr_sched.step(step) before each step)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    points, factors = [0, warmup_steps, steps + 1], [warmup_from, 1.0, final_lr]
    if warmup_steps == 0:
        points, factors = points[1:], factors[1:]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: float(np.interp(s, points, factors)))
    return optimizer, schedule


def optimizer_step(loss, params, optimizer, schedule, grad_clip: float, record: dict | None = None
                   ) -> torch.Tensor | None:
    """One update: backward, gradient-norm clip (none when grad_clip is 0), optimiser step,
    schedule step. Returns the gradient norm before clipping (None without clipping). `record`
    (with `params` a list) receives copies of the gradients before and after the clip, in params'
    order: what check-reference compares with the reference code's. `schedule` may be None (PPO
    steps its schedule once per update, not per minibatch)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = lambda: [None if p.grad is None else p.grad.detach().clone() for p in params]  # noqa: E731
    if record is not None:
        record["pre_clip"] = grads()
    norm = clip_gradients(params, grad_clip)
    if record is not None:
        record["post_clip"] = grads()
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return norm


def clip_gradients(params, grad_clip: float) -> torch.Tensor | None:
    """Clips the gradient norm to grad_clip, every stage's meaning of the setting: 0 is no clipping
    (torch's clip to 0 would zero every gradient). Returns the norm before clipping, or None."""
    return torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None


def divergence_error(stage: str, step: int, cfg, directory) -> ValueError:
    """The error a training loop raises when its loss or latents became NaN/inf: where, and what to try."""
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(directory)
    resume = f"rerunning resumes from {last.name}" if last is not None else "no checkpoint was saved yet"
    clip = f"now {cfg.grad_clip:g}" if cfg.grad_clip > 0 else "now off"
    return ValueError(f"{stage} diverged at step {step}: the loss became NaN or inf. Try a lower --lr (now "
                      f"{cfg.lr:g}), a tighter --grad-clip ({clip}) or more --warmup-steps (now "
                      f"{cfg.warmup_steps}); {resume}")
