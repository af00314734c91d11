"""Stage 1: learn latent actions. The IDM labels each window (o_{t-k}..o_t, o_{t+1}) with a
quantised latent action; the FDM must predict o_{t+1} from the past frames and that latent.

    lapo-fast lam --data DATASET --out RUN [--preset smoke|cpu|paper] [--steps N ...]

Writes RUN/lam/: config.json, metrics.jsonl, TensorBoard events, step-XXXXXXXX checkpoints
(the last two kept). Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from lapo_fast import __version__
from lapo_fast.config import LAMConfig, save
from lapo_fast.data import FrameDataset, WindowSampler, normalize
from lapo_fast.models import LatentActionModel
from lapo_fast.stages.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def build_model(cfg: LAMConfig) -> LatentActionModel:
    return LatentActionModel(
        frames=cfg.context + 2, impala_scale=cfg.impala_scale, fdm_width=cfg.fdm_width,
        latent_dim=cfg.num_codebooks * cfg.code_dim * cfg.num_latents, num_codebooks=cfg.num_codebooks,
        codebook_size=cfg.codebook_size, code_dim=cfg.code_dim, num_latents=cfg.num_latents,
        decay=cfg.vq_decay, commitment=cfg.commitment, dead_code_threshold=cfg.dead_code_threshold,
    )


def train_lam(data_dir, run_dir, cfg: LAMConfig, *, stop_after: int | None = None, progress: bool = True) -> Path:
    """Trains (or resumes) stage 1; returns the final checkpoint. `stop_after` ends early after
    that many steps of this call, as an interruption would (for tests)."""
    out = Path(run_dir) / "lam"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)

    # Data: decoded once into a memmap, windows that never cross episodes.
    ds = FrameDataset(data_dir)
    sampler = WindowSampler(ds.cache(), ds.episodes, context=cfg.context, batch_size=cfg.batch_size, seed=cfg.seed)

    # Model and optimiser: AdamW, linear warm-up then linear decay to 0.
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * max(0.0, 1 - s / cfg.steps))

    # Resume: weights, optimiser, schedule, and the sampler's random stream.
    step = 0
    last = latest_checkpoint(out)
    if last is not None:
        state = load_checkpoint(last, model, optimizer, schedule)
        step = state["step"]
        sampler.rng.bit_generator.state = state["sampler_rng"]
        print(f"lam: resuming from {last} (step {step})")
    save(cfg, out / "config.json", versions={"lapo_fast": __version__, "torch": torch.__version__},
         data=str(data_dir), device=str(device))
    writer = _tensorboard(out)

    model.train()
    t0, start = time.perf_counter(), step
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="lam", unit="step")
    while step < cfg.steps:
        batch = torch.from_numpy(sampler.sample()["obs"]).to(device)
        window = normalize(batch)                                  # (B, T, C, H, W) in [-0.5, 0.5]
        loss, recon, idm, _ = model(window)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            used = torch.unique(idm.indices[:, 0]).numel()  # distinct codes of codebook 0 in this batch
            metrics = {"step": step, "loss": loss.item(), "fdm_loss": recon.item(), "vq_loss": idm.vq_loss.item(),
                       "perplexity": idm.perplexity.item(), "codebook0_codes_used": used,
                       "lr": schedule.get_last_lr()[0],
                       "steps_per_s": (step - start) / max(time.perf_counter() - t0, 1e-9)}
            _log(out, writer, metrics)
            bar.set_postfix(loss=f"{metrics['fdm_loss']:.4f}", perp=f"{metrics['perplexity']:.1f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            last = save_checkpoint(out, step, model, optimizer, schedule,
                                   {"sampler_rng": sampler.rng.bit_generator.state})
        if stop_after is not None and step - start >= stop_after:
            break
    bar.close()
    if writer is not None:
        writer.close()
    return last


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
        return None
    return SummaryWriter(str(out / "tb"))


def _log(out: Path, writer, metrics: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                            for k, v in metrics.items()}) + "\n")
    if writer is not None:
        for k, v in metrics.items():
            if k != "step":
                writer.add_scalar(f"lam/{k}", v, metrics["step"])


def load_lam(run_dir, cfg: LAMConfig | None = None) -> LatentActionModel:
    """The trained stage-1 model of a run directory (its saved config unless one is given)."""
    out = Path(run_dir) / "lam"
    if cfg is None:
        if not (out / "config.json").exists():
            raise FileNotFoundError(f"{out}: no stage-1 run here (run `lapo-fast lam` first)")
        cfg = LAMConfig(**json.loads((out / "config.json").read_text())["config"])
    last = latest_checkpoint(out)
    if last is None:
        raise FileNotFoundError(f"{out}: no checkpoint yet")
    model = build_model(cfg)
    load_checkpoint(last, model)
    return model.eval()

