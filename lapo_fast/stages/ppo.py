"""PPO from scratch in the batched engine (`lapo-fast ppo`): the baselines, and the demonstrator
`train` trains when none is given or shipped. Cobbe et al. (2020)'s Procgen settings (PPOConfig).

    lapo-fast ppo --env starpilot --out RUN [--name demo]

One update, as CleanRL's ppo_procgen.py: a rollout of num_envs x rollout steps, GAE, then
epochs x minibatches clipped-surrogate steps (lapo_fast.runtime.ppo has each part). Stage 3b's
fine-tuning of the latent policy is stages/finetune.py.

Writes RUN/<name>/: config.json, metrics.jsonl (one line per update: env steps, mean return of
the episodes that ended, losses, frames/s), TensorBoard events, checkpoints. Rerunning resumes
from the last checkpoint (with fresh envs: mid-episode env state is not saved).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lapo_fast.config import PPOConfig
from lapo_fast.data import prepare_obs
from lapo_fast.envs.games import check_game
from lapo_fast.models import LatentPolicy
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.ppo import PPOSession, Rollout, collect_rollout, gae, make_ppo_step, ppo_epochs


def train_ppo(run_dir, env_name: str, cfg: PPOConfig, *, name: str = "ppo", init: LatentPolicy | None = None,
              progress: bool = True) -> Path:
    """Trains (or resumes) PPO from scratch (or from `init`) in RUN/<name>; the final checkpoint."""
    session = PPOSession(RunDir(run_dir), env_name, cfg, name, progress=progress)
    device = session.device
    policy = init if init is not None else LatentPolicy(impala_scale=cfg.impala_scale)
    policy = policy.to(device).to(memory_format=torch.channels_last)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1 - u / session.updates)  # linear to 0
    update, env, obs = session.start(policy, optimizer, schedule)
    step = make_ppo_step(policy, optimizer, params, cfg, device, lambda frames: policy.features(prepare_obs(frames)),
                         session.mode)
    buf = Rollout.empty(cfg.rollout, cfg.num_envs, env.single_observation_space.shape, device)

    while update < session.updates:
        t0 = time.perf_counter()
        obs, finished = collect_rollout(policy, env, obs, buf, session.gen, cfg.precision)
        with torch.no_grad():
            adv, ret = gae(buf.rewards, buf.values, buf.dones, cfg.gamma, cfg.gae_lambda)
        t_rollout = time.perf_counter() - t0
        policy.train()
        stats = ppo_epochs(step, cfg, buf.batch(adv, ret), session.gen, device)
        schedule.step()
        update += 1
        session.end_update(update, stats, finished, time.perf_counter() - t0, t_rollout, policy, optimizer, schedule)
    return session.close()


def run(ctx: StageContext, cfg: PPOConfig) -> str:
    """The registry's `ppo`: PPO from scratch in RUN/<name> (under `train`: the baseline, unless the
    demonstrator trained there is one already)."""
    if ctx.train and ctx.run.has("demo"):
        return "skipped: the demonstrator trained in this run (RUN/demo) is its from-scratch baseline"
    check_game(ctx.env)
    return f"final checkpoint {train_ppo(ctx.run, ctx.env, cfg, name=ctx.name or 'ppo', progress=ctx.progress)}"


def run_demonstrator(ctx: StageContext, cfg: PPOConfig) -> str:
    """The registry's `demo` (`train` only): a demonstrator trained by PPO from scratch in RUN/demo
    when `train` records its data and has no demonstrator given or shipped."""
    if not ctx.record or ctx.demonstrator is not None:
        return "skipped: " + ("the dataset is given" if not ctx.record else f"recording with {ctx.demonstrator}")
    print(f"demo: no demonstrator given or shipped for {ctx.env}: training one with PPO from scratch for "
          f"{cfg.env_steps:,} env steps (RUN/demo; it is also the from-scratch baseline)")
    check_game(ctx.env)
    return f"final checkpoint {train_ppo(ctx.run, ctx.env, cfg, name='demo', progress=ctx.progress)}"
