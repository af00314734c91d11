"""Stage 3b: PPO in the batched engine, from scratch (`lapo-fast ppo`: baselines, demonstrators) or
fine-tuning the stage-2 latent policy (`lapo-fast finetune`).

    lapo-fast ppo      --env starpilot --out RUN [--name demo]
    lapo-fast finetune --env starpilot --out RUN          (needs RUN/bc)

Fine-tuning is LAPO's stage 3b: the conv trunk of the latent policy is frozen, the true-action and
value heads are re-initialised and trained. A frozen trunk's features do not change during an
update, so they are computed once per env step, stored in the rollout instead of the frames, and
PPO's epochs run on the heads alone: most of PPO's cost disappears.

Writes RUN/<name>/: config.json, metrics.jsonl (one line per update: env steps, mean return of
the episodes that ended, losses, frames/s), TensorBoard events, checkpoints. Rerunning resumes
from the last checkpoint (with fresh envs: mid-episode env state is not saved).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lapo_fast import __version__
from lapo_fast.config import PPOConfig
from lapo_fast.data import prepare_obs
from lapo_fast.envs import ProcgenVecEnv
from lapo_fast.models import LatentPolicy
from lapo_fast.rundir import RunDir
from lapo_fast.runtime import distributed
from lapo_fast.runtime.acting import sample_actions
from lapo_fast.runtime.checkpoint import latest_checkpoint, resume, save_checkpoint
from lapo_fast.runtime.distributed import autocast
from lapo_fast.runtime.runlog import RunLog


class RewardNormalizer:
    """Divides rewards by a running std of the discounted return, then clips (as Cobbe et al.,
    via gym's NormalizeReward)."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0):
        self.gamma, self.clip = gamma, clip
        self.ret = np.zeros(num_envs, np.float64)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.ret = self.ret * self.gamma + reward
        self._update(self.ret)
        self.ret[done] = 0.0
        return np.clip(reward / math.sqrt(self.var + 1e-8), -self.clip, self.clip).astype(np.float32)

    def _update(self, x: np.ndarray) -> None:
        # Chan et al.'s parallel mean/variance update.
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), len(x)
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def state_dict(self) -> dict:
        return {"ret": self.ret.tolist(), "mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ret"]) == len(self.ret):
            self.ret = np.asarray(state["ret"], np.float64)
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def gae(rewards, values, dones, gamma: float, lam: float):
    """Advantages and returns. values has T+1 rows (the last bootstraps); dones[t] = the episode
    ended with step t, so nothing flows back across it."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        live = 1.0 - dones[t]
        delta = rewards[t] + gamma * values[t + 1] * live - values[t]
        last = delta + gamma * lam * live * last
        adv[t] = last
    return adv, adv + values[:-1]


def prepare_finetune(policy: LatentPolicy, seed: int) -> LatentPolicy:
    """LAPO's stage 3b: freeze the trunk, re-initialise the true-action and value heads."""
    policy.trunk.requires_grad_(False)
    policy.latent_head.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for head in (policy.action_head, policy.value_head):
        bound = 1 / math.sqrt(head.in_features)
        with torch.no_grad():
            head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
            head.bias.zero_()
    return policy


