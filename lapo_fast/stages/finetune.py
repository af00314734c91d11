"""Stage 3b: LAPO's online decoding, the stage-2 latent policy fine-tuned by PPO
(`lapo-fast finetune`), as the reference code's stage3_decoding.py does it (FinetuneConfig).

    lapo-fast finetune --env starpilot --out RUN          (needs RUN/lam and RUN/bc)

The latent policy's conv trunk is frozen; a frozen copy of its fc and its latent head feed a
decoder to true actions, trained online on the stage-1 IDM's labels of the agent's own transitions
(latent.OnlineDecoder); a zero-initialised action head on a trainable fc is averaged with it, so
the agent starts as the decoded latent policy (models.DecodedPolicy). PPO trains the action head,
the value head and the fc, each with its own lr ramp. The frozen trunk's features do not change
during an update, so the rollout stores them instead of the frames and PPO's epochs never run the
convolutions -- except under the reference's gradient clip (reference_clip, the default), which
counts the trunk's gradients and so runs it again on the frames. Departure from the reference: IDM
windows never span an episode's end (the reference's rolling 3-frame buffer does). The labelled
transitions are not checkpointed: a resumed run collects them again.

Writes RUN/<name>/ as `lapo-fast ppo` does (stages/ppo.py), with the decoder's loss in each line.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lapo_fast.config import FinetuneConfig
from lapo_fast.data import prepare_obs
from lapo_fast.envs.games import check_game
from lapo_fast.latent import OnlineDecoder
from lapo_fast.models import DecodedPolicy
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.ppo import PPOSession, Rollout, collect_rollout, gae, make_ppo_step, ppo_epochs


def train_finetune(run_dir, env_name: str, cfg: FinetuneConfig, policy: DecodedPolicy, idm, *,
                   name: str = "finetune", progress: bool = True) -> Path:
    """Fine-tunes (or resumes) `policy` in RUN/<name>, its transitions labelled by the stage-1 `idm`;
    the final checkpoint."""
    session = PPOSession(RunDir(run_dir), env_name, cfg, name, progress=progress)
    device = session.device
    policy = policy.to(device).to(memory_format=torch.channels_last)
    optimizer, schedule, trained = heads_optimizer(policy, cfg, session.batch)
    # The reference clips over all of policy.parameters(): its trunk and decoder are outside the
    # optimiser but take PPO's gradients, which nothing clears (the decoder's, at each of its own
    # training steps), and their norm counts (a resumed run restarts those sums from zero).
    if cfg.reference_clip:
        policy.conv.requires_grad_(True)
        policy.decoder.requires_grad_(True)
    decoder = OnlineDecoder(idm, cfg, device)
    update, env, obs = session.start(policy, optimizer, schedule)
    step = _step(policy, optimizer, trained, cfg, session)
    buf = Rollout.empty(cfg.rollout, cfg.num_envs, env.single_observation_space.shape, device,
                        features=policy.fc_rl.in_features, keep_frames=True)

    while update < session.updates:
        t0 = time.perf_counter()
        obs, finished = collect_rollout(policy, env, obs, buf, session.gen, cfg.precision)
        with torch.no_grad():
            adv, ret = gae(buf.rewards, buf.values, buf.dones, cfg.gamma, cfg.gae_lambda)
            decoder.add(buf.frames, buf.actions, buf.dones)
        t_rollout = time.perf_counter() - t0
        policy.train()
        stats = ppo_epochs(step, cfg, buf.batch(adv, ret, frames_as_obs=cfg.reference_clip), session.gen, device)
        schedule.step()
        update += 1
        if decoder.due(update * session.batch, update):
            stats["decoder_loss"] = decoder.train(policy, cfg.seed + update)
        session.end_update(update, stats, finished, time.perf_counter() - t0, t_rollout, policy, optimizer, schedule)
    return session.close()


def heads_optimizer(policy: DecodedPolicy, cfg: FinetuneConfig, batch: int):
    """(Adam, its schedule, the trained parameters): the action head, value head and fc each get an
    lr that is 0 until its ramp starts, rises linearly to its fraction of head_lr at the ramp's end,
    then falls linearly to 0 at env_steps (the schedule is stepped once per update of `batch` steps)."""
    groups = ((policy.action_head, cfg.action_head_ramp, 0.25), (policy.value_head, cfg.value_head_ramp, 0.25),
              (policy.fc_rl, cfg.fc_ramp, 0.1))
    optimizer = torch.optim.Adam([{"params": list(m.parameters())} for m, *_ in groups], lr=cfg.head_lr,
                                 eps=cfg.adam_eps)

    def factor(ramp: tuple[int, int], peak: float):
        start, end = ramp
        points = [0, start, end, max(cfg.env_steps, end)]
        return lambda u: float(np.interp(u * batch, points, [0.0, 0.0, peak, 0.0]))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(r, p) for _, r, p in groups])
    return optimizer, schedule, [p for m, *_ in groups for p in m.parameters()]


def _step(policy: DecodedPolicy, optimizer, trained, cfg: FinetuneConfig, session: PPOSession):
    """PPO's minibatch step on the trunk features stored in the rollout; under the reference's clip,
    on the frames, the frozen trunk run again and the norm clipped over every parameter."""
    if not cfg.reference_clip:
        return make_ppo_step(policy, optimizer, trained, cfg, session.device, lambda feats: feats, session.mode)
    if session.mode == "graph":
        print(f"{session.name}: no CUDA graph with reference_clip (the trunk's and decoder's gradients it counts "
              "live outside the optimiser, and the decoder's training replaces them); running eagerly. "
              "--no-reference-clip allows the graph")
    return make_ppo_step(policy, optimizer, list(policy.parameters()), cfg, session.device,
                         lambda frames: policy.conv_features(prepare_obs(frames)), "eager")


def finetune(run_dir, env_name: str, cfg: FinetuneConfig, *, name: str = "finetune", progress: bool = True) -> Path:
    """Stage 3b on a run directory: the stage-2 policy decoded (DecodedPolicy) and fine-tuned, its
    transitions labelled by the stage-1 IDM; what `lapo-fast finetune` and `train` run."""
    run = RunDir(run_dir)
    return train_finetune(run, env_name, cfg, DecodedPolicy(run.load_policy("bc")), run.load_lam().idm, name=name,
                          progress=progress)


def run(ctx: StageContext, cfg: FinetuneConfig) -> str:
    """The registry's `finetune`: stage 3b in RUN/<name>."""
    check_game(ctx.env)
    return f"final checkpoint {finetune(ctx.run, ctx.env, cfg, name=ctx.name or 'finetune', progress=ctx.progress)}"
