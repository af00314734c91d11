"""Decoders from latent to true actions (stage 3a's, stage 3b's online one, and the probes of how
much of the true action a latent carries): LAPO's small MLP trained on a few labelled transitions,
scored on held-out ones; saved with their shape in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lapo_fast.envs.games import NUM_ACTIONS
from lapo_fast.models import ActionDecoder


def fit_decoder(latents: np.ndarray, actions: np.ndarray, *, steps: int = 1_000, lr: float = 1e-3,
                weight_decay: float = 1e-4, num_actions: int = NUM_ACTIONS, seed: int = 0,
                hidden=(128, 128)) -> ActionDecoder:
    """An ActionDecoder (an MLP; hidden=() makes it linear) trained full-batch with Adam on
    (latent, true action) pairs."""
    if len(latents) != len(actions) or len(latents) == 0:
        raise ValueError(f"need as many actions as latents (got {len(latents)} and {len(actions)}), at least one")
    with torch.random.fork_rng():  # seeded here without disturbing the caller's random stream
        torch.manual_seed(seed)
        decoder = ActionDecoder(latents.shape[1], num_actions, hidden)
    x = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(actions), dtype=torch.long)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(decoder(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return decoder.eval()


@torch.no_grad()
def accuracy(decoder: ActionDecoder, latents: np.ndarray, actions: np.ndarray) -> float:
    pred = decoder(torch.as_tensor(np.asarray(latents), dtype=torch.float32)).argmax(-1).numpy()
    return float((pred == np.asarray(actions)).mean())


def probe(latents: np.ndarray, actions: np.ndarray, *, labelled: int = 4_096, held_out: int = 2_000,
          steps: int = 1_000, seed: int = 0, num_actions: int = NUM_ACTIONS) -> dict:
    """How much of the true action a latent carries: a linear and an MLP decoder fitted on
    `labelled` random transitions and scored on `held_out` others (disjoint), beside chance
    (1 / actions) and the majority class of the held-out set (what a constant guess scores)."""
    n = len(latents)
    if n < 2:
        raise ValueError(f"a probe needs at least 2 labelled transitions, got {n}")
    held_out = min(held_out, n // 2)
    labelled = min(labelled, n - held_out)
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:held_out], order[held_out:held_out + labelled]
    counts = np.bincount(np.asarray(actions)[test], minlength=num_actions)
    scores = {kind: accuracy(fit_decoder(latents[train], actions[train], steps=steps, seed=seed,
                                         num_actions=num_actions, hidden=hidden), latents[test], actions[test])
              for kind, hidden in (("linear", ()), ("mlp", (128, 128)))}
    return {"labelled": int(labelled), "held_out": int(held_out), "accuracy": scores["mlp"],
            "linear_accuracy": scores["linear"], "chance": 1.0 / num_actions,
            "majority": float(counts.max() / counts.sum())}


def decoder_step(decoder: ActionDecoder, optimizer, latents: torch.Tensor, actions: torch.Tensor, *,
                 label_smoothing: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """One supervised step of stage 3b's online decoder (cross-entropy with label smoothing, as
    LAPO's); returns (logits before the step, loss)."""
    outputs = decoder(latents)
    loss = F.cross_entropy(outputs, actions, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return outputs, loss


def save_decoder(path: Path, decoder: ActionDecoder) -> None:
    """The weights (safetensors, written atomically) with the shape that rebuilds them."""
    from safetensors.torch import save_file

    from lapo_fast.runtime.files import atomic_write

    shape = {"latent_dim": decoder.latent_dim, "num_actions": decoder.num_actions, "hidden": list(decoder.hidden)}
    metadata = {"shape": json.dumps(shape)}
    atomic_write(Path(path), lambda tmp: save_file(decoder.state_dict(), str(tmp), metadata=metadata))


def load_decoder(path: Path) -> ActionDecoder:
    """A decoder saved by save_decoder, in eval mode (files from before the shape was stored: the
    shape read off the weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such decoder (run `lapo-fast decode`)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    weights = load_file(str(path))
    if "shape" in meta:
        shape = json.loads(meta["shape"])
    else:  # the layers' weights: (hidden_1, latent), ..., (actions, hidden_last)
        layers = [weights[k] for k in sorted((k for k in weights if k.endswith(".weight")),
                                             key=lambda k: int(k.split(".")[1]))]
        shape = {"latent_dim": layers[0].shape[1], "num_actions": layers[-1].shape[0],
                 "hidden": [w.shape[0] for w in layers[:-1]]}
    decoder = ActionDecoder(shape["latent_dim"], shape["num_actions"], tuple(shape["hidden"]))
    decoder.load_state_dict(weights)
    return decoder.eval()
