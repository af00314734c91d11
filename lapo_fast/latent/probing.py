"""Stage 1's probe: how much of the true action the IDM's latent carries."""

from __future__ import annotations

import numpy as np

from lapo_fast.data import WindowSampler

from .decoders import probe
from .labels import idm_latents


def latent_probe(idm, sampler: WindowSampler, actions: np.ndarray, device, *, labelled: int = 4_096,
                 held_out: int = 2_000, seed: int = 0) -> dict:
    """Stage 1's probe: does the latent carry the true action? Linear and MLP decoders from
    `labelled` transitions, scored on `held_out` others (the reference's: 65,536 and 65,536)."""
    rng = np.random.default_rng(seed)
    starts = rng.choice(sampler.starts, min(len(sampler.starts), labelled + held_out), replace=False)
    context = sampler.window - 2
    latents = idm_latents(idm, sampler.frames, starts, context, device=device)
    return probe(latents, np.asarray(actions)[starts + context], labelled=labelled, held_out=held_out, seed=seed)
