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

import time

import numpy as np
from pathlib import Path

import torch

from lapo_fast import __version__
from lapo_fast.config import LAMConfig, save
from lapo_fast.config import load as load_config
from lapo_fast.data import FrameDataset, WindowSampler, normalize
from lapo_fast.models import LatentActionModel
from lapo_fast.models.lam import stack_frames
from lapo_fast.stages import distributed
from lapo_fast.stages.checkpoint import latest_checkpoint, load_checkpoint, resume, save_checkpoint
from lapo_fast.stages.optim import adamw_warmup_decay, optimizer_step
from lapo_fast.stages.runlog import RunLog, write_json


def build_model(cfg: LAMConfig) -> LatentActionModel:
    return LatentActionModel(
        frames=cfg.context + 2, impala_scale=cfg.impala_scale, fdm_width=cfg.fdm_width, fdm_norm=cfg.fdm_norm,
        fdm_action=cfg.fdm_action,
        latent_dim=cfg.num_codebooks * cfg.code_dim * cfg.num_latents, num_codebooks=cfg.num_codebooks,
        codebook_size=cfg.codebook_size, code_dim=cfg.code_dim, num_latents=cfg.num_latents,
        decay=cfg.vq_decay, commitment=cfg.commitment, dead_code_threshold=cfg.dead_code_threshold,
    ).to(memory_format=torch.channels_last)


