"""PPO's minibatch step: the clipped surrogate, the value loss (clipped around the rollout's values
when asked) and the entropy bonus, then backward, the gradient-norm clip and the optimiser step,
eager or as a CUDA graph (runtime.step). PPO from scratch and stage 3b run it (stages/ppo.py);
check-reference runs it against the reference code's own updates."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .step import TrainStep

STATS = ("policy_loss", "value_loss", "entropy", "clip_frac")


def ppo_loss(policy, cfg, feats, actions, old_logp, adv, ret, old_value) -> dict:
    """The loss of `policy` (its act_value on trunk features `feats`) on one minibatch, and its parts."""
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
    return {"loss": pg + cfg.value_coef * v_loss - cfg.entropy * entropy, "policy_loss": pg, "value_loss": v_loss,
            "entropy": entropy, "clip_frac": ((ratio - 1).abs() > cfg.clip).float().mean()}


def make_ppo_step(policy, optimizer, clip_params, cfg, device, features, mode: str = "eager") -> TrainStep:
    """PPO's minibatch step; its inputs: obs (what `features` turns into trunk features: frames, or
    features computed earlier), actions, old_logp, adv, ret, old_value. The gradient norm is clipped
    over `clip_params`; the schedule is stepped per update by the caller."""
    def loss_fn(inputs: dict) -> dict:
        return ppo_loss(policy, cfg, features(inputs["obs"]), inputs["actions"], inputs["old_logp"], inputs["adv"],
                        inputs["ret"], inputs["old_value"])

    return TrainStep(loss_fn, clip_params, optimizer, grad_clip=cfg.grad_clip, device=device, precision=cfg.precision,
                     mode=mode, name="ppo")


def ppo_step(policy, optimizer, clip_params, cfg, feats, actions, old_logp, adv, ret, old_value) -> tuple:
    """One eager update on features computed by the caller (their gradient flows back into the
    trunk that made them). Returns (policy loss, value loss, entropy, clip fraction, the norm before
    the clip)."""
    step = make_ppo_step(policy, optimizer, clip_params, cfg, feats.device, features=lambda x: x)
    out = step({"obs": feats, "actions": actions, "old_logp": old_logp, "adv": adv, "ret": ret,
                "old_value": old_value})
    return (*(out[k] for k in STATS), out.get("grad_norm"))
