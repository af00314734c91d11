"""Stage 1: learn latent actions. The IDM labels each window (o_{t-k}..o_t, o_{t+1}) with a
quantised latent action; the FDM must predict o_{t+1} from the past frames and that latent.

    lapo-fast lam --data DATASET --out RUN [--preset smoke|cpu|paper] [--steps N ...]

With --fdm-action true (an ablation; the dataset must hold actions), the FDM gets the true action
instead of a latent one: its held-out loss with own against shuffled actions shows how much the
action is worth to the world model at this data size and scale, and so how hard the IDM is
pushed to encode it.

Writes RUN/lam/: config.json, metrics.jsonl, TensorBoard events, step-XXXXXXXX checkpoints
(the last two kept). Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lapo_fast import __version__
from lapo_fast.config import LAMConfig
from lapo_fast.data import FrameDataset, WindowSampler, frames_at, normalize
from lapo_fast.data.planner import frames_for, make_loader
from lapo_fast.latent import latent_probe
from lapo_fast.envs.games import OBS_SHAPE
from lapo_fast.models import LatentActionModel, build_lam, stack_frames
from lapo_fast.ops import NonFiniteError
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime import distributed
from lapo_fast.runtime.checkpoint import latest_checkpoint, resume, save_checkpoint_all_ranks
from lapo_fast.runtime.files import write_json
from lapo_fast.runtime.loop import supervised_loop
from lapo_fast.runtime.optim import divergence_error
from lapo_fast.runtime.runlog import RunLog
from lapo_fast.runtime.step import TrainStep, graph_mode


def run(ctx: StageContext, cfg: LAMConfig) -> str:
    """The registry's entry (lapo_fast.registry): stage 1 on ctx.data."""
    return f"final checkpoint {train_lam(ctx.data, ctx.run, cfg, test_data=ctx.test_data, progress=ctx.progress)}"


def train_lam(data_dir, run_dir, cfg: LAMConfig, *, test_data=None, progress: bool = True) -> Path:
    """Trains (or resumes) stage 1; returns the final checkpoint. `test_data` (a dataset of other
    episodes) gives the held-out FDM loss. Under torchrun, each rank draws its own batches,
    DDP averages gradients and the VQ op all-reduces its statistics; rank 0 writes."""
    run = RunDir(run_dir)
    out = run.stage("lam")
    rank, world, device = distributed.setup(out, cfg.device, cfg.seed)
    mode = graph_mode(cfg.cuda_graphs, device, "lam")  # refused on the CPU before any work

    # Data: frames as the planner reads them (resident, decoded cache or compressed), windows
    # drawn uniformly from those that never cross an episode.
    ds = run.training_data("lam", cfg, data_dir, rank=rank)
    plan, frames = frames_for("lam", ds, cfg.loader, device, world=world, rank=rank)
    true_action = cfg.fdm_action == "true"
    sampler = WindowSampler(frames, ds.episodes, context=cfg.context, batch_size=cfg.batch_size,
                            seed=cfg.seed + 1_000 * rank, meta=_actions(ds, true_action))
    test = _held_out(test_data, cfg, device, true_action) if test_data is not None and rank == 0 else None

    # Model and optimiser: AdamW, the reference's warm-up from warmup_from x lr, then linear to final_lr x lr.
    model = build_lam(cfg).to(device)
    optimizer, schedule = cfg.optimizer(model.parameters())

    # Resume: weights, optimiser, schedule, and every rank's sampler stream.
    with run.run_log("lam", enabled=rank == 0) as log:  # closed however the stage ends
        state = resume(out, model, optimizer, schedule, log, verbose=rank == 0, rng=sampler.rng, rank=rank)
        step = state.get("step", 0)
        loader = make_loader(sampler, plan, device)  # its rng: the stream as of the last batch trained on
        if rank == 0:
            run.save_config("lam", cfg, versions={"lapo_fast": __version__, "torch": torch.__version__},
                 data=str(data_dir), test_data=str(test_data) if test_data else None, device=str(device),
                 world_size=world)
        ddp = distributed.wrap(model)
        train_step = make_step(model, ddp, optimizer, schedule, cfg, device, mode)

        model.train()
        no_probe = _no_probe(ds, sampler, true_action)  # why the latent probe cannot run, or None

        def step_fn(batch: dict) -> dict:
            try:
                return train_step(step_inputs(batch, cfg.context, device))
            except NonFiniteError:  # the IDM's latents went NaN/inf: the model diverged
                raise divergence_error("stage 1 (lam)", step + train_step.steps, cfg, out) from None

        def extra(at: int, res: dict) -> dict:
            # Distinct codes of codebook 0 in this batch.
            metrics = {"codebook0_codes_used": torch.unique(res["indices"][:, 0]).numel()}
            if test is not None:
                metrics.update(_test_losses(model, test, device))
                if at == cfg.steps:
                    from tqdm import tqdm

                    what = "action" if true_action else "latent"
                    tqdm.write(f"lam: held-out FDM loss {metrics['test_fdm_loss']:.5f} with each window's own {what}, "
                               f"{metrics['test_fdm_loss_shuffled']:.5f} with another's")
            return metrics

        def checkpointed(at: int, saved) -> None:
            if saved is not None and no_probe is None and at < cfg.steps:  # rank 0; the last one below
                _probe(model, sampler, ds, device, cfg, log, run, at)

        step = supervised_loop(
            "stage 1 (lam)", cfg, step=step, train_step=step_fn, loader=loader,
            names=("loss", "fdm_loss", "vq_loss", "perplexity"), schedule=schedule, log=log,
            save=lambda at: save_checkpoint_all_ranks(out, at, model, optimizer, schedule, loader.rng,
                                                      run.checkpoint_record(cfg)), out=out,
            batch_size=cfg.batch_size, world=world, rank=rank, progress=progress,
            log_first=True, extra=extra, checkpointed=checkpointed)  # step 1 logged: the codes in use at the start
        # The stage is done only with its final probe written: a run killed during it (or a rerun of a
        # finished run that lacks it) makes it now, from the final weights.
        if step == cfg.steps and rank == 0 and not run.probe.exists():
            if no_probe is None:
                _probe(model, sampler, ds, device, cfg, log, run, step)
            else:
                write_json(run.probe, {"skipped": no_probe})
                print(f"lam: no latent probe: {no_probe}")
        distributed.barrier()
    return latest_checkpoint(out)


