"""What acts in an environment, in one place: an Actor maps a batch of observations (N, 64, 64, 3)
uint8 to actions (N,). sample_actions turns logits into actions; random_policy, checkpoint_policy (a
torch.export program), policy_actor (a policy's true-action head) and decoded_actor (a decoder on a
latent policy) are the actors `collect`, the demonstrator, the evaluation and stage 3a use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lapo_fast.envs.games import NUM_ACTIONS

Actor = Callable[[np.ndarray], np.ndarray]  # obs (N, 64, 64, 3) uint8 -> actions (N,) int


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None, *,
                   greedy: bool = False) -> torch.Tensor:
    """(N, A) logits -> (N,) int64 actions: the argmax, or a sample of softmax(logits) in fp32."""
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]


def random_policy(num_actions: int = NUM_ACTIONS, seed: int = 0) -> Actor:
    rng = np.random.default_rng(seed)
    return lambda obs: rng.integers(0, num_actions, len(obs), dtype=np.int32)


def checkpoint_policy(path, *, seed: int = 0, device: str = "cpu", greedy: bool = False) -> Actor:
    """A policy saved with torch.export (.pt2): module(obs uint8 (N, 64, 64, 3)) -> logits
    (N, NUM_ACTIONS) float, sampled (or argmax with greedy=True), or actions (N,) int."""
    from lapo_fast.data.format import DatasetError

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such policy checkpoint")
    try:
        module = torch.export.load(str(path)).module()
    except Exception as e:  # torch raises several types for a file that is not an exported program
        raise DatasetError(f"{path}: not a torch.export policy ({type(e).__name__}: {e})") from e
    gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        out = module(torch.from_numpy(obs).to(device))
        if out.dtype.is_floating_point:
            if tuple(out.shape) != (len(obs), NUM_ACTIONS):
                raise DatasetError(f"{path}: policy returned logits of shape {tuple(out.shape)}, "
                                   f"expected ({len(obs)}, {NUM_ACTIONS})")
            out = sample_actions(out, gen, greedy=greedy)
        return out.to(torch.int32).cpu().numpy()

    return act


def _actor(logits_of, device, seed: int, greedy: bool) -> Actor:
    from lapo_fast.data import prepare_obs

    gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        logits = logits_of(prepare_obs(torch.from_numpy(obs).to(device)))
        return sample_actions(logits, gen, greedy=greedy).to(torch.int32).cpu().numpy()

    return act


def policy_actor(policy, *, device="cpu", seed: int = 0, greedy: bool = False) -> Actor:
    """Acts with the policy's true-action head (PPO and fine-tuned policies)."""
    device = torch.device(device)
    policy = policy.to(device).to(memory_format=torch.channels_last).eval()
    return _actor(lambda x: policy.act_value(policy.features(x))[0], device, seed, greedy)


def decoded_actor(policy, decoder, *, device="cpu", seed: int = 0,
                  greedy: bool = False) -> Actor:
    """Acts with decoder(the latent policy's latent action): stage 3a's decoded policy."""
    device = torch.device(device)
    policy = policy.to(device).to(memory_format=torch.channels_last).eval()
    decoder = decoder.to(device).eval()
    return _actor(lambda x: decoder(policy(x)), device, seed, greedy)
