"""One PPO minibatch step: the clipped surrogate, the value loss (clipped around the rollout's
values when asked) and the entropy bonus, then backward, the gradient-norm clip and the optimiser
step. PPO from scratch and stage 3b run it (stages/ppo.py); check-reference runs it against the
reference code's own updates."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .distributed import autocast
from .optim import optimizer_step


def ppo_step(policy, optimizer, clip_params, cfg, feats, actions, old_logp, adv, ret, old_value) -> tuple:
    """One update of `policy` (its act_value on `feats`) on one minibatch; the gradient norm is
    clipped over `clip_params`. Returns (policy loss, value loss, entropy, clip fraction, the norm
    before the clip)."""
    with autocast(feats.device, cfg.precision):
        logits, value = policy.act_value(feats)
    logp_all = F.log_softmax(logits.float(), -1)
    logp = logp_all.gather(1, actions[:, None])[:, 0]
    ratio = (logp - old_logp).exp()
    a = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
    v_err = (value.float() - ret).pow(2)
    if cfg.clip_value:  # the new value may not gain from moving further than `clip` from the old
        clipped = old_value + (value.float() - old_value).clamp(-cfg.clip, cfg.clip)
        v_err = torch.max(v_err, (clipped - ret).pow(2))
    v_loss = 0.5 * v_err.mean()
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    loss = pg + cfg.value_coef * v_loss - cfg.entropy * entropy
    norm = optimizer_step(loss, clip_params, optimizer, None, cfg.grad_clip)
    return pg, v_loss, entropy, ((ratio - 1).abs() > cfg.clip).float().mean(), norm
