"""Atomic, resumable checkpoints: weights in safetensors, optimiser state with torch.save, and a
JSON of the step and RNG states, written to a temporary folder then renamed."""

from __future__ import annotations

import contextlib
import errno
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
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with _write_errors(tmp, sum(v.nbytes for v in weights.values())):
            save_file(weights, str(tmp / "model.safetensors"))
            if optimizer is not None:
                torch.save({"optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))

    final = atomic_write(directory / f"step-{step:08d}", write)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        # Renamed first, so a kill mid-delete leaves a hidden leftover, never a half step-* folder.
        trash = old.with_name(f".trash-{old.name}")
        shutil.rmtree(trash, ignore_errors=True)
        old.rename(trash)
    for trash in directory.glob(".trash-step-*"):
        shutil.rmtree(trash, ignore_errors=True)
    return final


@contextlib.contextmanager
def _write_errors(folder: Path, nbytes: int):
    """safetensors and torch.save report a full disk in their own words (SafetensorError "os error
    28", RuntimeError "unexpected pos"): raised here as the OSError every other write gives, so the
    CLI's one-line disk-full message applies."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        full = ("os error 28" in str(e) or "No space left" in str(e)
                or shutil.disk_usage(folder).free < 3 * nbytes + (1 << 20))
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else
                      f"could not write a checkpoint ({type(e).__name__}: {e})", str(folder)) from e


def save_checkpoint_all_ranks(directory: Path, step: int, model, optimizer, scheduler, rng,
                              state: dict | None = None) -> Path | None:
    """Called by every rank together: gathers each rank's numpy `rng` stream, and rank 0 saves
    the checkpoint with them (so every rank resumes its own stream) and `state`. The path on rank 0,
    else None."""
    from .distributed import gather_object, rank_and_world

    streams = gather_object(rng.bit_generator.state)
    if rank_and_world()[0] != 0:
        return None
    return save_checkpoint(directory, step, model, optimizer, scheduler, {**(state or {}), "rng": streams})


def checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints of `directory`, oldest first."""
    return sorted(p for p in Path(directory).glob("step-*") if (p / "state.json").exists())


def latest_checkpoint(directory: Path) -> Path | None:
    done = checkpoints(directory)
    return done[-1] if done else None


class CheckpointDamaged(Exception):
    """A checkpoint's files cannot be read (truncated, corrupt)."""


def _read(path: Path, with_optimizer: bool) -> tuple[dict, dict | None, dict]:
    """(weights, optimiser blob or None, state) of a checkpoint, or CheckpointDamaged."""
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no model.safetensors (not a lapo_fast checkpoint)")
    try:
        weights = load_file(str(path / "model.safetensors"))
        blob = (torch.load(path / "optim.pt", weights_only=False, map_location="cpu")
                if with_optimizer and (path / "optim.pt").exists() else None)
        state = read_json(path / "state.json")
    except Exception as e:  # safetensors, torch.load and json each raise their own types on damage
        raise CheckpointDamaged(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return weights, blob, state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer=None, scheduler=None) -> dict:
    """Loads one checkpoint into model (and optimizer/scheduler); returns its state."""
    path = Path(path)
    try:
        weights, blob, state = _read(path, optimizer is not None)
    except CheckpointDamaged as e:
        raise ValueError(f"{path}: damaged checkpoint ({e})") from None
    _apply(path, weights, blob, model, optimizer, scheduler)
    return state


def _apply(path: Path, weights, blob, model, optimizer, scheduler) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}): was it made with another config?")
    if blob is not None:
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob["scheduler"] is not None:
            scheduler.load_state_dict(blob["scheduler"])


def load_latest(directory: Path, model, optimizer=None, scheduler=None) -> tuple[Path | None, dict]:
    """Loads the newest readable checkpoint of `directory` (an older one, with a warning, when the
    newest is damaged); (None, {}) when there is none."""
    found = checkpoints(directory)
    for path in reversed(found):
        try:
            weights, blob, state = _read(path, optimizer is not None)
        except CheckpointDamaged as e:
            print(f"checkpoint: {path} is unreadable ({e}); falling back to an older one")
            continue
        _apply(path, weights, blob, model, optimizer, scheduler)
        return path, state
    if found:
        raise ValueError(f"{directory}: every checkpoint is damaged ({', '.join(p.name for p in found)}); "
                         "delete the folder to start this stage again")
    return None, {}


def resume(directory: Path, model, optimizer, scheduler, log, *, key: str = "step", verbose: bool = True,
           rng=None, rank: int = 0) -> dict:
    """Loads the latest readable checkpoint of `directory` into model/optimizer/scheduler, drops
    the log lines written after it, restores this rank's numpy `rng` stream when the checkpoint
    saved one (state["rng"][rank]), and returns its state ({} when there is none: a fresh start)."""
    last, state = load_latest(directory, model, optimizer, scheduler)
    if last is None:
        log.truncate(0, key=key)  # a start from scratch: lines an earlier attempt logged would repeat
        return {}
    log.truncate(state[key], key=key)
    if rng is not None and rank < len(state.get("rng", [])):
        rng.bit_generator.state = state["rng"][rank]
    if verbose:
        print(f"{Path(directory).name}: resuming from {last} ({key} {state[key]})")
    return state
