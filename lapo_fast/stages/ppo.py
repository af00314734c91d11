"""Stage 3b: PPO in the batched engine, from scratch (`lapo-fast ppo`: baselines, demonstrators) or
fine-tuning the stage-2 latent policy (`lapo-fast finetune`).

    lapo-fast ppo      --env starpilot --out RUN [--name demo]
    lapo-fast finetune --env starpilot --out RUN          (needs RUN/bc)

Fine-tuning is LAPO's stage 3b, as its code does it (FinetuneConfig, models.DecodedPolicy): the
latent policy's conv trunk is frozen; a frozen copy of its fc and its latent head feed a decoder to
true actions, trained online on the stage-1 IDM's labels of the agent's own transitions (computed
once per rollout, batched); a zero-initialised action head on a trainable fc is averaged with it,
so the agent starts as the decoded latent policy. PPO trains the action head, the value head and
the fc, each with its own lr ramp. The frozen conv trunk's features do not change during an update,
so they are computed once per env step and stored in the rollout instead of the frames: PPO's
epochs never run the convolutions. Departure from the reference: IDM windows never span an
episode's end (the reference's rolling 3-frame buffer does). The labelled transitions are not
checkpointed: a resumed run collects them again.

Writes RUN/<name>/: config.json, metrics.jsonl (one line per update: env steps, mean return of
the episodes that ended, losses, frames/s), TensorBoard events, checkpoints. Rerunning resumes
from the last checkpoint (with fresh envs: mid-episode env state is not saved).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lapo_fast import __version__
from lapo_fast.config import FinetuneConfig, PPOConfig
from lapo_fast.data import prepare_obs
from lapo_fast.envs import ProcgenVecEnv
from lapo_fast.envs.games import check_game
from lapo_fast.envs.wrappers import ScaleRewards
from lapo_fast.latent import decoder_step, idm_latents
from lapo_fast.models import DecodedPolicy, LatentPolicy
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime import distributed
from lapo_fast.runtime.acting import sample_actions
from lapo_fast.runtime.checkpoint import latest_checkpoint, resume, save_checkpoint
from lapo_fast.runtime.distributed import autocast
from lapo_fast.runtime.metrics import StepMeans
from lapo_fast.runtime.ppo import STATS, make_ppo_step
from lapo_fast.runtime.runlog import RunLog
from lapo_fast.runtime.step import graph_mode


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


def _optimizer(policy, cfg: PPOConfig, batch: int, updates: int, finetune: bool):
    """(optimizer, schedule, trained parameters): full PPO anneals one lr linearly; fine-tuning
    gives the action head, value head and fc their own ramps (FinetuneConfig), in env steps."""
    if not finetune:
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1 - u / updates), params
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


class OnlineDecoder:
    """Stage 3b's decoder data and training: the IDM's latent of each of the agent's transitions
    (o_{t-1}, o_t, o_{t+1}) that stays inside one episode, with the action taken at o_t; the
    decoder is retrained from scratch on all of them on FinetuneConfig's schedule."""

    def __init__(self, idm, cfg, device):
        self.idm, self.cfg, self.device = idm.to(device).eval(), cfg, device
        self.latents: list[torch.Tensor] = []
        self.actions: list[torch.Tensor] = []

    def add(self, frames: torch.Tensor, actions: torch.Tensor, dones: torch.Tensor) -> None:
        """frames (N, T+1, H, W, C) uint8 of a rollout, each env's in order (the last: the obs
        after it), its actions and dones (T, N): labels for t in 1..T-1 whose window crosses no
        episode end."""
        keep = ((dones[:-1] == 0) & (dones[1:] == 0)).cpu()  # (T-1, N): no end at t-1 nor at t
        t, n = torch.nonzero(keep, as_tuple=True)  # on the CPU, where the frames are
        t = t + 1
        starts = (n * frames.shape[1] + t - 1).numpy()  # o_{t-1} in the envs' concatenated frames
        latents = idm_latents(self.idm, frames.flatten(0, 1), starts, 1, batch=512, device=self.device)
        self.latents.append(torch.from_numpy(latents))
        self.actions.append(actions.cpu()[t, n])

    def due(self, env_steps: int, update: int) -> bool:
        c = self.cfg
        return (c.decoder_from < env_steps < c.decoder_until and bool(self.latents)
                and (env_steps < c.decoder_dense_until or update % c.decoder_every == 0))

    def train(self, policy: DecodedPolicy, seed: int) -> float:
        """Retrains policy.decoder from fresh weights; returns the last minibatch's loss."""
        c = self.cfg
        latents, actions = torch.cat(self.latents).to(self.device), torch.cat(self.actions).to(self.device)
        policy.reset_decoder(seed)
        policy.decoder.requires_grad_(True)
        optimizer = torch.optim.Adam(policy.decoder.parameters(), lr=c.decoder_lr)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        loss = torch.zeros(())
        for _ in range(c.decoder_epochs):
            order = torch.randperm(len(actions), generator=gen).to(self.device)
            for i in range(0, len(order), c.decoder_batch):
                idx = order[i:i + c.decoder_batch]
                _, loss = decoder_step(policy.decoder, optimizer, latents[idx], actions[idx],
                                       label_smoothing=c.label_smoothing)
        # Under the reference's clip the decoder keeps its gradients for PPO's norm (see train_ppo).
        policy.decoder.requires_grad_(bool(getattr(c, "reference_clip", False)))
        return loss.item()


