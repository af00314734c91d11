"""gymnasium vector wrappers the stages put around ProcgenVecEnv."""

from __future__ import annotations

import numpy as np
from gymnasium.vector import VectorWrapper
from gymnasium.wrappers.utils import RunningMeanStd


class ScaleRewards(VectorWrapper):
    """Rewards divided by a running std of the discounted return, then clipped to +-clip: Cobbe et
    al.'s Procgen PPO, through baselines' VecNormalize (the return counts the step that ends an
    episode, then starts again from 0). gymnasium's own NormalizeReward differs there in SAME_STEP
    autoreset (it drops the episode's past return at its last step), so it is not used; its
    RunningMeanStd is."""

    def __init__(self, env, gamma: float, clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__(env)
        self.gamma, self.clip, self.epsilon = gamma, clip, epsilon
        self.ret = np.zeros(env.num_envs, np.float64)
        self.return_rms = RunningMeanStd(shape=())

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.ret = self.ret * self.gamma + reward
        self.return_rms.update(self.ret)
        self.ret[np.logical_or(terminated, truncated)] = 0.0
        scaled = np.clip(reward / np.sqrt(self.return_rms.var + self.epsilon), -self.clip, self.clip)
        return obs, scaled.astype(np.float32), terminated, truncated, info

    def state_dict(self) -> dict:
        rms = self.return_rms
        return {"ret": self.ret.tolist(), "mean": float(rms.mean), "var": float(rms.var), "count": float(rms.count)}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's statistics (its per-env returns only when the env count is the same)."""
        if len(state["ret"]) == len(self.ret):
            self.ret = np.asarray(state["ret"], np.float64)
        self.return_rms.mean, self.return_rms.var = np.float64(state["mean"]), np.float64(state["var"])
        self.return_rms.count = state["count"]
