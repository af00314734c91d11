"""Atomic, resumable checkpoints: weights in safetensors, optimiser state with torch.save, and a
JSON of the step and RNG states, written to a temporary folder then renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_write, read_json


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    state: dict | None = None, keep: int = 2) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))

    final = atomic_write(directory / f"step-{step:08d}", write)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint_all_ranks(directory: Path, step: int, model, optimizer, scheduler, rng) -> Path | None:
    """Called by every rank together: gathers each rank's numpy `rng` stream, and rank 0 saves
    the checkpoint with them (so every rank resumes its own stream). The path on rank 0, else None."""
    from .distributed import gather_object, rank_and_world

    streams = gather_object(rng.bit_generator.state)
    if rank_and_world()[0] != 0:
        return None
    return save_checkpoint(directory, step, model, optimizer, scheduler, {"rng": streams})


def latest_checkpoint(directory: Path) -> Path | None:
    done = sorted(p for p in Path(directory).glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer=None, scheduler=None) -> dict:
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no model.safetensors (not a lapo_fast checkpoint)")
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}): was it made with another config?")
    if optimizer is not None and (path / "optim.pt").exists():
        blob = torch.load(path / "optim.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob["scheduler"] is not None:
            scheduler.load_state_dict(blob["scheduler"])
    return read_json(path / "state.json")


def resume(directory: Path, model, optimizer, scheduler, log, *, key: str = "step", verbose: bool = True,
           rng=None, rank: int = 0) -> dict:
    """Loads the latest checkpoint of `directory` into model/optimizer/scheduler, drops the log
    lines written after it, restores this rank's numpy `rng` stream when the checkpoint saved one
    (state["rng"][rank]), and returns its state ({} when there is none: a fresh start)."""
    last = latest_checkpoint(directory)
    if last is None:
        return {}
    state = load_checkpoint(last, model, optimizer, scheduler)
    log.truncate(state[key], key=key)
    if rng is not None and rank < len(state.get("rng", [])):
        rng.bit_generator.state = state["rng"][rank]
    if verbose:
        print(f"{Path(directory).name}: resuming from {last} ({key} {state[key]})")
    return state
