"""Typed configuration: one dataclass per stage, each field with its one-line help text, checked
when built; presets are instances of them. The command line is generated from these classes by
tyro (lapo_fast.cli); the stages that use them are listed in lapo_fast.registry.

    cfg = resolve(LAMConfig, preset="smoke", overrides={"steps": 10})   # in Python
    lapo-fast lam --preset smoke --steps 10 ...                        # the same from the shell

Presets: "paper" (the paper's sizes; a GPU job), "cpu" (shows the method on 2 cores in about 40
minutes), "smoke" (minutes; for tests). Default: $LAPO_FAST_PRESET if set, else "paper" on CUDA,
else "cpu" — and the caller says which it chose and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from lapo_fast.choices import DistributionMode, FdmAction, FdmArch, FdmNorm, Loader, Precision
from lapo_fast.envs.games import DEFAULT_DISTRIBUTION_MODE
from lapo_fast.runtime.files import read_json, write_json

PRESETS = ("paper", "cpu", "smoke")


# Every training stage has this setting (runtime.distributed.autocast).
PRECISION_HELP = ("fp32 (the reference code's numerics: PyTorch's defaults), tf32 (TF32 matmuls too, CUDA) or bf16 "
                  "(autocast: faster on GPUs, drifts from fp32; docs/experiments.md)")

# Every supervised stage and fine-tuning have this setting (runtime.step).
CUDA_GRAPHS_HELP = ("capture the training step (forward, backward, clip, optimiser) once as a CUDA graph and replay "
                    "it: the host's launches stop bounding small batches (CUDA only; falls back to eager with a line "
                    "if capture fails; check it with `lapo-fast selftest --device cuda`)")
COMPILE_HELP = "torch.compile the convolutional networks (minutes of compilation at the start; CUDA or CPU)"

# The fewest points UMAP projects (its spectral start fails on a handful).
UMAP_FEWEST = 16

# Every stage that reads frames has this setting (data.planner decides what auto means).
LOADER_HELP = ("how frames are read: auto, resident (decoded in GPU memory/RAM), cache (a decoded file on disk) "
               "or compressed (no decoded copy)")


def setting(default, help: str, low: float | None = None, resumable: bool = False, shape: bool = False):
    """A config field with its one-line help text (printed by `lapo-fast <stage> --help`); `low` is
    the smallest value it takes (numbers default to >= 0); `resumable`: a stage that has made
    progress may continue with another value (how long it runs, how often it logs, where);
    `shape`: it fixes the stage's model shapes, so a run directory keeps it for good."""
    meta = {"help": help, "resumable": resumable, "shape": shape, **({"low": low} if low is not None else {})}
    return field(default=default, metadata=meta)


def resumable(cls) -> frozenset[str]:
    """The settings of `cls` a resumed stage may change."""
    return frozenset(f.name for f in fields(cls) if f.metadata.get("resumable"))


def shape_settings(cls) -> tuple[str, ...]:
    """The settings of `cls` that fix its model's shapes."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("shape"))


class Checked:
    """Configs check themselves when built (resolve, load, dataclasses.replace): a bad setting is
    refused before any work, naming the setting and the rule."""

    def __post_init__(self) -> None:
        if checking():
            _check(self)


# Off while the command line builds a config (tyro would box the error); check() follows it.
_checking = contextvars.ContextVar("checking", default=True)


def checking() -> bool:
    """Whether configs check themselves when built now (see unchecked)."""
    return _checking.get()


@contextlib.contextmanager
def unchecked():
    token = _checking.set(False)
    try:
        yield
    finally:
        _checking.reset(token)


def check(cfg) -> None:
    """Checks a config built under unchecked(), and the configs nested in it."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value)
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()


@dataclass
class StageConfig(Checked):
    """What every stage's settings are (the registry refuses a record whose config is not one): a
    seed, which `train --seed` offsets, and how far a finished run goes (the resume check)."""

    seed: int = setting(0, "seed of everything the stage draws at random")

    def planned_steps(self) -> int | None:
        """The step of the last checkpoint a finished run of these settings writes (None: the stage
        keeps no step checkpoints); a resumed run must not have gone past it."""
        return None