def train_ppo(run_dir, env_name: str, cfg: PPOConfig, *, name: str = "ppo", init: LatentPolicy | None = None,
              frozen_trunk: bool = False, stop_after: int | None = None, progress: bool = True) -> Path:
    """Trains (or resumes) PPO; returns the final checkpoint. `init` is the policy to start from
    (fine-tuning); `stop_after` ends this call after that many updates, as an interruption would."""
    run = RunDir(run_dir)
    run.claim(name, cfg, game=env_name)
    out = run.stage(name)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.device(cfg.device)
    torch.manual_seed(cfg.seed)

    policy = init if init is not None else LatentPolicy(impala_scale=cfg.impala_scale)
    if frozen_trunk:
        policy = prepare_finetune(policy, cfg.seed)
    policy = policy.to(device).to(memory_format=torch.channels_last)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.head_lr if frozen_trunk else cfg.lr, eps=1e-5)
    batch = cfg.num_envs * cfg.rollout
    updates = max(1, -(-cfg.env_steps // batch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1 - u / updates)
    normalizer = RewardNormalizer(cfg.num_envs, cfg.gamma)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    log = RunLog(out, name)
    state = resume(out, policy, optimizer, schedule, log, key="update")
    update = state.get("update", 0)
    if state:
        normalizer.load_state_dict(state["normalizer"])
        gen.manual_seed(cfg.seed + update)
    last = latest_checkpoint(out)
    run.save_config(name, cfg, versions={"lapo_fast": __version__, "torch": torch.__version__},
         env=env_name, frozen_trunk=frozen_trunk, device=str(device))

    # Fresh envs on resume, seeded by the update so a resumed run does not replay its levels.
    env = ProcgenVecEnv(env_name, cfg.num_envs, seed=cfg.seed * 100_003 + update,
                        distribution_mode=cfg.distribution_mode)
    obs_np, _ = env.reset()
    T, N = cfg.rollout, cfg.num_envs
    feat_dim = policy.trunk.out_features
    # The rollout keeps what the update needs: trunk features when frozen, frames otherwise.
    store = (torch.zeros(T, N, feat_dim, device=device) if frozen_trunk
             else torch.zeros(T, N, *env.obs.shape[1:], dtype=torch.uint8, device=device))
    actions = torch.zeros(T, N, dtype=torch.long, device=device)
    logps = torch.zeros(T, N, device=device)
    values = torch.zeros(T + 1, N, device=device)
    rewards = torch.zeros(T, N, device=device)
    dones = torch.zeros(T, N, device=device)

    from tqdm import tqdm

    bar = tqdm(total=updates * batch, initial=update * batch, disable=not progress, desc=name, unit="step",
               unit_scale=True)
    finished: list[float] = []
    while update < updates:
        t0 = time.perf_counter()
        policy.eval()
        with torch.no_grad():
            for t in range(T):
                obs = torch.from_numpy(obs_np).to(device)
                with autocast(device):
                    feats = policy.features(prepare_obs(obs))
                    logits, value = policy.act_value(feats)
                a = sample_actions(logits, gen)
                store[t] = feats.float() if frozen_trunk else obs
                actions[t], values[t] = a, value.float()
                logps[t] = F.log_softmax(logits.float(), -1).gather(1, a[:, None])[:, 0]
                obs_np, reward, done, _, info = env.step(a)
                r = normalizer(reward, done) if cfg.normalize_rewards else reward
                rewards[t] = torch.from_numpy(np.asarray(r, np.float32)).to(device)
                dones[t] = torch.from_numpy(done.astype(np.float32)).to(device)
                finished += info["final_return"][done].tolist()
            values[T] = policy.act_value(policy.features(prepare_obs(torch.from_numpy(obs_np).to(device))))[1]
            adv, ret = gae(rewards, values, dones, cfg.gamma, cfg.gae_lambda)
        t_rollout = time.perf_counter() - t0

        policy.train()
        stats = _update(policy, optimizer, params, cfg, store.flatten(0, 1), actions.flatten(), logps.flatten(),
                        adv.flatten(), ret.flatten(), frozen_trunk, gen)
        schedule.step()
        update += 1
        bar.update(batch)
        elapsed = time.perf_counter() - t0
        metrics = {"update": update, "env_steps": update * batch,
                   "episode_return": float(np.mean(finished)) if finished else None,
                   "episodes": len(finished), **stats, "lr": schedule.get_last_lr()[0],
                   "fps": batch / elapsed, "rollout_fps": batch / t_rollout}
        log.log(metrics, step_key="update")
        if finished:
            bar.set_postfix(ret=f"{np.mean(finished):.2f}")
        finished = []
        if update % cfg.checkpoint_every == 0 or update == updates:
            last = save_checkpoint(out, update, policy, optimizer, schedule,
                                   {"update": update, "normalizer": normalizer.state_dict()})
        if stop_after is not None and update >= stop_after and update < updates:
            break
    bar.close()
    env.close()
    log.close()
    return last


def _update(policy, optimizer, params, cfg: PPOConfig, store, actions, old_logp, adv, ret, frozen: bool, gen) -> dict:
    size = len(actions)
    mb = size // cfg.minibatches
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_frac": 0.0}
    n = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(size, generator=gen, device=gen.device).to(store.device)
        for i in range(cfg.minibatches):
            idx = order[i * mb:(i + 1) * mb]
            with autocast(store.device):
                feats = store[idx] if frozen else policy.features(prepare_obs(store[idx]))
                logits, value = policy.act_value(feats)
            logp_all = F.log_softmax(logits.float(), -1)
            logp = logp_all.gather(1, actions[idx, None])[:, 0]
            ratio = (logp - old_logp[idx]).exp()
            a = adv[idx]
            a = (a - a.mean()) / (a.std() + 1e-8)
            pg = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
            v_loss = 0.5 * (value.float() - ret[idx]).pow(2).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            loss = pg + cfg.value_coef * v_loss - cfg.entropy * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            totals["policy_loss"] += pg.item()
            totals["value_loss"] += v_loss.item()
            totals["entropy"] += entropy.item()
            totals["clip_frac"] += ((ratio - 1).abs() > cfg.clip).float().mean().item()
            n += 1
    return {k: v / n for k, v in totals.items()}