def _held_out(test_data, cfg: LAMConfig, device, true_action: bool) -> WindowSampler:
    """Windows of the held-out episodes, for the held-out FDM losses."""
    tds = FrameDataset(test_data, frame_shape=OBS_SHAPE)
    _, test_frames = frames_for("lam (held-out data)", tds, cfg.loader, device)
    return WindowSampler(test_frames, tds.episodes, context=cfg.context, batch_size=cfg.batch_size, seed=cfg.seed,
                         meta=_actions(tds, true_action))


def make_step(model: LatentActionModel, ddp, optimizer, schedule, cfg: LAMConfig, device, mode: str = "eager"
              ) -> TrainStep:
    """Stage 1's training step (the FDM's loss plus the VQ's commitment loss, AdamW, the schedule),
    eager or as a CUDA graph (runtime.step); `ddp` is `model`, or DDP around it. With cfg.compile
    the whole model -- IDM, VQ op (a custom op to the compiler) and FDM -- is compiled in place (the
    state dict's names stay)."""
    if cfg.compile:
        model.compile()

    def loss_fn(inputs: dict) -> dict:
        window = normalize(inputs["obs"])  # (B, T, C, H, W) in [-0.5, 0.5]
        loss, recon, idm, _ = ddp(window, inputs.get("action"))
        return {"loss": loss, "fdm_loss": recon, "vq_loss": idm.vq_loss, "perplexity": idm.perplexity,
                "indices": idm.indices}

    return TrainStep(loss_fn, model.parameters(), optimizer, schedule, grad_clip=cfg.grad_clip, device=device,
                     precision=cfg.precision, mode=mode, name="lam")


def step_inputs(batch: dict, context: int, device) -> dict:
    """A loader batch as the step's inputs: the uint8 windows, and a_t when the batch carries actions."""
    action = _action_t(batch, context, device)
    return {"obs": batch["obs"]} if action is None else {"obs": batch["obs"], "action": action}


def _no_probe(ds: FrameDataset, sampler: WindowSampler, true_action: bool) -> str | None:
    """Why stage 1's latent probe cannot run on this dataset, or None."""
    if true_action:
        return "the FDM was given the true action (the fdm_action='true' ablation has no latent to probe)"
    if "action" not in ds.manifest.meta_keys:
        return f"{ds.dir} holds no true actions"
    if len(sampler.starts) < 2:
        return f"{ds.dir} has {len(sampler.starts)} window(s); the probe needs 2 or more"
    return None


def _actions(ds: FrameDataset, needed: bool) -> dict:
    """The sampler's metadata: the true actions, when the FDM is to be given them."""
    if not needed:
        return {}
    if "action" not in ds.manifest.meta_keys:
        raise ValueError(f"{ds.dir} holds no actions: fdm_action='true' needs a dataset with them")
    return {"action": np.asarray(ds.meta("action"))}


def _action_t(batch: dict, context: int, device) -> torch.Tensor | None:
    """a_t of each window (o_{t-k}..o_t, o_{t+1}), or None when the batch carries no actions."""
    if "action" not in batch:
        return None
    return torch.as_tensor(batch["action"][:, context]).long().to(device)


def _probe(model, sampler, ds, device, cfg: LAMConfig, log: RunLog, run: RunDir, step: int) -> None:
    """The latent probe at a checkpoint: logged (a curve over training), and saved at the end."""
    result = latent_probe(model.idm, sampler, ds.meta("action"), device, labelled=cfg.probe_labels,
                          held_out=cfg.probe_held_out, seed=cfg.seed)
    log.log({"step": step, **{f"probe_{k}": v for k, v in result.items()}})
    if step == cfg.steps:
        write_json(run.probe, result)
        print(f"lam: probe accuracy {result['accuracy']:.3f} (MLP), {result['linear_accuracy']:.3f} (linear) from "
              f"{result['labelled']} labelled transitions, {result['held_out']} held out (chance "
              f"{result['chance']:.3f}, majority class {result['majority']:.3f})")


@torch.no_grad()
def _test_losses(model: LatentActionModel, test: WindowSampler, device, batches: int = 4) -> dict:
    """FDM loss on held-out episodes, in eval mode (codebooks untouched), on the same batches every
    time so the numbers compare across steps; and the same with each window given another
    window's action, latent or true (shuffled in the batch): the gap is what it tells the FDM."""
    state = test.rng.bit_generator.state
    model.eval()
    own, shuffled = [], []
    for _ in range(batches):
        idx, batch = test.draw()
        window = normalize(frames_at(test.frames, idx, device))
        _, recon, idm, _ = model(window, _action_t(batch, test.window - 2, device))
        pred = model.fdm(stack_frames(window[:, :-1]), idm.quantized.roll(1, 0))  # window i gets i-1's
        own.append(recon.item())
        shuffled.append(torch.nn.functional.mse_loss(pred, window[:, -1]).item())
    model.train()
    test.rng.bit_generator.state = state
    return {"test_fdm_loss": float(np.mean(own)), "test_fdm_loss_shuffled": float(np.mean(shuffled))}
