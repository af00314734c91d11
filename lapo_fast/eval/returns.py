"""Episode returns of a policy over many levels, and the paper's per-game normalisation.

normalised = (R - R_random) / (R_expert - R_random): 0 is the uniform-random policy, 1 the
expert that generated LAPO's data (the tables are game facts, in envs/games.py).
"""

from __future__ import annotations

import numpy as np

from lapo_fast.envs import ProcgenVecEnv
from lapo_fast.envs.games import DEFAULT_DISTRIBUTION_MODE, EXPERT_RETURN, RANDOM_RETURN, check_game
from lapo_fast.runtime.acting import Actor


def normalized_return(ret, game: str, *, low: float | None = None, high: float | None = None):
    """(R - low) / (high - low); by default the paper's random and expert returns for `game`."""
    check_game(game)
    low = RANDOM_RETURN[game] if low is None else low
    high = EXPERT_RETURN[game] if high is None else high
    if high <= low:
        raise ValueError(f"normalising {game}: reference return {high} is not above the baseline {low}")
    return (np.asarray(ret, np.float64) - low) / (high - low)


def evaluate(act: Actor, game: str, *, episodes: int, num_envs: int, seed: int,
             distribution_mode: str = DEFAULT_DISTRIBUTION_MODE, max_steps: int = 1_000_000) -> dict:
    """Mean return over `episodes` episodes on unseen, random levels. Every env contributes the
    same number of episodes (its first ones), so short episodes are not over-represented."""
    if episodes < 1 or num_envs < 1:
        raise ValueError("episodes and num_envs must be >= 1")
    num_envs = min(num_envs, episodes)
    per_env = -(-episodes // num_envs)
    returns: list[list[float]] = [[] for _ in range(num_envs)]
    lengths: list[int] = []
    with ProcgenVecEnv(game, num_envs, seed=seed, distribution_mode=distribution_mode) as env:
        obs, _ = env.reset()
        for _ in range(max_steps):
            obs, _, done, _, info = env.step(act(obs))
            for i in np.flatnonzero(done):
                if len(returns[i]) < per_env:
                    returns[i].append(float(info["final_return"][i]))
                    lengths.append(int(info["final_length"][i]))
            if all(len(r) >= per_env for r in returns):
                break
        else:
            raise RuntimeError(f"evaluation did not finish {episodes} episodes in {max_steps} steps")
    flat = np.array([r for env_returns in returns for r in env_returns])
    return {"game": game, "episodes": int(len(flat)), "mean_return": float(flat.mean()),
            "std_return": float(flat.std()), "stderr": float(flat.std() / np.sqrt(len(flat))),
            "mean_length": float(np.mean(lengths)),
            "normalized": float(normalized_return(flat.mean(), game)), "returns": flat.tolist()}
