"""What a trained IDM says about a dataset: its latent action for any window, and the probe of
how much of the true action that latent carries."""

from __future__ import annotations

import numpy as np
import torch

from lapo_fast.data import WindowSampler, normalize
from lapo_fast.data.loader import in_order

from .decoders import probe


@torch.no_grad()
def idm_latents(idm, frames, starts: np.ndarray, context: int, *, batch: int = 512, device="cpu",
                progress: bool = False) -> np.ndarray:
    """The IDM's pre-quantisation latent (float32) of the window beginning at each of `starts`
    (o_{t-k}..o_t, o_{t+1} with t = start + context), in eval mode."""
    from tqdm import tqdm

    offsets = np.arange(context + 2)
    was_training = idm.training
    idm.eval()
    out = np.empty((len(starts), idm.head.out_features), np.float32)
    batches = [np.asarray(starts[i:i + batch])[:, None] + offsets for i in range(0, len(starts), batch)]
    loader = in_order(frames, batches, device)  # uint8 windows, prefetched on a GPU
    at = 0
    for idx in tqdm(batches, disable=not progress, desc="idm latents", unit="batch"):
        window = normalize(next(loader)["obs"])
        out[at:at + len(idx)] = idm(window).latent.float().cpu().numpy()
        at += len(idx)
    loader.close()
    idm.train(was_training)
    return out


def latent_probe(idm, sampler: WindowSampler, actions: np.ndarray, device, *, labelled: int = 4_096,
                 held_out: int = 2_000, seed: int = 0) -> dict:
    """Stage 1's probe: does the latent carry the true action? Linear and MLP decoders from
    `labelled` transitions, scored on `held_out` others (the reference's: 65,536 and 65,536)."""
    rng = np.random.default_rng(seed)
    starts = rng.choice(sampler.starts, min(len(sampler.starts), labelled + held_out), replace=False)
    context = sampler.window - 2
    latents = idm_latents(idm, sampler.frames, starts, context, device=device)
    return probe(latents, np.asarray(actions)[starts + context], labelled=labelled, held_out=held_out, seed=seed)
