"""PPO's parts, each readable in one screen, as CleanRL's ppo_procgen.py has them: the rollout
(collect_rollout into a Rollout), GAE (gae), the loss and its minibatch step (ppo_loss,
make_ppo_step), the epochs of one update (ppo_epochs), and what a PPO stage keeps around its loop
(PPOSession: envs, resume, the log line and checkpoint of each update). PPO from scratch
(stages/ppo.py) and stage 3b's fine-tuning (stages/finetune.py) are loops over these;
check-reference runs ppo_step against the reference code's own updates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lapo_fast import __version__
from lapo_fast.data import prepare_obs

from . import distributed
from .acting import sample_actions
from .checkpoint import latest_checkpoint, resume, save_checkpoint
from .distributed import autocast
from .metrics import StepMeans
from .step import TrainStep, graph_mode

STATS = ("policy_loss", "value_loss", "entropy", "clip_frac")


# -- the rollout -------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """T steps of N envs, t-major. `inputs[t]` is what the update's step turns into trunk features:
    the frames (PPO from scratch) or the frozen trunk's features of them (stage 3b, float);
    `frames`, if kept, holds each env's frames in order on the CPU with the next observation last
    (N, T+1, H, W, C: stage 3b's IDM labels, and its trunk's input under the reference's clip)."""

    inputs: torch.Tensor
    actions: torch.Tensor
    logps: torch.Tensor
    values: torch.Tensor          # T+1 rows: the last bootstraps GAE
    rewards: torch.Tensor
    dones: torch.Tensor           # dones[t]: the episode ended with step t
    frames: torch.Tensor | None = None

    @classmethod
    def empty(cls, T: int, N: int, obs_shape, device, *, features: int | None = None, keep_frames: bool = False):
        inputs = (torch.zeros(T, N, features, device=device) if features
                  else torch.zeros(T, N, *obs_shape, dtype=torch.uint8, device=device))
        frames = torch.zeros(N, T + 1, *obs_shape, dtype=torch.uint8) if keep_frames else None
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return cls(inputs, torch.zeros(T, N, dtype=torch.long, device=device), zeros(T, N), zeros(T + 1, N),
                   zeros(T, N), zeros(T, N), frames)

    def batch(self, adv: torch.Tensor, ret: torch.Tensor, *, frames_as_obs: bool = False) -> dict:
        """The update's flat (T*N) inputs; frames_as_obs: the CPU frames are the step's obs."""
        T = len(self.actions)
        obs = self.frames[:, :T].transpose(0, 1).flatten(0, 1) if frames_as_obs else self.inputs.flatten(0, 1)
        return {"obs": obs, "actions": self.actions.flatten(), "old_logp": self.logps.flatten(), "adv": adv.flatten(),
                "ret": ret.flatten(), "old_value": self.values[:-1].flatten()}


@torch.no_grad()
def collect_rollout(policy, env, obs_np: np.ndarray, buf: Rollout, gen: torch.Generator, precision: str):
    """Acts len(buf.actions) steps in `env` from `obs_np`, filling `buf`; returns the observation
    after the last step and the returns of the episodes that ended."""
    policy.eval()
    device, finished = buf.inputs.device, []
    keep_features = buf.inputs.dtype != torch.uint8
    for t in range(len(buf.actions)):
        obs = torch.from_numpy(obs_np).to(device)
        with autocast(device, precision):
            feats = policy.features(prepare_obs(obs))
            logits, value = policy.act_value(feats)
        a = sample_actions(logits, gen)
        buf.inputs[t] = feats.float() if keep_features else obs
        if buf.frames is not None:
            buf.frames[:, t] = torch.from_numpy(obs_np)
        buf.actions[t], buf.values[t] = a, value.float()
        buf.logps[t] = F.log_softmax(logits.float(), -1).gather(1, a[:, None])[:, 0]
        obs_np, r, done, _, info = env.step(a)
        buf.rewards[t] = torch.from_numpy(np.asarray(r, np.float32)).to(device)
        buf.dones[t] = torch.from_numpy(done.astype(np.float32)).to(device)
        finished += info["final_return"][done].tolist()
    buf.values[-1] = policy.act_value(policy.features(prepare_obs(torch.from_numpy(obs_np).to(device))))[1]
    if buf.frames is not None:
        buf.frames[:, -1] = torch.from_numpy(obs_np)
    return obs_np, finished


def gae(rewards, values, dones, gamma: float, lam: float):
    """Advantages and returns. values has T+1 rows (the last bootstraps); dones[t] = the episode
    ended with step t, so nothing flows back across it."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        live = 1.0 - dones[t]
        delta = rewards[t] + gamma * values[t + 1] * live - values[t]
        last = delta + gamma * lam * live * last
        adv[t] = last
    return adv, adv + values[:-1]


# -- the update ----------------------------------------------------------------------------------------

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


def ppo_epochs(step, cfg, batch: dict, gen: torch.Generator, device) -> dict:
    """One update: cfg.epochs passes over the rollout's flat `batch` (Rollout.batch), each in
    cfg.minibatches shuffled minibatches, one `step` each; the means of STATS."""
    size = len(batch["actions"])
    mb = size // cfg.minibatches
    means = StepMeans(*STATS)
    for _ in range(cfg.epochs):
        order = torch.randperm(size, generator=gen, device=gen.device)
        for i in range(cfg.minibatches):
            idx = order[i * mb:(i + 1) * mb]
            out = step({k: v[idx.to(v.device)].to(device) for k, v in batch.items()})
            means.add(*(out[k] for k in STATS))
    return means.read()


def ppo_step(policy, optimizer, clip_params, cfg, feats, actions, old_logp, adv, ret, old_value) -> tuple:
    """One eager update on features computed by the caller (their gradient flows back into the
    trunk that made them). Returns (policy loss, value loss, entropy, clip fraction, the norm before
    the clip)."""
    step = make_ppo_step(policy, optimizer, clip_params, cfg, feats.device, features=lambda x: x)
    out = step({"obs": feats, "actions": actions, "old_logp": old_logp, "adv": adv, "ret": ret,
                "old_value": old_value})
    return (*(out[k] for k in STATS), out.get("grad_norm"))


def scaled_rewards(env, cfg):
    """The env whose rewards PPO trains on: Cobbe et al.'s scaling (ScaleRewards at cfg.gamma)
    when cfg.normalize_rewards, as the reference's setup_procgen_env does."""
    from lapo_fast.envs.wrappers import ScaleRewards  # gymnasium: imported where an env is made

    return ScaleRewards(env, cfg.gamma) if cfg.normalize_rewards else env


# -- around the loop -----------------------------------------------------------------------------------

class PPOSession:
    """What a PPO stage keeps around its loop: RUN/<name> claimed for the game and these settings,
    the device, the sampling generator, the run log, the envs (fresh on resume, seeded by the
    update so a resumed run does not replay its levels; rewards scaled as Cobbe et al.'s, the
    scale resumed with the run) and each update's log line and checkpoint."""

    def __init__(self, run, env_name: str, cfg, name: str, *, progress: bool = True):
        run.claim(name, cfg, game=env_name)
        self.run, self.env_name, self.cfg, self.name, self.progress = run, env_name, cfg, name, progress
        self.out = run.stage(name)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = distributed.device(cfg.device)
        self.mode = graph_mode(cfg.cuda_graphs, self.device, name)  # refused on the CPU before any work
        torch.manual_seed(cfg.seed)
        self.batch, self.updates = cfg.num_envs * cfg.rollout, cfg.planned_steps()
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)

    def start(self, policy, optimizer, schedule) -> tuple[int, object, np.ndarray]:
        """Resumes from the last checkpoint (if any) and opens the envs: (update, env, first obs)."""
        from lapo_fast.envs import ProcgenVecEnv

        cfg = self.cfg
        self.log = self.run.run_log(self.name)
        state = resume(self.out, policy, optimizer, schedule, self.log, key="update")
        update = state.get("update", 0)
        if state:
            self.gen.manual_seed(cfg.seed + update)
        self.last = latest_checkpoint(self.out)
        self.run.save_config(self.name, cfg, versions={"lapo_fast": __version__, "torch": torch.__version__},
                             env=self.env_name, device=str(self.device))
        env = ProcgenVecEnv(self.env_name, cfg.num_envs, seed=cfg.seed * 100_003 + update,
                            distribution_mode=cfg.distribution_mode)
        env = scaled_rewards(env, cfg)
        if cfg.normalize_rewards and state.get("normalizer"):
            env.load_state_dict(state["normalizer"])
        from tqdm import tqdm

        self.bar = tqdm(total=self.updates * self.batch, initial=update * self.batch, disable=not self.progress,
                        desc=self.name, unit="step", unit_scale=True)
        self.env = env
        return update, env, env.reset()[0]

    def end_update(self, update: int, stats: dict, finished: list[float], seconds: float, rollout_seconds: float,
                   policy, optimizer, schedule) -> None:
        """The update's log line (env steps, the mean return of the episodes that ended, losses,
        frames/s) and, every checkpoint_every updates and at the last, its checkpoint."""
        mean_return = float(np.mean(finished)) if finished else None
        self.log.log({"update": update, "env_steps": update * self.batch, "episode_return": mean_return,
                      "episodes": len(finished), **stats, "lr": float(schedule.get_last_lr()[0]),
                      "fps": self.batch / seconds, "rollout_fps": self.batch / rollout_seconds}, step_key="update")
        self.bar.update(self.batch)
        if finished:
            self.bar.set_postfix(ret=f"{mean_return:.2f}")
        if update % self.cfg.checkpoint_every == 0 or update == self.updates:
            normalizer = self.env.state_dict() if self.cfg.normalize_rewards else None
            self.last = save_checkpoint(self.out, update, policy, optimizer, schedule,
                                        {"update": update, "normalizer": normalizer,
                                         **self.run.checkpoint_record(self.cfg)})

    def close(self) -> Path:
        """Closes the envs, the bar and the log; the last checkpoint."""
        self.bar.close()
        self.env.close()
        self.log.close()
        return self.last
