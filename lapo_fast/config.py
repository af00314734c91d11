"""Typed configuration: dataclasses with presets, resolved in one place, turned into CLI flags.

    cfg = resolve(LAMConfig, preset="smoke", overrides={"steps": 10})
    parser flags: --steps 10 --lr 3e-4 ... (generated from the dataclass fields)

Presets: "paper" (the paper's sizes; a GPU job), "cpu" (shows the method on 2 cores in about an
hour or two), "smoke" (minutes; for tests). Default: "paper" on CUDA, else "cpu" — and the caller
says which it chose and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

PRESETS = ("paper", "cpu", "smoke")


@dataclass
class LAMConfig:
    """Stage 1: latent IDM + FDM with the VQ bottleneck."""

    steps: int = 60_000
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 1_000
    weight_decay: float = 1e-2
    grad_clip: float = 2.0
    impala_scale: int = 4
    fdm_width: int = 24
    context: int = 1               # frames before o_t; windows are context + 2 frames
    num_codebooks: int = 2
    codebook_size: int = 64
    code_dim: int = 16
    num_latents: int = 4
    vq_decay: float = 0.999
    commitment: float = 0.05
    dead_code_threshold: float = 0.0  # > 0: refill codes whose EMA count falls below it (0: LAPO)
    log_every: int = 100
    checkpoint_every: int = 2_000
    seed: int = 0
    device: str = ""               # "" = cuda if available else cpu
    extra: dict = field(default_factory=dict)


_PRESETS: dict[type, dict[str, dict]] = {
    LAMConfig: {
        "paper": {},
        "cpu": {"steps": 4_000, "batch_size": 32, "impala_scale": 1, "fdm_width": 12, "warmup_steps": 200,
                "log_every": 50, "checkpoint_every": 500},
        "smoke": {"steps": 20, "batch_size": 8, "impala_scale": 1, "fdm_width": 8, "warmup_steps": 2,
                  "log_every": 5, "checkpoint_every": 10},
    },
}


def default_preset() -> tuple[str, str]:
    """(preset, why)."""
    import torch

    if torch.cuda.is_available():
        return "paper", f"CUDA is available ({torch.cuda.get_device_name(0)})"
    return "cpu", f"no CUDA device; {os.cpu_count()} CPU cores"


def resolve(cls, preset: str | None = None, overrides: dict | None = None):
    """The one place configs are built: defaults < preset < explicit overrides, with checks."""
    preset = preset or default_preset()[0]
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    values = dict(_PRESETS.get(cls, {}).get(preset, {}))
    names = {f.name for f in fields(cls)}
    for k, v in (overrides or {}).items():
        if k not in names:
            raise ValueError(f"{cls.__name__} has no setting {k!r}")
        if v is not None:
            values[k] = v
    cfg = cls(**values)
    _check(cfg)
    return cfg


def _check(cfg) -> None:
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.type in ("int", "float") and isinstance(v, (int, float)) and v < 0:
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be >= 0, got {v}")
    if isinstance(cfg, LAMConfig):
        if cfg.steps < 1 or cfg.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 <= cfg.vq_decay < 1:
            raise ValueError(f"vq_decay must be in [0, 1), got {cfg.vq_decay}")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per scalar field of `cls` (default None: the preset decides)."""
    for f in fields(cls):
        if f.type not in ("int", "float", "str", "bool"):
            continue
        kind = {"int": int, "float": float, "str": str}.get(f.type)
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"(default {f.default!r} or the preset's)")


def overrides_from(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def save(cfg, path: Path, **extra) -> None:
    payload = {"config": dataclasses.asdict(cfg), "type": type(cfg).__name__, **extra}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)
