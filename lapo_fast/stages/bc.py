"""Stage 2: latent behaviour cloning. The latent policy pi(o_t) regresses the frozen IDM's
pre-quantisation latent action of (o_{t-k}..o_t, o_{t+1}).

    lapo-fast bc --data DATASET --out RUN [--preset ...]      (needs RUN/lam)

The IDM is frozen, so every window's label is computed once, in batches, and cached in
RUN/bc/labels.npz (latent.window_labels; the reference code recomputes it every batch). Writes
RUN/bc/: config.json, labels.npz, metrics.jsonl, TensorBoard events, checkpoints; rerunning resumes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from lapo_fast import __version__
from lapo_fast.config import BCConfig
from lapo_fast.data import RowSampler, prepare_obs
from lapo_fast.data.planner import frames_for, make_loader
from lapo_fast.latent import window_labels
from lapo_fast.models import LatentPolicy
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime import distributed
from lapo_fast.runtime.checkpoint import latest_checkpoint, resume, save_checkpoint_all_ranks
from lapo_fast.runtime.loop import supervised_loop
from lapo_fast.runtime.step import TrainStep, graph_mode


def run(ctx: StageContext, cfg: BCConfig) -> str:
    """The registry's entry (lapo_fast.registry): stage 2 on ctx.data."""
    return f"final checkpoint {train_bc(ctx.data, ctx.run, cfg, progress=ctx.progress)}"


def train_bc(data_dir, run_dir, cfg: BCConfig, *, progress: bool = True) -> Path:
    """Trains (or resumes) stage 2; returns the final checkpoint. Under torchrun each rank draws
    its own batches and DDP averages the gradients; rank 0 writes."""
    run = RunDir(run_dir)
    out = run.stage("bc")
    rank, world, device = distributed.setup(out, cfg.device, cfg.seed)
    mode = graph_mode(cfg.cuda_graphs, device, "bc")  # refused on the CPU before any work
    ds = run.training_data("bc", cfg, data_dir, rank=rank)
    plan, frames = frames_for("bc", ds, cfg.loader, device, world=world, rank=rank)
    # Every rank labels its share of the windows; the shares are gathered (rank 0 saves them).
    starts, latents, context = window_labels(run, ds, frames, batch=cfg.label_batch, device=device,
                                               progress=progress and rank == 0, rank=rank, world=world)
    # A batch: o_t of uniformly drawn windows, and their labels.
    sampler = RowSampler(frames, starts + context, {"target": latents}, batch_size=cfg.batch_size,
                         seed=cfg.seed + 1_000 * rank)

    policy = LatentPolicy(impala_scale=cfg.impala_scale, latent_dim=latents.shape[1]).to(device)
    policy = policy.to(memory_format=torch.channels_last)
    for head in (policy.action_head, policy.value_head):  # stage 3's heads: untouched here (and DDP
        head.requires_grad_(False)                         # needs every trainable parameter used)
    optimizer, schedule = cfg.optimizer(policy.parameters())

    with run.run_log("bc", enabled=rank == 0) as log:  # closed however the stage ends
        state = resume(out, policy, optimizer, schedule, log, verbose=rank == 0, rng=sampler.rng, rank=rank)
        step = state.get("step", 0)
        loader = make_loader(sampler, plan, device)  # its rng: the stream as of the last batch trained on
        if rank == 0:
            run.save_config("bc", cfg, versions={"lapo_fast": __version__, "torch": torch.__version__},
                 data=str(data_dir), device=str(device), world_size=world)
        model = distributed.wrap(policy)
        train_step = make_step(policy, model, optimizer, schedule, cfg, device, mode)

        # A batch: uint8 frames and float32 labels, on the device.
        supervised_loop("stage 2 (bc)", cfg, step=step,
                        train_step=lambda b: train_step({"obs": b["obs"], "target": b["target"]}), loader=loader,
                        names=("loss",), schedule=schedule, log=log,
                        save=lambda at: save_checkpoint_all_ranks(out, at, policy, optimizer, schedule, loader.rng,
                                                                  run.checkpoint_record(cfg)),
                        out=out, batch_size=cfg.batch_size, world=world, rank=rank,
                        progress=progress)
    return latest_checkpoint(out)


def make_step(policy: LatentPolicy, model, optimizer, schedule, cfg: BCConfig, device, mode: str = "eager"
              ) -> TrainStep:
    """Stage 2's training step (MSE to the IDM's latent, AdamW, the schedule), eager or as a CUDA
    graph (runtime.step); `model` is `policy`, or DDP around it. With cfg.compile the policy's
    trunk is compiled in place."""
    if cfg.compile:
        policy.trunk.compile()

    def loss_fn(inputs: dict) -> dict:
        return {"loss": F.mse_loss(model(prepare_obs(inputs["obs"])).float(), inputs["target"])}

    return TrainStep(loss_fn, policy.parameters(), optimizer, schedule, grad_clip=cfg.grad_clip, device=device,
                     precision=cfg.precision, mode=mode, name="bc")
