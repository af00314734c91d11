"""What a frozen IDM says about a dataset: its latent action for any window (idm_latents), and stage
2's targets -- every window's latent, computed once and kept in the run directory (window_labels)."""

from __future__ import annotations

import numpy as np
import torch

from lapo_fast.data import normalize
from lapo_fast.data.loader import in_order
from lapo_fast.runtime.files import atomic_write


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


def window_labels(run, ds, frames=None, *, batch: int = 512, device="cpu", progress: bool = True, rank: int = 0,
                  world: int = 1, caller: str = "bc"):
    """(starts, latents, context) of stage 2 in run directory `run` (a RunDir): for every window
    inside an episode of `ds`, its first frame and the frozen stage-1 IDM's pre-quantisation latent;
    the policy's input is frame start + context. Computed once (from `frames`, as a planner opened
    them; default: the compressed shards) and saved in run.labels; recomputed when the dataset or
    the stage-1 checkpoint changed. Under DDP every rank calls it: each labels 1/world of the
    windows, all get every label, rank 0 saves them. `caller`: the stage its lines name."""
    from lapo_fast.data import CompressedFrames, valid_starts
    from lapo_fast.runtime.distributed import all_gather_rows

    lam_cfg = run.config("lam")
    context, lam_step = lam_cfg.context, run.checkpoint_step("lam")
    if run.labels.exists():
        blob = np.load(run.labels)
        if "data" in blob and str(blob["data"]) == ds.identity() and blob["lam_step"] == lam_step:
            return blob["starts"], blob["latents"], context
        print(f"{caller}: {run.labels} is stale (dataset or stage-1 checkpoint changed); recomputing")
    frames = CompressedFrames(ds) if frames is None else frames
    starts = valid_starts(ds.episodes, context + 2)
    share = np.array_split(starts, world)[rank]
    idm = run.load_lam(lam_cfg).idm.to(device)
    latents = idm_latents(idm, frames, share, context, batch=batch, device=device, progress=progress)
    latents = all_gather_rows(latents, device)
    if rank == 0:
        run.labels.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(run.labels, lambda tmp: np.savez(tmp, starts=starts, latents=latents, data=ds.identity(),
                                                      lam_step=lam_step))
    return starts, latents, context