@dataclass
class SupervisedConfig(StageConfig):
    """Stages 1 and 2: AdamW with a linear warm-up and decay, batches from the frame loader."""

    steps: int = setting(50_000, "optimiser steps", low=1, resumable=True)
    batch_size: int = setting(128, "samples per step (per rank under torchrun)", low=1)
    lr: float = setting(3e-4, "peak AdamW learning rate")
    warmup_steps: int = setting(50, "steps of linear warm-up to the peak lr")
    warmup_from: float = setting(0.1, "lr at step 0, as a fraction of the peak")
    final_lr: float = setting(0.01, "lr at the last step, as a fraction of the peak (linear from the warm-up's end)")
    weight_decay: float = setting(1e-2, "AdamW weight decay")
    grad_clip: float = setting(2.0, "gradient-norm clip (0: none)")
    impala_scale: int = setting(4, "width: multiplies the IMPALA-CNN's (16, 32, 32) channels (LAPO: 4)", low=1,
                                shape=True)
    log_every: int = setting(100, "steps between metric lines", low=1, resumable=True)
    checkpoint_every: int = setting(2_000, "steps between checkpoints", low=1, resumable=True)
    precision: Precision = setting("fp32", PRECISION_HELP)
    cuda_graphs: bool = setting(False, CUDA_GRAPHS_HELP, resumable=True)
    compile: bool = setting(False, COMPILE_HELP, resumable=True)
    loader: Loader = setting("auto", LOADER_HELP, resumable=True)
    device: str = setting("", "torch device, e.g. cpu or cuda:1 ('' = this rank's GPU if any, else cpu)",
                          resumable=True)

    def planned_steps(self) -> int:
        return self.steps

    def optimizer(self, params):
        """(AdamW, its warm-up/decay schedule) over `params`, as these settings say."""
        from lapo_fast.runtime.optim import adamw_warmup_decay

        return adamw_warmup_decay(params, lr=self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                                  steps=self.steps, warmup_from=self.warmup_from, final_lr=self.final_lr)


@dataclass
class LAMConfig(SupervisedConfig):
    """Stage 1: latent IDM + FDM with the VQ bottleneck."""

    steps: int = setting(50_000, "optimiser steps (the reference code's; the paper's table says 70k)", low=1,
                         resumable=True)
    batch_size: int = setting(128, "windows per step (per rank under torchrun)", low=1)
    lr: float = setting(3e-4, "peak AdamW learning rate (the reference code's; the paper's table says 2e-4)")
    impala_scale: int = setting(4, "IDM width: multiplies the IMPALA-CNN's (16, 32, 32) channels (LAPO: 4)", low=1,
                                shape=True)
    fdm_arch: FdmArch = setting("lapo", "FDM: 'lapo' (the reference code's U-Net, 7.8M params at width 24) or "
                                        "'unet' (ours: the latent after the first norm and at the bottleneck)",
                                shape=True)
    fdm_width: int = setting(24, "FDM base width (the reference's wm_scale)", low=1, shape=True)
    fdm_norm: FdmNorm = setting("batch", "the 'unet' FDM's normalisation: 'batch' (BatchNorm) or 'group' "
                                         "(GroupNorm)", shape=True)
    fdm_action: FdmAction = setting("latent", "what the FDM is given: 'latent' (LAPO) or 'true' (ablation: the "
                                              "dataset's action)", shape=True)
    context: int = setting(1, "frames before o_t; windows are context + 2 frames", shape=True)
    num_codebooks: int = setting(2, "VQ codebooks (groups)", low=1, shape=True)
    codebook_size: int = setting(64, "codes per codebook", low=1, shape=True)
    code_dim: int = setting(16, "dimensions per code", low=1, shape=True)
    num_latents: int = setting(4, "codes per codebook per latent action (latent dim = codebooks*code_dim*latents)",
                               low=1, shape=True)
    quantize: bool = setting(True, "vector-quantise the IDM's latent (LAPO); false: the paper's no-VQ ablation, the "
                                   "continuous latent of the same shape", shape=True)
    vq_decay: float = setting(0.999, "EMA decay of the codebook statistics")
    commitment: float = setting(0.05, "weight of the VQ commitment loss")
    dead_code_threshold: float = setting(0.0, "> 0: refill codes whose EMA count falls below it (0: LAPO)")
    log_every: int = setting(100, "steps between metric lines (and held-out losses)", low=1, resumable=True)
    checkpoint_every: int = setting(2_000, "steps between checkpoints (and latent probes)", low=1, resumable=True)
    probe_labels: int = setting(65_536, "labelled transitions the latent probe fits (the reference's 65,536)", low=1)
    probe_held_out: int = setting(65_536, "other transitions it is scored on (the reference's other half)", low=1)
    seed: int = setting(0, "seed of weights and window sampling")
    compile: bool = setting(False, COMPILE_HELP + ": the IDM, VQ and FDM as one graph", resumable=True)


