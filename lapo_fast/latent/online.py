"""Stage 3b's decoder, trained online: the IDM's labels of the agent's own transitions."""

from __future__ import annotations

import torch

from .decoders import decoder_step
from .labels import idm_latents


class OnlineDecoder:
    """The IDM's latent of each of the agent's transitions (o_{t-1}, o_t, o_{t+1}) that stays inside
    one episode, with the action taken at o_t; the policy's decoder is retrained from scratch on all
    of them on FinetuneConfig's schedule. As the reference's rolling buffer, a rollout's first
    transition is labelled too: its o_{t-1} is the previous rollout's last frame, kept for it."""

    def __init__(self, idm, cfg, device):
        self.idm, self.cfg, self.device = idm.to(device).eval(), cfg, device
        self.latents: list[torch.Tensor] = []
        self.actions: list[torch.Tensor] = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the previous rollout's o_{T-1} and dones[T-1]

    def add(self, frames: torch.Tensor, actions: torch.Tensor, dones: torch.Tensor) -> None:
        """frames (N, T+1, H, W, C) uint8 of a rollout, each env's in order (the last: the obs
        after it), its actions and dones (T, N): labels for t in 0..T-1 (from 1 in the first
        rollout) whose window crosses no episode end."""
        dones = dones.cpu()
        first = 1 if self._last is None else 0  # the first t labelled (t = 0 needs o_{-1})
        last = (frames[:, -2].clone(), dones[-1].clone())
        if self._last is not None:  # o_{-1} and dones[-1] from the rollout before
            frames = torch.cat([self._last[0][:, None], frames], 1)
            dones = torch.cat([self._last[1][None], dones])
        self._last = last
        keep = ((dones[:-1] == 0) & (dones[1:] == 0))  # (rows-1, N): no end at t-1 nor at t
        t, n = torch.nonzero(keep, as_tuple=True)
        starts = (n * frames.shape[1] + t).numpy()  # o_{t-1} in the envs' concatenated frames
        latents = idm_latents(self.idm, frames.flatten(0, 1), starts, 1, batch=512, device=self.device)
        self.latents.append(torch.from_numpy(latents))
        self.actions.append(actions.cpu()[t + first, n])

    def due(self, env_steps: int, update: int) -> bool:
        c = self.cfg
        return (c.decoder_from < env_steps < c.decoder_until and bool(self.latents)
                and (env_steps < c.decoder_dense_until or update % c.decoder_every == 0))

    def train(self, policy, seed: int) -> float:
        """Retrains policy.decoder (a DecodedPolicy's) from fresh weights; the last minibatch's loss."""
        policy.reset_decoder(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        losses = self.fit(policy.decoder, lambda n: torch.randperm(n, generator=gen))
        # Under the reference's clip the decoder keeps its gradients for PPO's norm (stages/finetune.py).
        policy.decoder.requires_grad_(self.cfg.reference_clip)
        return losses[-1].item()

    def fit(self, decoder, permutation) -> torch.Tensor:
        """decoder_epochs passes over every labelled transition in decoder_batch minibatches, in the
        order `permutation(n)` gives each epoch (Adam at decoder_lr, label smoothing): each step's loss."""
        c = self.cfg
        latents, actions = torch.cat(self.latents).to(self.device), torch.cat(self.actions).to(self.device)
        decoder.requires_grad_(True)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=c.decoder_lr)
        losses = []
        for _ in range(c.decoder_epochs):
            order = permutation(len(actions)).to(self.device)
            for i in range(0, len(order), c.decoder_batch):
                idx = order[i:i + c.decoder_batch]
                _, loss = decoder_step(decoder, optimizer, latents[idx], actions[idx],
                                       label_smoothing=c.label_smoothing)
                losses.append(loss.detach())
        return torch.stack(losses)