def train_ppo(run_dir, env_name: str, cfg: PPOConfig, *, name: str = "ppo",
              init: LatentPolicy | DecodedPolicy | None = None, idm=None, stop_after: int | None = None,
              progress: bool = True) -> Path:
    """Trains (or resumes) PPO; returns the final checkpoint. `init` is the policy to start from:
    a DecodedPolicy (with the stage-1 `idm` that labels its transitions) is stage 3b's fine-tuning;
    `stop_after` ends this call after that many updates, as an interruption would."""
    finetune = isinstance(init, DecodedPolicy)
    if finetune and (idm is None or not isinstance(cfg, FinetuneConfig)):
        raise ValueError("fine-tuning a DecodedPolicy needs a FinetuneConfig and the stage-1 IDM (idm=...)")
    run = RunDir(run_dir)
    run.claim(name, cfg, game=env_name)
    out = run.stage(name)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.device(cfg.device)
    mode = graph_mode(cfg.cuda_graphs, device, name)  # refused on the CPU before any work
    torch.manual_seed(cfg.seed)

    policy = init if init is not None else LatentPolicy(impala_scale=cfg.impala_scale)
    policy = policy.to(device).to(memory_format=torch.channels_last)
    batch = cfg.num_envs * cfg.rollout
    updates = max(1, -(-cfg.env_steps // batch))
    optimizer, schedule, params = _optimizer(policy, cfg, batch, updates, finetune)
    # The reference clips over all of policy.parameters(): its trunk and decoder are outside the
    # optimiser but take PPO's gradients, which nothing clears (the decoder's, at each of its own
    # training steps), and their norm counts (a resumed run restarts those sums from zero).
    reference_clip = finetune and cfg.reference_clip
    if reference_clip:
        policy.conv.requires_grad_(True)
        policy.decoder.requires_grad_(True)
    clip_params = list(policy.parameters()) if reference_clip else params
    decoder = OnlineDecoder(idm, cfg, device) if finetune else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    log = RunLog(out, name)
    state = resume(out, policy, optimizer, schedule, log, key="update")
    update = state.get("update", 0)
    if state:
        gen.manual_seed(cfg.seed + update)
    last = latest_checkpoint(out)
    minibatch_step = _ppo_step(policy, optimizer, clip_params, cfg, device, name, finetune, reference_clip, mode)
    run.save_config(name, cfg, versions={"lapo_fast": __version__, "torch": torch.__version__},
         env=env_name, device=str(device))

    # Fresh envs on resume, seeded by the update so a resumed run does not replay its levels.
    env = ProcgenVecEnv(env_name, cfg.num_envs, seed=cfg.seed * 100_003 + update,
                        distribution_mode=cfg.distribution_mode)
    if cfg.normalize_rewards:  # Cobbe et al.'s reward scale (envs/wrappers.py), resumed with the run
        env = ScaleRewards(env, cfg.gamma)
        if state.get("normalizer"):
            env.load_state_dict(state["normalizer"])
    obs_np, _ = env.reset()
    T, N = cfg.rollout, cfg.num_envs
    # The rollout keeps what the update needs: conv features when fine-tuning, frames otherwise
    # (and then the frames on the CPU too, for the IDM's labels).
    store = (torch.zeros(T, N, policy.fc_rl.in_features, device=device) if finetune
             else torch.zeros(T, N, *env.single_observation_space.shape, dtype=torch.uint8, device=device))
    frames = torch.zeros(N, T + 1, *env.single_observation_space.shape, dtype=torch.uint8) if finetune else None
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
                with autocast(device, cfg.precision):
                    feats = policy.features(prepare_obs(obs))
                    logits, value = policy.act_value(feats)
                a = sample_actions(logits, gen)
                store[t] = feats.float() if finetune else obs
                if finetune:
                    frames[:, t] = torch.from_numpy(obs_np)
                actions[t], values[t] = a, value.float()
                logps[t] = F.log_softmax(logits.float(), -1).gather(1, a[:, None])[:, 0]
                obs_np, r, done, _, info = env.step(a)
                rewards[t] = torch.from_numpy(np.asarray(r, np.float32)).to(device)
                dones[t] = torch.from_numpy(done.astype(np.float32)).to(device)
                finished += info["final_return"][done].tolist()
            values[T] = policy.act_value(policy.features(prepare_obs(torch.from_numpy(obs_np).to(device))))[1]
            adv, ret = gae(rewards, values, dones, cfg.gamma, cfg.gae_lambda)
            if finetune:
                frames[:, T] = torch.from_numpy(obs_np)
                decoder.add(frames, actions, dones)
        t_rollout = time.perf_counter() - t0

        policy.train()
        # Under the reference's clip the update runs the trunk again, on the frames (t-major, as the rest).
        obs = frames[:, :T].transpose(0, 1).flatten(0, 1) if reference_clip else None
        stats = _update(minibatch_step, cfg, store.flatten(0, 1), actions.flatten(), logps.flatten(),
                        adv.flatten(), ret.flatten(), values[:-1].flatten(), gen, obs=obs)
        schedule.step()
        update += 1
        if finetune and decoder.due(update * batch, update):
            stats["decoder_loss"] = decoder.train(policy, cfg.seed + update)
        bar.update(batch)
        elapsed = time.perf_counter() - t0
        metrics = {"update": update, "env_steps": update * batch,
                   "episode_return": float(np.mean(finished)) if finished else None,
                   "episodes": len(finished), **stats, "lr": float(schedule.get_last_lr()[0]),
                   "fps": batch / elapsed, "rollout_fps": batch / t_rollout}
        log.log(metrics, step_key="update")
        if finished:
            bar.set_postfix(ret=f"{np.mean(finished):.2f}")
        finished = []
        if update % cfg.checkpoint_every == 0 or update == updates:
            last = save_checkpoint(out, update, policy, optimizer, schedule,
                                   {"update": update, "normalizer": env.state_dict() if cfg.normalize_rewards
                                    else None})
        if stop_after is not None and update >= stop_after and update < updates:
            break
    bar.close()
    env.close()
    log.close()
    return last


def _ppo_step(policy, optimizer, clip_params, cfg: PPOConfig, device, name: str, finetune: bool,
              reference_clip: bool, mode: str = "eager"):
    """PPO's minibatch step for this run: on frames (from scratch; fine-tuning under the reference's
    clip, where the frozen trunk runs again) or on the trunk features stored in the rollout."""
    if mode == "graph" and reference_clip:
        print(f"{name}: no CUDA graph with reference_clip (the trunk's and decoder's gradients it counts live "
              "outside the optimiser, and the decoder's training replaces them); running eagerly. "
              "--no-reference-clip allows the graph")
        mode = "eager"
    if reference_clip:
        features = lambda obs: policy.conv_features(prepare_obs(obs))  # noqa: E731
    elif finetune:
        features = lambda feats: feats  # noqa: E731 -- computed once per env step in the rollout
    else:
        features = lambda obs: policy.features(prepare_obs(obs))  # noqa: E731
    return make_ppo_step(policy, optimizer, clip_params, cfg, device, features, mode)


def run_scratch(ctx: StageContext, cfg: PPOConfig) -> str:
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


def run_finetune(ctx: StageContext, cfg: FinetuneConfig) -> str:
    """The registry's `finetune`: stage 3b in RUN/<name>."""
    check_game(ctx.env)
    return f"final checkpoint {finetune(ctx.run, ctx.env, cfg, name=ctx.name or 'finetune', progress=ctx.progress)}"


def finetune(run_dir, env_name: str, cfg: FinetuneConfig, *, name: str = "finetune", progress: bool = True) -> Path:
    """Stage 3b on a run directory: the stage-2 policy decoded (DecodedPolicy) and fine-tuned, its
    transitions labelled by the stage-1 IDM; what `lapo-fast finetune` and `train` run."""
    run = RunDir(run_dir)
    return train_ppo(run, env_name, cfg, name=name, init=DecodedPolicy(run.load_policy("bc")), idm=run.load_lam().idm,
                     progress=progress)


def _update(step, cfg: PPOConfig, store, actions, old_logp, adv, ret, old_value, gen, obs=None) -> dict:
    """PPO's epochs over a rollout, one `step` (_ppo_step) per minibatch. `obs` (uint8 frames on the
    CPU, fine-tuning under the reference's clip): the step's input instead of `store`."""
    size = len(actions)
    mb = size // cfg.minibatches
    means = StepMeans(*STATS)
    for _ in range(cfg.epochs):
        order = torch.randperm(size, generator=gen, device=gen.device).to(store.device)
        for i in range(cfg.minibatches):
            idx = order[i * mb:(i + 1) * mb]
            x = obs[idx.cpu()].to(store.device) if obs is not None else store[idx]
            out = step({"obs": x, "actions": actions[idx], "old_logp": old_logp[idx], "adv": adv[idx],
                        "ret": ret[idx], "old_value": old_value[idx]})
            means.add(*(out[k] for k in STATS))
    return means.read()