@dataclass
class BCConfig(SupervisedConfig):
    """Stage 2: latent behaviour cloning, policy(o_t) -> the frozen IDM's pre-quantisation latent."""

    steps: int = setting(60_000, "optimiser steps", low=1, resumable=True)
    batch_size: int = setting(128, "observations per step (per rank under torchrun)", low=1)
    lr: float = setting(2e-4, "peak AdamW learning rate")
    warmup_steps: int = setting(1_000, "steps of linear warm-up to the peak lr")
    warmup_from: float = setting(0.01, "lr at step 0, as a fraction of the peak")
    final_lr: float = setting(0.0, "lr at the last step, as a fraction of the peak (linear from the warm-up's end)")
    grad_clip: float = setting(0.0, "gradient-norm clip (0: none, as the reference code's stage 2)")
    impala_scale: int = setting(4, "policy width: multiplies the IMPALA-CNN's (16, 32, 32) channels (LAPO: 4)", low=1,
                                shape=True)
    label_batch: int = setting(512, "windows per IDM forward when computing the cached labels", low=1, resumable=True)
    seed: int = setting(0, "seed of weights and batch sampling")
    compile: bool = setting(False, COMPILE_HELP + ": the policy's trunk", resumable=True)


@dataclass
class DecodeConfig(StageConfig):
    """Stage 3a: latent -> true-action decoder from a few labelled transitions, composed with the
    latent policy and evaluated online."""

    labelled: tuple[int, ...] = setting((16, 64, 256, 1024, 4096), "sizes of the labelled sets swept", low=1,
                                        resumable=True)
    deploy: int = setting(256, "the size whose decoder is the run's 'decoded policy'", low=1, resumable=True)
    steps: int = setting(2_000, "decoder training steps (full batch)", low=1)
    lr: float = setting(1e-3, "decoder Adam learning rate")
    weight_decay: float = setting(1e-4, "decoder Adam weight decay")
    held_out: int = setting(2_000, "labelled transitions kept apart to score the decoders", low=1)
    eval_episodes: int = setting(64, "episodes of the online evaluation of each decoder", low=1)
    seed: int = setting(0, "seed of the labelled subsets, decoders and evaluation")
    online: bool = setting(True, "also act with each decoder in the game (false: score it on held-out transitions "
                                 "only)", resumable=True)
    loader: Loader = setting("auto", LOADER_HELP, resumable=True)
    device: str = setting("", "torch device ('' = cuda if available, else cpu)", resumable=True)


@dataclass
class UmapConfig(StageConfig):
    """The 2-D UMAP of the IDM's latent actions, coloured by true action."""

    points: int = setting(5_000, f"windows projected (no-op actions left out; UMAP needs {UMAP_FEWEST} or more)",
                          low=UMAP_FEWEST)
    seed: int = setting(0, "seed of the windows picked and of UMAP")
    loader: Loader = setting("auto", LOADER_HELP)
    device: str = setting("", "torch device of the IDM ('' = cuda if available, else cpu)")


