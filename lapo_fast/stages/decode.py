"""Stage 3a: offline decoding. A small MLP maps latent actions to true actions, trained on a few
labelled transitions; composed with the stage-2 latent policy it acts in the true action space.

    lapo-fast decode --data DATASET --out RUN [--env GAME] [--labelled 16,64,256,1024,4096]

The labelled sets are nested random subsets of the dataset's transitions (the IDM's cached
pre-quantisation latent, the true action taken); a fixed set of other transitions scores each
decoder's accuracy, and decoder(policy(o)) is evaluated online. Writes RUN/decode/: decoder-N
weights, results.json (one entry per size; a rerun skips the sizes already done).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from lapo_fast.config import DecodeConfig, labelled_sizes, save
from lapo_fast.data import FrameDataset, normalize
from lapo_fast.eval import evaluate
from lapo_fast.eval.probe import accuracy, fit_decoder
from lapo_fast.models import ActionDecoder, LatentPolicy
from lapo_fast.stages.bc import cached_labels
from lapo_fast.stages.ppo import load_policy
from lapo_fast.stages.runlog import write_json


def decoded_actor(policy: LatentPolicy, decoder: ActionDecoder, *, device="cpu", seed: int = 0, greedy: bool = False):
    """obs (N, 64, 64, 3) uint8 -> true actions (N,): decoder(policy's latent action)."""
    device = torch.device(device)
    policy = policy.to(device).to(memory_format=torch.channels_last).eval()
    decoder = decoder.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        x = normalize(torch.from_numpy(obs).to(device)).contiguous(memory_format=torch.channels_last)
        logits = decoder(policy(x)).float()
        a = logits.argmax(-1) if greedy else torch.multinomial(F.softmax(logits, -1), 1, generator=gen)[:, 0]
        return a.to(torch.int32).cpu().numpy()

    return act


def dataset_env(ds: FrameDataset, env_name: str | None) -> tuple[str, str]:
    """(game, distribution mode) to act in: given, or the ones the dataset was collected in."""
    source = ds.manifest.source
    game = env_name or source.get("env")
    if not game:
        raise ValueError(f"{ds.dir} does not say which game it holds: pass --env")
    return game, source.get("distribution_mode", "easy")


def train_decoders(data_dir, run_dir, cfg: DecodeConfig, *, env_name: str | None = None, online: bool = True,
                   progress: bool = True) -> dict:
    out = Path(run_dir) / "decode"
    out.mkdir(parents=True, exist_ok=True)
    ds = FrameDataset(data_dir)
    if "action" not in ds.manifest.meta_keys:
        raise ValueError(f"{data_dir} has no true actions: offline decoding needs a labelled dataset")
    game, mode = dataset_env(ds, env_name)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    starts, latents, context = cached_labels(run_dir, ds, device=device, progress=progress)
    actions = np.asarray(ds.meta("action"))[starts + context]
    sizes = labelled_sizes(cfg)
    if len(starts) < cfg.held_out + max(sizes):
        raise ValueError(f"{data_dir}: {len(starts)} transitions, fewer than held_out ({cfg.held_out}) + the "
                         f"largest labelled set ({max(sizes)})")
    order = np.random.default_rng(cfg.seed).permutation(len(starts))
    held, pool = order[:cfg.held_out], order[cfg.held_out:]
    policy = load_policy(run_dir, "bc") if online else None

    save(cfg, out / "config.json", env=game, distribution_mode=mode)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    counts = np.bincount(actions[held], minlength=15)
    for n in sizes:
        if str(n) in results:
            continue
        decoder = fit_decoder(latents[pool[:n]], actions[pool[:n]], steps=cfg.steps, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, seed=cfg.seed)
        _atomic(out / f"decoder-{n}.safetensors", lambda p: save_file(decoder.state_dict(), str(p)))
        entry = {"labelled": n, "accuracy": accuracy(decoder, latents[held], actions[held]),
                 "chance": 1 / 15, "majority": float(counts.max() / counts.sum())}
        if online:
            act = decoded_actor(policy, decoder, device=device, seed=cfg.seed)
            ev = evaluate(act, game, episodes=cfg.eval_episodes, num_envs=min(64, cfg.eval_episodes),
                          seed=cfg.seed + 7, distribution_mode=mode)
            entry.update(mean_return=ev["mean_return"], stderr=ev["stderr"], normalized=ev["normalized"])
        results[str(n)] = entry
        write_json(results_path, results)
        if progress:
            msg = f"decode: {n} labelled -> accuracy {entry['accuracy']:.3f}"
            print(msg + (f", return {entry['mean_return']:.2f}" if online else ""))
    return results


def load_decoder(run_dir, labelled: int) -> ActionDecoder:
    path = Path(run_dir) / "decode" / f"decoder-{labelled}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no decoder trained on {labelled} labelled transitions (run `lapo-fast decode`)")
    weights = load_file(str(path))
    decoder = ActionDecoder(weights["net.0.weight"].shape[1], weights[f"net.{len(weights) - 2}.weight"].shape[0])
    decoder.load_state_dict(weights)
    return decoder.eval()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)

