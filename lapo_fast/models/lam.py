"""LAPO's latent action model: the quantised inverse dynamics model and the world model around it."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from lapo_fast.envs.games import NUM_ACTIONS
from lapo_fast.choices import FdmAction, values
from lapo_fast.ops import VectorQuantizerEMA
from lapo_fast.ops.vq_reference import perplexity_of

from lapo_fast.layout import memory_format, reference_layout  # noqa: F401 (reference_layout: re-exported)

from .fdm import ARCHS, LapoFDM, UNetFDM
from .impala import ImpalaEncoder


def stack_frames(window: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T*C, H, W): frames stacked on channels, as the CNNs take them, in
    channels_last memory (lapo_fast.layout)."""
    return window.flatten(1, 2).contiguous(memory_format=memory_format())


class IDMOutput(NamedTuple):
    latent: torch.Tensor      # (B, latent_dim) before quantisation (stage 2's regression target)
    quantized: torch.Tensor   # (B, latent_dim), straight-through
    indices: torch.Tensor     # (B, codebooks, latents)
    vq_loss: torch.Tensor
    perplexity: torch.Tensor


class LatentIDM(nn.Module):
    """IDM(o_{t-k}..o_t, o_{t+1}) -> latent action z_t, vector-quantised (LAPO: 2 x 64 x 16, 4 latents)."""

    def __init__(self, frames: int = 3, channels: int = 3, impala_scale: int = 4, latent_dim: int = 128,
                 num_codebooks: int = 2, codebook_size: int = 64, code_dim: int = 16, num_latents: int = 4,
                 quantize: bool = True, **vq_kwargs):
        super().__init__()
        if num_codebooks * code_dim * num_latents != latent_dim:
            raise ValueError(f"latent_dim={latent_dim} must equal codebooks*code_dim*latents = "
                             f"{num_codebooks}*{code_dim}*{num_latents}")
        self.encoder = ImpalaEncoder(frames * channels, impala_scale)
        self.head = nn.Linear(self.encoder.out_features, latent_dim)
        # quantize=False: the paper's no-VQ ablation (Figure 3), the continuous latent passed on as is.
        self.vq = VectorQuantizerEMA(num_codebooks, codebook_size, code_dim, num_latents, layout="lapo",
                                     **vq_kwargs) if quantize else None
        self._groups = (num_codebooks, num_latents)

    def forward(self, window: torch.Tensor) -> IDMOutput:
        """window: (B, T, C, H, W) normalised frames, the last one o_{t+1}."""
        z = self.head(self.encoder(stack_frames(window)))
        if self.vq is None:  # no codes: indices all 0, no VQ loss, perplexity 0
            zero = z.new_zeros(())
            return IDMOutput(z, z, torch.zeros(len(z), *self._groups, dtype=torch.long, device=z.device), zero, zero)
        vq = self.vq(z)
        return IDMOutput(z, vq.quantized, vq.indices, vq.loss, vq.perplexity)


class TrueActionEmbedding(nn.Module):
    """Stands in for the IDM in the true-action ablation: the dataset's action, embedded. An FDM
    trained on it shows how much the action itself is worth to the world model at a given data
    size and scale (held-out loss with each window's own action against another's). The IDM is
    pushed to encode the action only as far as it lowers that loss: where the true action buys the
    FDM nothing, the IDM has no gradient towards it."""

    def __init__(self, num_actions: int, latent_dim: int):
        super().__init__()
        self.embed = nn.Embedding(num_actions, latent_dim)

    def forward(self, actions: torch.Tensor) -> IDMOutput:
        z = self.embed(actions)
        counts = torch.bincount(actions, minlength=self.embed.num_embeddings).float()
        perplexity = perplexity_of(counts[None])  # of the actions, as the VQ's is of its codes
        return IDMOutput(z, z, actions[:, None, None], z.new_zeros(()), perplexity)


FDM_ACTIONS = values(FdmAction)


class LatentActionModel(nn.Module):
    """Stage 1: the IDM labels each transition with a latent action; the FDM must reconstruct
    o_{t+1} from the past frames and that latent alone.

    fdm_action="true" is the ablation: the FDM gets the true action (`idm` is then a
    TrueActionEmbedding, and forward needs the actions)."""

    def __init__(self, frames: int = 3, channels: int = 3, impala_scale: int = 4, latent_dim: int = 128,
                 fdm_width: int = 24, fdm_norm: str = "batch", fdm_action: str = "latent",
                 num_actions: int = NUM_ACTIONS,
                 fdm_arch: str = "lapo", **idm_kwargs):
        super().__init__()
        if fdm_action not in FDM_ACTIONS:
            raise ValueError(f"LatentActionModel: fdm_action must be one of {FDM_ACTIONS}, got {fdm_action!r}")
        self.true_action = fdm_action == "true"
        self.idm = (TrueActionEmbedding(num_actions, latent_dim) if self.true_action
                    else LatentIDM(frames, channels, impala_scale, latent_dim, **idm_kwargs))
        if fdm_arch not in ARCHS:
            raise ValueError(f"LatentActionModel: fdm_arch must be one of {ARCHS}, got {fdm_arch!r}")
        self.fdm = (LapoFDM((frames - 1) * channels, latent_dim, fdm_width, channels) if fdm_arch == "lapo"
                    else UNetFDM((frames - 1) * channels, latent_dim, fdm_width, channels, fdm_norm))

    def forward(self, window: torch.Tensor, actions: torch.Tensor | None = None):
        """Returns (total loss, reconstruction loss, IDM output, predicted o_{t+1}). `actions`:
        (B,) the true a_t, used only by the true-action ablation."""
        if self.true_action and actions is None:
            raise ValueError("the true-action FDM needs each window's action")
        out = self.idm(actions) if self.true_action else self.idm(window)
        pred = self.fdm(stack_frames(window[:, :-1]), out.quantized)
        recon = F.mse_loss(pred, window[:, -1])
        return recon + out.vq_loss, recon, out, pred


def build_lam(cfg) -> LatentActionModel:
    """Stage 1's model from its config (a LAMConfig), in channels_last memory (lapo_fast.layout)."""
    return LatentActionModel(
        frames=cfg.context + 2, impala_scale=cfg.impala_scale, fdm_arch=cfg.fdm_arch, fdm_width=cfg.fdm_width,
        fdm_norm=cfg.fdm_norm, fdm_action=cfg.fdm_action,
        latent_dim=cfg.num_codebooks * cfg.code_dim * cfg.num_latents, num_codebooks=cfg.num_codebooks,
        codebook_size=cfg.codebook_size, code_dim=cfg.code_dim, num_latents=cfg.num_latents,
        quantize=cfg.quantize, decay=cfg.vq_decay, commitment=cfg.commitment,
        dead_code_threshold=cfg.dead_code_threshold,
    ).to(memory_format=memory_format())
