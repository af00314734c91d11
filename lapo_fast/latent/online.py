"""Stage 3b's decoder, trained online: the IDM's labels of the agent's own transitions."""

from __future__ import annotations

import torch

from .decoders import decoder_step
from .labels import idm_latents


class OnlineDecoder:
    """The IDM's latent of each of the agent's transitions (o_{t-1}, o_t, o_{t+1}) that stays inside
    one episode, with the action taken at o_t; the policy's decoder is retrained from scratch on all
    of them on FinetuneConfig's schedule."""

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

    def train(self, policy, seed: int) -> float:
        """Retrains policy.decoder (a DecodedPolicy's) from fresh weights; the last minibatch's loss."""
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
        # Under the reference's clip the decoder keeps its gradients for PPO's norm (stages/finetune.py).
        policy.decoder.requires_grad_(c.reference_clip)
        return loss.item()