def train_lam(data_dir, run_dir, cfg: LAMConfig, *, test_data=None, stop_after: int | None = None,
              progress: bool = True) -> Path:
    """Trains (or resumes) stage 1; returns the final checkpoint. `test_data` (a dataset of other
    episodes) gives the held-out FDM loss; `stop_after` ends early after that many steps of this
    call, as an interruption would (for tests). Under torchrun, each rank draws its own batches,
    DDP averages gradients and the VQ op all-reduces its statistics; rank 0 writes."""
    out = Path(run_dir) / "lam"
    rank, world, device = distributed.setup(out, cfg.device)
    torch.manual_seed(cfg.seed)

    # Data: decoded once into a memmap, windows that never cross episodes.
    ds = FrameDataset(data_dir)
    true_action = cfg.fdm_action == "true"
    if rank == 0:
        ds.cache()
    distributed.barrier()  # one rank writes the decode cache, the others then map it
    sampler = WindowSampler(ds.cache(), ds.episodes, context=cfg.context, batch_size=cfg.batch_size,
                            seed=cfg.seed + 1_000 * rank, meta=_actions(ds, true_action))
    test = None
    if test_data is not None and rank == 0:
        tds = FrameDataset(test_data)
        test = WindowSampler(tds.cache(), tds.episodes, context=cfg.context, batch_size=cfg.batch_size, seed=cfg.seed,
                             meta=_actions(tds, true_action))

    # Model and optimiser: AdamW, linear warm-up then linear decay to 0.
    model = build_model(cfg).to(device)
    optimizer, schedule = adamw_warmup_decay(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             warmup_steps=cfg.warmup_steps, steps=cfg.steps)

    # Resume: weights, optimiser, schedule, and every rank's sampler stream.
    log = RunLog(out, "lam", enabled=rank == 0)
    state = resume(out, model, optimizer, schedule, log, verbose=rank == 0)
    step, last = state.get("step", 0), latest_checkpoint(out)
    if rank < len(state.get("rng", [])):
        sampler.rng.bit_generator.state = state["rng"][rank]
    if rank == 0:
        save(cfg, out / "config.json", versions={"lapo_fast": __version__, "torch": torch.__version__},
             data=str(data_dir), test_data=str(test_data) if test_data else None, device=str(device),
             world_size=world)
    ddp = distributed.wrap(model)

    model.train()
    t0, start = time.perf_counter(), step
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or rank > 0, desc="lam", unit="step")
    while step < cfg.steps:
        batch = sampler.sample()
        window = normalize(torch.from_numpy(batch["obs"]).to(device))  # (B, T, C, H, W) in [-0.5, 0.5]
        with distributed.autocast(device):
            loss, recon, idm, _ = ddp(window, _action_t(batch, cfg.context, device))
        optimizer_step(loss, model.parameters(), optimizer, schedule, cfg.grad_clip)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            used = torch.unique(idm.indices[:, 0]).numel()  # distinct codes of codebook 0 in this batch
            metrics = {"step": step, "loss": loss.item(), "fdm_loss": recon.item(), "vq_loss": idm.vq_loss.item(),
                       "perplexity": idm.perplexity.item(), "codebook0_codes_used": used,
                       "lr": schedule.get_last_lr()[0],
                       "steps_per_s": (step - start) / max(time.perf_counter() - t0, 1e-9)}
            if test is not None:
                metrics.update(_test_losses(model, test, device))
            log.log(metrics)
            if step == cfg.steps and test is not None:
                what = "action" if true_action else "latent"
                bar.write(f"lam: held-out FDM loss {metrics['test_fdm_loss']:.5f} with each window's own {what}, "
                          f"{metrics['test_fdm_loss_shuffled_latent']:.5f} with another's")
            bar.set_postfix(loss=f"{metrics['fdm_loss']:.4f}", perp=f"{metrics['perplexity']:.1f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            streams = distributed.gather_object(sampler.rng.bit_generator.state)
            if rank == 0:
                last = save_checkpoint(out, step, model, optimizer, schedule, {"rng": streams})
                if "action" in ds.manifest.meta_keys and not true_action:  # the true-action latent is the action
                    _probe(model, sampler, ds, device, cfg, log, out, step)
            distributed.barrier()
        if stop_after is not None and step - start >= stop_after:
            break
    bar.close()
    log.close()
    return last if rank == 0 else latest_checkpoint(out)


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
    return torch.from_numpy(batch["action"][:, context]).long().to(device)


def _probe(model, sampler, ds, device, cfg: LAMConfig, log: RunLog, out: Path, step: int) -> None:
    """The latent probe at a checkpoint: logged (a curve over training), and saved at the end."""
    result = latent_probe(model.idm, sampler, ds.meta("action"), device, seed=cfg.seed)
    log.log({"step": step, **{f"probe_{k}": v for k, v in result.items()}})
    if step == cfg.steps:
        write_json(out / "probe.json", result)
        print(f"lam: probe accuracy {result['accuracy']:.3f} from {result['labelled']} labelled transitions "
              f"(chance {result['chance']:.3f}, majority class {result['majority']:.3f})")


def latent_probe(idm, sampler: WindowSampler, actions: np.ndarray, device, *, labelled: int = 256,
                 held_out: int = 2_000, seed: int = 0) -> dict:
    """Stage 1's probe: does the latent carry the true action? A decoder from `labelled`
    transitions, scored on `held_out` others (LAPO's offline decoding, on the IDM itself)."""
    from lapo_fast.eval.probe import probe

    rng = np.random.default_rng(seed)
    starts = rng.choice(sampler.starts, min(len(sampler.starts), labelled + held_out), replace=False)
    context = sampler.window - 2
    latents = idm_latents(idm, sampler.frames, starts, context, device=device)
    return probe(latents, np.asarray(actions)[starts + context], labelled=labelled, held_out=held_out, seed=seed)


@torch.no_grad()
def idm_latents(idm, frames: np.ndarray, starts: np.ndarray, context: int, *, batch: int = 512, device="cpu",
                progress: bool = False) -> np.ndarray:
    """The IDM's pre-quantisation latent (float32) of the window beginning at each of `starts`
    (o_{t-k}..o_t, o_{t+1} with t = start + context), in eval mode."""
    from tqdm import tqdm

    offsets = np.arange(context + 2)
    was_training = idm.training
    idm.eval()
    out = np.empty((len(starts), idm.head.out_features), np.float32)
    for i in tqdm(range(0, len(starts), batch), disable=not progress, desc="idm latents", unit="batch"):
        idx = np.asarray(starts[i:i + batch])[:, None] + offsets
        window = normalize(torch.from_numpy(np.asarray(frames[idx])).to(device))
        out[i:i + len(idx)] = idm(window).latent.float().cpu().numpy()
    idm.train(was_training)
    return out


def lam_config(run_dir) -> LAMConfig:
    """The config stage 1 of a run directory was trained with."""
    path = Path(run_dir) / "lam" / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: no stage-1 run here (run `lapo-fast lam` first)")
    return load_config(LAMConfig, path)


def load_lam(run_dir, cfg: LAMConfig | None = None) -> LatentActionModel:
    """The trained stage-1 model of a run directory (its saved config unless one is given)."""
    out = Path(run_dir) / "lam"
    cfg = cfg or lam_config(run_dir)
    last = latest_checkpoint(out)
    if last is None:
        raise FileNotFoundError(f"{out}: no checkpoint yet")
    if cfg.fdm_action != "latent":
        raise ValueError(f"{out}: trained with fdm_action={cfg.fdm_action!r} (the ablation without an IDM); "
                         "stages 2-3 need a stage 1 trained with fdm_action='latent'")
    model = build_model(cfg)
    load_checkpoint(last, model)
    return model.eval()


@torch.no_grad()
def _test_losses(model: LatentActionModel, test: WindowSampler, device, batches: int = 4) -> dict:
    """FDM loss on held-out episodes, in eval mode (codebooks untouched), on the same batches every
    time so the numbers compare across steps; and the same with each window given another
    window's latent action (shuffled in the batch): the gap is what the latent tells the FDM."""
    state = test.rng.bit_generator.state
    model.eval()
    own, shuffled = [], []
    for _ in range(batches):
        batch = test.sample()
        window = normalize(torch.from_numpy(batch["obs"]).to(device))
        _, recon, idm, _ = model(window, _action_t(batch, test.window - 2, device))
        pred = model.fdm(stack_frames(window[:, :-1]), idm.quantized.roll(1, 0))  # window i gets i-1's
        own.append(recon.item())
        shuffled.append(torch.nn.functional.mse_loss(pred, window[:, -1]).item())
    model.train()
    test.rng.bit_generator.state = state
    return {"test_fdm_loss": float(np.mean(own)), "test_fdm_loss_shuffled_latent": float(np.mean(shuffled))}
