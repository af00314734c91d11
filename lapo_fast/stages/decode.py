"""Stage 3a: offline decoding. A small MLP maps latent actions to true actions, trained on a few
labelled transitions; composed with the stage-2 latent policy it acts in the true action space.

    lapo-fast decode --data DATASET --out RUN [--env GAME] [--labelled 16 64 256 1024 4096] [--no-online]

The labelled sets are nested random subsets of the dataset's transitions (the IDM's cached
pre-quantisation latent, the true action taken); a fixed set of other transitions scores each
decoder's accuracy, and decoder(policy(o)) is evaluated online. Writes RUN/decode/: decoder-N
weights, results.json (one entry per size; a rerun skips the sizes already done).
"""

from __future__ import annotations

import numpy as np

from lapo_fast.config import DecodeConfig, labelled_sizes
from lapo_fast.data import FrameDataset
from lapo_fast.data.planner import frames_for
from lapo_fast.envs.games import DEFAULT_DISTRIBUTION_MODE, NUM_ACTIONS, OBS_SHAPE
from lapo_fast.eval import evaluate
from lapo_fast.latent import accuracy, fit_decoder, save_decoder, window_labels
from lapo_fast.runtime.acting import decoded_actor
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime import distributed
from lapo_fast.runtime.files import read_json, write_json


def dataset_env(ds: FrameDataset, env_name: str | None) -> tuple[str, str]:
    """(game, distribution mode) to act in: given, or the ones the dataset was collected in."""
    source = ds.manifest.source
    game = env_name or source.get("env")
    if not game:
        raise ValueError(f"{ds.dir} does not say which game it holds: pass --env")
    return game, source.get("distribution_mode", DEFAULT_DISTRIBUTION_MODE)


def run(ctx: StageContext, cfg: DecodeConfig) -> str:
    """The registry's entry (lapo_fast.registry): decoders from ctx.data's labels, acting in ctx.env."""
    train_decoders(ctx.data, ctx.run, cfg, env_name=ctx.env, progress=ctx.progress)
    return f"results in {ctx.run.results('decode')}"


def train_decoders(data_dir, run_dir, cfg: DecodeConfig, *, env_name: str | None = None,
                   progress: bool = True) -> dict:
    run = RunDir(run_dir)
    ds = FrameDataset(data_dir, frame_shape=OBS_SHAPE)
    if "action" not in ds.manifest.meta_keys:
        raise ValueError(f"{data_dir} has no true actions: offline decoding needs a labelled dataset")
    game, mode = dataset_env(ds, env_name)
    run.claim("decode", cfg, game=game)
    device = distributed.device(cfg.device)
    # Frames are read only to label the windows, once (stage 2 has usually done it already).
    frames = None if run.labels.exists() else frames_for("decode", ds, cfg.loader, device)[1]
    starts, latents, context = window_labels(run, ds, frames, device=device, progress=progress, caller="decode")
    actions = np.asarray(ds.meta("action"))[starts + context]
    sizes = labelled_sizes(cfg)
    if len(starts) < cfg.held_out + max(sizes):
        raise ValueError(f"{data_dir}: {len(starts)} transitions, fewer than held_out ({cfg.held_out}) + the "
                         f"largest labelled set ({max(sizes)})")
    order = np.random.default_rng(cfg.seed).permutation(len(starts))
    held, pool = order[:cfg.held_out], order[cfg.held_out:]
    policy = run.load_policy("bc") if cfg.online else None

    run.save_config("decode", cfg, env=game, distribution_mode=mode)
    results_path = run.results("decode")
    results = read_json(results_path, {})
    counts = np.bincount(actions[held], minlength=NUM_ACTIONS)
    for n in sizes:
        if str(n) in results:
            continue
        decoder = fit_decoder(latents[pool[:n]], actions[pool[:n]], steps=cfg.steps, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, seed=cfg.seed)
        save_decoder(run.decoder(n), decoder)
        entry = {"labelled": n, "accuracy": accuracy(decoder, latents[held], actions[held]),
                 "chance": 1 / NUM_ACTIONS, "majority": float(counts.max() / counts.sum())}
        if cfg.online:
            act = decoded_actor(policy, decoder, device=device, seed=cfg.seed)
            ev = evaluate(act, game, episodes=cfg.eval_episodes, num_envs=min(64, cfg.eval_episodes),
                          seed=cfg.seed + 7, distribution_mode=mode)
            entry.update(mean_return=ev["mean_return"], stderr=ev["stderr"], normalized=ev["normalized"])
        results[str(n)] = entry
        write_json(results_path, results)
        if progress:
            msg = f"decode: {n} labelled -> accuracy {entry['accuracy']:.3f}"
            print(msg + (f", return {entry['mean_return']:.2f}" if cfg.online else ""))
    return results