@dataclass
class PPOConfig(StageConfig):
    """PPO from scratch (demonstrators, the baseline) with Cobbe et al. (2020)'s Procgen settings;
    stage 3b's fine-tuning uses FinetuneConfig."""

    env_steps: int = setting(4_000_000, "environment steps in all", low=1, resumable=True)
    num_envs: int = setting(64, "parallel environments", low=1)
    rollout: int = setting(256, "steps per environment per update", low=1)
    gamma: float = setting(0.999, "discount")
    gae_lambda: float = setting(0.95, "GAE lambda")
    clip: float = setting(0.2, "PPO ratio clip")
    epochs: int = setting(3, "passes over each rollout", low=1)
    minibatches: int = setting(8, "minibatches per pass", low=1)
    entropy: float = setting(0.01, "entropy bonus coefficient (Cobbe et al.'s)")
    value_coef: float = setting(0.5, "value loss coefficient")
    lr: float = setting(5e-4, "Adam learning rate of full PPO (scratch, demonstrators)")
    head_lr: float = setting(1e-2, "fine-tuning: the lr its layers' schedules are fractions of (the reference's 1e-2)")
    adam_eps: float = setting(1e-5, "Adam epsilon")
    clip_value: bool = setting(False, "clip the value loss around the rollout's values")
    grad_clip: float = setting(0.5, "gradient-norm clip (0: none)")
    impala_scale: int = setting(4, "policy width: multiplies the IMPALA-CNN's (16, 32, 32) channels", low=1, shape=True)
    normalize_rewards: bool = setting(True, "divide rewards by a running std of the return, clip at 10")
    distribution_mode: DistributionMode = setting(DEFAULT_DISTRIBUTION_MODE, "Procgen distribution mode")
    checkpoint_every: int = setting(10, "updates between checkpoints", low=1, resumable=True)
    seed: int = setting(0, "seed of weights, envs and sampling")
    precision: Precision = setting("fp32", PRECISION_HELP)
    cuda_graphs: bool = setting(False, CUDA_GRAPHS_HELP + "; PPO's minibatch step", resumable=True)
    device: str = setting("", "torch device ('' = cuda if available, else cpu)", resumable=True)

    def planned_steps(self) -> int:
        """Updates of num_envs x rollout env steps (checkpoints count updates): env_steps // that, as
        the reference's ppo.train and CleanRL count them (4M / 4,096 -> 976), at least one."""
        return max(1, self.env_steps // (self.num_envs * self.rollout))


@dataclass
class FinetuneConfig(PPOConfig):
    """Stage 3b as LAPO's code (stage3_decoding.py, config.yaml): PPO on the decoded latent policy
    (models.DecodedPolicy), whose decoder is trained online on the IDM's labels of the agent's own
    transitions. Each trained layer's lr is 0 until its ramp starts, rises linearly to its
    fraction of head_lr at the ramp's end, then falls linearly to 0 at env_steps."""

    rollout: int = setting(64, "steps per environment per update (the reference's 64)", low=1)
    entropy: float = setting(0.0025, "entropy bonus coefficient (the reference's)")
    adam_eps: float = setting(1e-8, "Adam epsilon (torch's default, the reference's)")
    clip_value: bool = setting(True, "clip the value loss around the rollout's values (the reference's)")
    action_head_ramp: tuple[int, int] = setting((35_000, 50_000), "env steps: the action head's lr ramp (start end) "
                                                                   "to head_lr/4")
    value_head_ramp: tuple[int, int] = setting((25_000, 50_000), "env steps: the value head's lr ramp (start end) to "
                                                                  "head_lr/4")
    fc_ramp: tuple[int, int] = setting((50_000, 200_000), "env steps: the trainable fc's lr ramp (start end) to "
                                                           "head_lr/10")
    decoder_from: int = setting(10_000, "env steps after which the decoder is trained online")
    decoder_until: int = setting(400_000, "env steps after which it is no longer trained")
    decoder_dense_until: int = setting(50_000, "until here it is retrained after every update, then every "
                                               "decoder_every")
    decoder_every: int = setting(20, "updates between decoder retrainings after decoder_dense_until", low=1)
    decoder_epochs: int = setting(3, "epochs over all labelled transitions per retraining", low=1)
    decoder_batch: int = setting(512, "decoder minibatch size", low=1)
    decoder_lr: float = setting(1e-3, "decoder Adam lr (torch's default, the reference's)")
    label_smoothing: float = setting(0.05, "label smoothing of the decoder's cross-entropy")
    reference_clip: bool = setting(True, "clip the gradient norm as the reference's code does: over all of the "
                                         "policy's parameters, counting the frozen trunk's and the decoder's "
                                         "gradients, which it never clears (the trunk's backward then runs in every "
                                         "minibatch); false: over the trained layers only, on cached trunk features")



@dataclass
class EvalConfig(StageConfig):
    """Returns over many levels (all of them: num_levels=0), normalised per game."""

    episodes: int = setting(256, "episodes per policy", low=1)
    num_envs: int = setting(64, "parallel environments", low=1)
    distribution_mode: DistributionMode = setting(DEFAULT_DISTRIBUTION_MODE, "Procgen distribution mode")
    greedy: bool = setting(False, "act by argmax instead of sampling")
    seed: int = setting(12345, "seed of the levels and of action sampling")
    device: str = setting("", "torch device ('' = cuda if available, else cpu)")


@dataclass
class RecordConfig(StageConfig):
    """The observation-only datasets `train` records from the demonstrator when none is given."""

    frames: int = setting(8_000_000, "training frames to record (whole episodes)", low=1)
    test_frames: int = setting(200_000, "held-out frames to record (other levels' seeds)", low=1)
    num_envs: int = setting(64, "parallel environments while recording", low=1)
    distribution_mode: DistributionMode = setting(DEFAULT_DISTRIBUTION_MODE, "Procgen distribution mode")
    seed: int = setting(0, "seed of the recording")


# -- checks ------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls) -> dict[str, object]:
    """The fields' types, resolved (the annotations are strings under `from __future__`)."""
    return typing.get_type_hints(cls)


def _check_value(where: str, v, kind, low) -> None:
    """One value against its field's type (int, float, bool, str, a Literal of choices, tuple[int, ...],
    tuple[int, int])."""
    if typing.get_origin(kind) is typing.Literal:
        if v not in typing.get_args(kind):
            raise ValueError(f"{where}={v!r}; choose one of {list(typing.get_args(kind))}")
        return
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        length = None if args[-1] is Ellipsis else len(args)
        if not isinstance(v, tuple) or (length is not None and len(v) != length) or not v:
            raise ValueError(f"{where} must be {length or 'one or more'} numbers, got {v!r}")
        for x in v:
            _check_value(where, x, args[0], low)
        return
    if kind is bool or kind is str:
        if not isinstance(v, kind):
            raise ValueError(f"{where} must be {'true or false' if kind is bool else 'a string'}, got {v!r}")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ValueError(f"{where} must be {'an int' if kind is int else 'a number'}, got {v!r}")
    if not v >= low:  # (a NaN fails too)
        raise ValueError(f"{where} must be >= {low}, got {v}")


def _check(cfg) -> None:
    name = type(cfg).__name__
    hints = _hints(type(cfg))
    for f in fields(cfg):
        _check_value(f"{name}.{f.name}", getattr(cfg, f.name), hints[f.name], f.metadata.get("low", 0))
    if isinstance(cfg, LAMConfig) and not 0 <= cfg.vq_decay < 1:
        raise ValueError(f"LAMConfig.vq_decay must be in [0, 1), got {cfg.vq_decay}")
    if isinstance(cfg, DecodeConfig) and cfg.deploy not in cfg.labelled:
        raise ValueError(f"DecodeConfig.deploy={cfg.deploy} is not one of the swept sizes {list(cfg.labelled)}")
    if isinstance(cfg, FinetuneConfig):
        for field_name in ("action_head_ramp", "value_head_ramp", "fc_ramp"):
            start, end = getattr(cfg, field_name)
            if start > end:
                raise ValueError(f"FinetuneConfig.{field_name}: need start <= end, got {start} {end}")
    if isinstance(cfg, PPOConfig):
        batch = cfg.num_envs * cfg.rollout
        if batch % cfg.minibatches:
            raise ValueError(f"PPOConfig: num_envs*rollout ({batch}) must split into {cfg.minibatches} minibatches")
        if not 0 < cfg.gamma <= 1 or not 0 <= cfg.gae_lambda <= 1:
            raise ValueError("PPOConfig: gamma must be in (0, 1] and gae_lambda in [0, 1]")


def labelled_sizes(cfg: DecodeConfig) -> list[int]:
    """The labelled-set sizes swept, ascending, each once."""
    return sorted(set(cfg.labelled))


# -- presets: instances of the configs ---------------------------------------------------------------

_LAM_SHORT = dict(impala_scale=1, warmup_from=0.0, final_lr=0.0, dead_code_threshold=0.01, vq_decay=0.99,
                  fdm_arch="unet", fdm_norm="group")
_PRESETS: dict[type, dict[str, object]] = {
    LAMConfig: {
        "paper": LAMConfig(),
        # Short runs: a faster codebook EMA, so the codes follow the IDM within the run, and
        # GroupNorm in the FDM (docs/experiments.md: "cpu preset: FDM norm and VQ decay").
        "cpu": LAMConfig(steps=3_000, batch_size=32, fdm_width=12, warmup_steps=200, probe_labels=4_096,
                         probe_held_out=2_000, log_every=50, checkpoint_every=500, **_LAM_SHORT),
        "smoke": LAMConfig(steps=20, batch_size=8, fdm_width=8, warmup_steps=2, probe_labels=256,
                           probe_held_out=2_000, log_every=5, checkpoint_every=10, **_LAM_SHORT),
    },
    BCConfig: {
        "paper": BCConfig(),
        "cpu": BCConfig(steps=1_500, batch_size=64, impala_scale=1, warmup_steps=100, warmup_from=0.0,
                        grad_clip=2.0, log_every=50, checkpoint_every=500),
        "smoke": BCConfig(steps=10, batch_size=8, impala_scale=1, warmup_steps=2, warmup_from=0.0, grad_clip=2.0,
                          log_every=5, checkpoint_every=5, label_batch=16),
    },
    DecodeConfig: {
        "paper": DecodeConfig(),
        "cpu": DecodeConfig(labelled=(16, 64, 256, 1024), steps=1_000, held_out=1_000, eval_episodes=32),
        "smoke": DecodeConfig(labelled=(8, 16), deploy=16, steps=20, held_out=8, eval_episodes=2),
    },
    FinetuneConfig: {
        "paper": FinetuneConfig(),
        "cpu": FinetuneConfig(env_steps=200_000, num_envs=32, impala_scale=1, checkpoint_every=20),
        "smoke": FinetuneConfig(env_steps=256, num_envs=4, rollout=16, epochs=2, minibatches=2, impala_scale=1,
                                checkpoint_every=1, action_head_ramp=(0, 64), value_head_ramp=(0, 64),
                                fc_ramp=(0, 128), decoder_from=0, decoder_dense_until=256),
    },
    PPOConfig: {
        "paper": PPOConfig(),
        "cpu": PPOConfig(env_steps=200_000, num_envs=32, rollout=128, impala_scale=1, checkpoint_every=5),
        "smoke": PPOConfig(env_steps=256, num_envs=4, rollout=32, epochs=2, minibatches=2, impala_scale=1,
                           checkpoint_every=1),
    },
    EvalConfig: {
        "paper": EvalConfig(),
        "cpu": EvalConfig(episodes=64, num_envs=32),
        "smoke": EvalConfig(episodes=2, num_envs=2),
    },
    RecordConfig: {
        "paper": RecordConfig(),
        "cpu": RecordConfig(frames=60_000, test_frames=4_000, num_envs=32),
        "smoke": RecordConfig(frames=400, test_frames=100, num_envs=4),
    },
}


PRESET_ENV = "LAPO_FAST_PRESET"  # a machine's default preset (CI: smoke), below an explicit --preset


def default_preset() -> tuple[str, str]:
    """(preset, why)."""
    if os.environ.get(PRESET_ENV):
        return check_preset(os.environ[PRESET_ENV]), f"{PRESET_ENV}={os.environ[PRESET_ENV]} in the environment"
    import torch

    if torch.cuda.is_available():
        return "paper", f"CUDA is available ({torch.cuda.get_device_name(0)})"
    return "cpu", f"no CUDA device; {os.cpu_count()} CPU cores"


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    return preset


def preset_config(cls, preset: str):
    """A config class's preset, as an instance (the class's defaults where it has none)."""
    return _PRESETS.get(cls, {}).get(check_preset(preset)) or cls()


def resolve(cls, preset: str | None = None, overrides: dict | None = None):
    """A config in Python: defaults < preset < explicit overrides (None: keep), checked."""
    base = preset_config(cls, preset or default_preset()[0])
    names = {f.name for f in fields(cls)}
    for k in overrides or {}:
        if k not in names:
            raise ValueError(f"{cls.__name__} has no setting {k!r}")
    return dataclasses.replace(base, **{k: v for k, v in (overrides or {}).items() if v is not None})


# -- saved configs ------------------------------------------------------------------------------------

# Settings added after runs were saved without them, with the value those runs were trained with.
_ADDED_LATER: dict[type, dict[str, object]] = {LAMConfig: {"fdm_norm": "group", "fdm_arch": "unet"},
                                               DecodeConfig: {"online": True}}


def load(cls, path: Path):
    """A config saved by `save`, checked to be a `cls`; returned as the type it was saved as (a
    FinetuneConfig where a PPOConfig is asked for: fine-tuning is PPO)."""
    payload = read_json(path)
    if payload is None:
        raise FileNotFoundError(f"{path}: no saved config")
    return from_saved(cls, payload, path)


def from_saved(cls, payload, path):
    """load()'s config from its JSON payload (as payload() makes it); `path` names it in errors."""
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise ValueError(f"{path}: not a lapo-fast config (a JSON object with 'type' and 'config' expected); "
                         "restore it, or delete the stage's folder to start that stage again")
    saved = next((c for c in _config_types(cls) if c.__name__ == payload.get("type")), None)
    if saved is None:
        raise ValueError(f"{path}: holds a {payload.get('type')}, expected a {cls.__name__}")
    cls = saved
    hints = _hints(cls)
    values = {**_ADDED_LATER.get(cls, {}), **payload["config"]}
    values = {k: _from_json(v, hints[k]) for k, v in values.items() if k in hints}
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _from_json(v, kind):
    """A saved value as its field's type: JSON lists are tuples; runs saved before tuple fields
    wrote them as comma strings ('16,64,256', ramps '35000,50000')."""
    if typing.get_origin(kind) is not tuple:
        return v
    if isinstance(v, str):
        try:
            return tuple(int(x) for x in v.split(",") if x.strip())
        except ValueError:
            return v  # the check names the field and the value
    return tuple(v) if isinstance(v, list) else v


def _config_types(cls) -> list[type]:
    """cls and its subclasses."""
    return [cls] + [t for sub in cls.__subclasses__() for t in _config_types(sub)]


def payload(cfg) -> dict:
    """A config as saved ({"type", "config"}): what save() writes and from_saved() reads back."""
    return {"config": dataclasses.asdict(cfg), "type": type(cfg).__name__}


def save(cfg, path: Path, **extra) -> None:
    write_json(path, {**payload(cfg), **extra})
