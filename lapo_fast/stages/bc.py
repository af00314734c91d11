"""Stage 2: latent behaviour cloning. The latent policy pi(o_t) regresses the frozen IDM's
pre-quantisation latent action of (o_{t-k}..o_t, o_{t+1}).

    lapo-fast bc --data DATASET --out RUN [--preset ...]      (needs RUN/lam)

The IDM is frozen, so every window's label is computed once, in batches, and cached in
RUN/bc/labels.npz (the reference code recomputes it every batch). Writes RUN/bc/: config.json,
labels.npz, metrics.jsonl, TensorBoard events, checkpoints; rerunning resumes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lapo_fast import __version__
from lapo_fast.config import BCConfig, save
from lapo_fast.data import FrameDataset, normalize, valid_starts
from lapo_fast.models import LatentPolicy
from lapo_fast.stages import distributed
from lapo_fast.stages.checkpoint import latest_checkpoint, resume, save_checkpoint
from lapo_fast.stages.lam import idm_latents, lam_config, load_lam
from lapo_fast.stages.optim import adamw_warmup_decay, optimizer_step
from lapo_fast.stages.runlog import RunLog


def cached_labels(run_dir, ds: FrameDataset, *, batch: int = 512, device="cpu", progress: bool = True):
    """(starts, latents, context): for every window inside an episode, its first frame and the
    frozen IDM's pre-quantisation latent; the policy's input is frame start + context. Computed
    once and saved atomically; later calls and resumed runs load them."""
    path = Path(run_dir) / "bc" / "labels.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    lam_cfg = lam_config(run_dir)
    context = lam_cfg.context
    if path.exists():
        blob = np.load(path)
        if blob["num_frames"] == ds.num_frames and blob["lam_step"] == _lam_step(run_dir):
            return blob["starts"], blob["latents"], context
        print(f"bc: {path} is stale (dataset or stage-1 checkpoint changed); recomputing")
    starts = valid_starts(ds.episodes, context + 2)
    idm = load_lam(run_dir, lam_cfg).idm.to(device)
    latents = idm_latents(idm, ds.cache(), starts, context, batch=batch, device=device, progress=progress)
    tmp = path.with_name("labels.tmp.npz")
    np.savez(tmp, starts=starts, latents=latents, num_frames=ds.num_frames, lam_step=_lam_step(run_dir))
    os.replace(tmp, path)
    return starts, latents, context


def _lam_step(run_dir) -> int:
    last = latest_checkpoint(Path(run_dir) / "lam")
    return int(last.name.split("-")[1]) if last is not None else -1


def train_bc(data_dir, run_dir, cfg: BCConfig, *, stop_after: int | None = None, progress: bool = True) -> Path:
    """Trains (or resumes) stage 2; returns the final checkpoint. Under torchrun each rank draws
    its own batches and DDP averages the gradients; rank 0 writes."""
    out = Path(run_dir) / "bc"
    rank, world, device = distributed.setup(out, cfg.device)
    torch.manual_seed(cfg.seed)

    ds = FrameDataset(data_dir)
    if rank == 0:
        labels = cached_labels(run_dir, ds, batch=cfg.label_batch, device=device, progress=progress)
    distributed.barrier()  # rank 0 computes the labels; the others then load them
    starts, latents, context = (labels if rank == 0 else
                                cached_labels(run_dir, ds, batch=cfg.label_batch, device=device, progress=False))
    frames = ds.cache()
    obs_index = starts + context                     # o_t of each window
    targets = torch.from_numpy(latents)
    rng = np.random.default_rng(cfg.seed + 1_000 * rank)

    policy = LatentPolicy(impala_scale=cfg.impala_scale, latent_dim=latents.shape[1]).to(device)
    policy = policy.to(memory_format=torch.channels_last)
    for head in (policy.action_head, policy.value_head):  # stage 3's heads: untouched here (and DDP
        head.requires_grad_(False)                         # needs every trainable parameter used)
    optimizer, schedule = adamw_warmup_decay(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             warmup_steps=cfg.warmup_steps, steps=cfg.steps)

    log = RunLog(out, "bc", enabled=rank == 0)
    state = resume(out, policy, optimizer, schedule, log, verbose=rank == 0)
    step, last = state.get("step", 0), latest_checkpoint(out)
    if rank < len(state.get("rng", [])):
        rng.bit_generator.state = state["rng"][rank]
    if rank == 0:
        save(cfg, out / "config.json", versions={"lapo_fast": __version__, "torch": torch.__version__},
             data=str(data_dir), device=str(device), world_size=world)
    model = distributed.wrap(policy)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or rank > 0, desc="bc", unit="step")
    t0, start = time.perf_counter(), step
    while step < cfg.steps:
        pick = rng.integers(0, len(starts), cfg.batch_size)
        obs = torch.from_numpy(np.asarray(frames[obs_index[pick]])).to(device)
        with distributed.autocast(device):
            pred = model(normalize(obs).contiguous(memory_format=torch.channels_last))
        loss = F.mse_loss(pred.float(), targets[pick].to(device))
        optimizer_step(loss, policy.parameters(), optimizer, schedule, cfg.grad_clip)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.log({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0],
                     "samples_per_s": (step - start) * cfg.batch_size * world / (time.perf_counter() - t0)})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            rngs = distributed.gather_object(rng.bit_generator.state)
            if rank == 0:
                last = save_checkpoint(out, step, policy, optimizer, schedule, {"rng": rngs})
            distributed.barrier()
        if stop_after is not None and step - start >= stop_after:
            break
    bar.close()
    log.close()
    return last if rank == 0 else latest_checkpoint(out)
