"""Actors (obs -> actions) of the networks a run trains: the latent policy's true-action head, and
a decoder composed with the latent policy."""

from __future__ import annotations

import numpy as np
import torch

from lapo_fast.data import prepare_obs
from lapo_fast.models import ActionDecoder, LatentPolicy
from lapo_fast.runtime.acting import Actor, sample_actions


def _actor(logits_of, device, seed: int, greedy: bool) -> Actor:
    gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        logits = logits_of(prepare_obs(torch.from_numpy(obs).to(device)))
        return sample_actions(logits, gen, greedy=greedy).to(torch.int32).cpu().numpy()

    return act


def policy_actor(policy: LatentPolicy, *, device="cpu", seed: int = 0, greedy: bool = False) -> Actor:
    """Acts with the policy's true-action head (PPO and fine-tuned policies)."""
    device = torch.device(device)
    policy = policy.to(device).to(memory_format=torch.channels_last).eval()
    return _actor(lambda x: policy.act_value(policy.features(x))[0], device, seed, greedy)


def decoded_actor(policy: LatentPolicy, decoder: ActionDecoder, *, device="cpu", seed: int = 0,
                  greedy: bool = False) -> Actor:
    """Acts with decoder(the latent policy's latent action): stage 3a's decoded policy."""
    device = torch.device(device)
    policy = policy.to(device).to(memory_format=torch.channels_last).eval()
    decoder = decoder.to(device).eval()
    return _actor(lambda x: decoder(policy(x)), device, seed, greedy)
