"""Policies: the latent policy of stage 2 (with value and true-action heads for stage 3) and the
small offline decoder from latent to true actions."""

from __future__ import annotations

import torch
from torch import nn

from lapo_fast.envs.games import NUM_ACTIONS

from .impala import ImpalaEncoder


class LatentPolicy(nn.Module):
    """pi(o_t): latent action (stage 2), plus a value and a true-action head (stage 3, PPO)."""

    def __init__(self, channels: int = 3, impala_scale: int = 4, latent_dim: int = 128, num_actions: int = NUM_ACTIONS):
        super().__init__()
        self.trunk = ImpalaEncoder(channels, impala_scale)
        f = self.trunk.out_features
        self.latent_head = nn.Linear(f, latent_dim)
        self.action_head = nn.Linear(f, num_actions)
        self.value_head = nn.Linear(f, 1)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.trunk(obs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.latent_head(self.features(obs))

    def act_value(self, features: torch.Tensor):
        """(action logits, value) from trunk features: PPO with a frozen trunk reuses features."""
        return self.action_head(features), self.value_head(features).squeeze(-1)


class ActionDecoder(nn.Module):
    """Latent action -> true-action logits: an MLP (128, 128) trained on a few labelled transitions."""

    def __init__(self, latent_dim: int = 128, num_actions: int = NUM_ACTIONS, hidden=(128, 128)):
        super().__init__()
        layers, cin = [], latent_dim
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        layers.append(nn.Linear(cin, num_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent)
