"""Policies: the latent policy of stage 2 (with value and true-action heads for stage 3) and the
small offline decoder from latent to true actions."""

from __future__ import annotations

import copy
import math

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
        # The reference's layer_init(std=1): any std it is given becomes sqrt(2), so an orthogonal
        # weight of norm sqrt(2) and a zero bias (nn.Linear's default would be ~0.58).
        nn.init.orthogonal_(self.value_head.weight, gain=math.sqrt(2))
        nn.init.zeros_(self.value_head.bias)

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
        self.latent_dim, self.num_actions, self.hidden = latent_dim, num_actions, tuple(hidden)
        layers, cin = [], latent_dim
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        layers.append(nn.Linear(cin, num_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent)


class DecodedPolicy(nn.Module):
    """Stage 3b's agent, as LAPO's code builds it from the stage-2 latent policy: the conv trunk
    frozen; a frozen copy of fc and the frozen latent head feed a decoder MLP (192, 128, 64) that
    maps latent to true actions (trained online, by supervision, on the IDM's labels of the agent's
    own transitions); a trainable fc (fc_rl) feeds a zero-initialised true-action head and the value
    head. The two paths' logits are averaged, so at the start the agent acts as the decoded latent
    policy. Everything after the conv trunk reads its features, which can be computed once per env
    step and reused (`conv_features`)."""

    def __init__(self, latent: LatentPolicy, num_actions: int = NUM_ACTIONS):
        super().__init__()
        trunk = latent.trunk
        self.conv = trunk.stages
        self.fc_sl = copy.deepcopy(trunk.fc)
        self.latent_head = latent.latent_head
        self.fc_rl = trunk.fc
        self.action_head = nn.Linear(trunk.fc.out_features, num_actions)
        nn.init.zeros_(self.action_head.weight)
        nn.init.zeros_(self.action_head.bias)
        self.value_head = latent.value_head
        self.decoder = ActionDecoder(latent.latent_head.out_features, num_actions, hidden=(192, 128, 64))
        for frozen in (self.conv, self.fc_sl, self.latent_head, self.decoder):
            frozen.requires_grad_(False)  # the decoder learns by its own supervised steps, not PPO's

    def conv_features(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.flatten(self.conv(obs), 1))

    def latent(self, feats: torch.Tensor) -> torch.Tensor:
        """The frozen latent policy's latent action, from conv features."""
        return self.latent_head(torch.relu(self.fc_sl(feats)))

    def logits_value(self, feats: torch.Tensor, latent: torch.Tensor | None = None):
        """(averaged logits, value) from conv features (and the latent, when already computed)."""
        hidden = torch.relu(self.fc_rl(feats))
        latent = self.latent(feats) if latent is None else latent
        logits = (self.action_head(hidden) + self.decoder(latent)) / 2
        return logits, self.value_head(hidden).squeeze(-1)

    # The PPO loop's interface (as LatentPolicy's): features once per env step, then the heads.
    features = conv_features
    act_value = logits_value

    def reset_decoder(self, seed: int) -> None:
        """Fresh decoder weights, seeded (LAPO retrains its decoder from scratch each time)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.decoder.net:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
