"""The stages of the method: one record each, in the order `lapo-fast train` runs them.

Everything that needs to know the stages reads STAGES: the command line (a `lapo-fast <stage>`
command each, flags generated from its config class), `train`'s order and its settings
(`--lam.steps 500`: one namespace per stage), RunDir's config type of each stage folder, and the
extras a command needs. A stage's module holds its run function, called the same way for all:

    run(ctx: StageContext, cfg) -> str      # the line the command prints after "<stage>: "

(one that has nothing to do -- `train` recording when a dataset is given -- returns "skipped: why",
and `train` leaves it out of the run's timings).

Adding a stage: a module in lapo_fast/stages/ with that function, its config class in
lapo_fast/config.py, one record below (docs/stages.md shows one).
"""

from __future__ import annotations

import dataclasses
import importlib
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lapo_fast.config import (
    BCConfig, DecodeConfig, EvalConfig, FinetuneConfig, LAMConfig, PPOConfig, RecordConfig, UmapConfig,
    StageConfig, check, check_preset, checking, preset_config, unchecked,
)


@dataclass(frozen=True)
class Input:
    """A path or name a stage command takes besides its settings (--data, --env, ...)."""

    name: str
    type: object
    help: str
    required: bool = True


DATA = Input("data", Path, "frame dataset directory")
TEST_DATA = Input("test_data", Path | None, "dataset of held-out episodes (the held-out FDM loss)", required=False)
ENV = Input("env", str, "Procgen game, e.g. starpilot")
GAME = Input("env", str | None, "game to act in (default: the dataset's)", required=False)
NAME = Input("name", str | None, "the run's subfolder to train in (default: the command's name)", required=False)

# What the stages import beyond the core (lapo_fast.extras names the extra that brings each); their
# commands also need tyro, which parses their flags.
LOOP = ("safetensors", "lz4", "zstandard", "tqdm")
ENGINE = ("procgen", "gym3", "gymnasium")


@dataclass(frozen=True)
class Stage:
    """One stage of the method."""

    name: str                               # RUN/<name>, `lapo-fast <name>`, train's --<name>.FIELD settings
    config: type | None                     # its settings (lapo_fast.config); None: it has none
    run: str                                # "module:function": function(ctx: StageContext, cfg) -> str
    help: str
    inputs: tuple[Input, ...] = ()          # what its command takes besides --out and the settings
    needs: tuple[str, ...] = ()             # modules it imports beyond the core
    command: bool = True                    # has a `lapo-fast <name>` command
    settings: bool = True                   # has a namespace of `train`'s settings
    train_presets: dict = field(default_factory=dict)  # preset -> changes to its config under `train`
    train_config: Callable | None = None    # its config under `train` from the run's (default: its namespace)

    def __post_init__(self) -> None:
        """A stage's rules, checked when its record is made: its name is a folder, a command and a
        `train` namespace (`--<name>.FIELD`), so a Python identifier; its settings are a StageConfig
        dataclass (a seed, planned_steps for the resume check); its run function is "module:function"."""
        if not self.name.isidentifier() or keyword.iskeyword(self.name):
            raise ValueError(f"Stage {self.name!r}: the name must be a Python identifier (it names RUN/<name>, "
                             f"`lapo-fast <name>` and train's --<name>.FIELD); use e.g. {_identifier(self.name)!r}")
        if self.config is not None and not (isinstance(self.config, type) and issubclass(self.config, StageConfig)
                                            and dataclasses.is_dataclass(self.config)):
            raise TypeError(f"Stage {self.name!r}: its config {self.config!r} must be a @dataclass subclassing "
                            "lapo_fast.config.StageConfig (every stage has a seed and planned_steps)")
        module, sep, function = self.run.partition(":")
        if not (sep and module and function.isidentifier()):
            raise ValueError(f"Stage {self.name!r}: run={self.run!r} must be 'module:function', e.g. "
                             f"'lapo_fast.stages.{self.name}:run'")

    def runner(self) -> Callable:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)

    def config_in(self, run_config):
        """Its config in a `train` run's RunConfig."""
        if self.train_config is not None:
            return self.train_config(run_config)
        return getattr(run_config, self.name) if self.config is not None else None


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name).lstrip("0123456789") or "stage"


def _scratch_baseline(run_config) -> PPOConfig:
    """PPO from scratch for `train`'s comparison: the demonstrator's settings on the stage-2 network,
    at the fine-tuning's env steps and envs."""
    return dataclasses.replace(run_config.demo, impala_scale=run_config.bc.impala_scale,
                               env_steps=run_config.finetune.env_steps, num_envs=run_config.finetune.num_envs)


STAGES: tuple[Stage, ...] = (
    # The paper's demonstrator is its expert: PPO for 50M frames, longer than the 4M-step fine-tuning.
    Stage("demo", PPOConfig, "lapo_fast.stages.ppo:run_demonstrator",
          "the demonstrator, PPO from scratch, when no demonstrator is given or shipped (also the from-scratch "
          "baseline)", needs=LOOP + ENGINE, command=False, train_presets={"paper": {"env_steps": 50_000_000}}),
    Stage("record", RecordConfig, "lapo_fast.stages.record:run",
          "the observation-only datasets, recorded from the demonstrator when no --data is given",
          needs=LOOP + ENGINE, command=False),
    Stage("lam", LAMConfig, "lapo_fast.stages.lam:run", "stage 1: latent IDM + FDM with the VQ bottleneck (resumable)",
          inputs=(DATA, TEST_DATA), needs=LOOP),
    Stage("bc", BCConfig, "lapo_fast.stages.bc:run",
          "stage 2: latent behaviour cloning on the frozen IDM's cached labels (needs RUN/lam)", inputs=(DATA,),
          needs=LOOP),
    Stage("decode", DecodeConfig, "lapo_fast.stages.decode:run",
          "stage 3a: latent -> action decoders from a few labelled transitions, evaluated online",
          inputs=(DATA, GAME), needs=LOOP + ENGINE),
    Stage("finetune", FinetuneConfig, "lapo_fast.stages.finetune:run",
          "stage 3b: LAPO's online decoding and PPO fine-tuning of the latent policy (needs RUN/lam and RUN/bc)",
          inputs=(ENV, NAME), needs=LOOP + ENGINE),
    Stage("ppo", PPOConfig, "lapo_fast.stages.ppo:run", "PPO from scratch (baselines, demonstrators)",
          inputs=(ENV, NAME), needs=LOOP + ENGINE, settings=False, train_config=_scratch_baseline),
    Stage("eval", EvalConfig, "lapo_fast.stages.evaluate:run", "returns of every policy in a run, normalised per game",
          inputs=(ENV,), needs=LOOP + ENGINE),
    Stage("umap", UmapConfig, "lapo_fast.stages.umap:run",
          "UMAP of the IDM's latent actions coloured by true action (PNG)", inputs=(DATA,),
          needs=LOOP + ("umap", "matplotlib")),
    Stage("report", None, "lapo_fast.stages.report:run", "report.md/json and plots of a run", needs=("matplotlib",)),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
COMMANDS: dict[str, Stage] = {s.name: s for s in STAGES if s.command}


def folder_config(folder: str) -> type:
    """The config type saved in RUN/<folder>: its stage's, and a PPO run's for any other folder (a
    `ppo --name`); load() returns a FinetuneConfig where one was saved."""
    s = BY_NAME.get(folder)
    return s.config if s is not None and s.config is not None else PPOConfig


def command_of(folder: str) -> str:
    """The command that makes RUN/<folder>."""
    return folder if folder in COMMANDS else f"ppo --name {folder}"


@dataclass
class StageContext:
    """Where a stage runs and on what: the same for every stage's run function."""

    run: object                             # the RunDir
    env: str | None = None                  # --env: the Procgen game
    data: Path | None = None                # the training dataset
    test_data: Path | None = None           # held-out episodes
    name: str | None = None                 # the subfolder a PPO run trains in
    demonstrator: Path | None = None        # `train`: the policy that records the dataset, if given or shipped
    record: bool = False                    # `train` records the datasets into the run (no --data given)
    train: bool = False                     # part of `train` (a stage skips what `train` does not need)
    progress: bool = True


# -- `train`'s settings: one namespace per stage -----------------------------------------------------

def _check_run(self) -> None:
    if checking() and self.lam.fdm_action != "latent":
        raise ValueError("lam.fdm_action='true' is an ablation without an IDM, which stages 2-3 need: "
                         "run it on its own with `lapo-fast lam --fdm-action true`")


RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    [(s.name, s.config, field(default_factory=s.config, metadata={"help": s.help}))
     for s in STAGES if s.config is not None and s.settings],
    namespace={"__post_init__": _check_run,
               "__doc__": "Every stage's settings of one `train` run (lapo-fast train --lam.steps 500 ...)."},
)
RunConfig.__module__ = __name__


def run_preset(preset: str, seed: int = 0):
    """`train`'s settings in a preset. `seed` (the run's seed, `train --seed`) is added to every
    stage's own, so runs of different seeds differ everywhere; an explicit --STAGE.seed still wins."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the run's seed must be an int >= 0, got {seed!r}")
    check_preset(preset)
    configs = {}
    for s in STAGES:
        if s.config is None or not s.settings:
            continue
        cfg = dataclasses.replace(preset_config(s.config, preset), **s.train_presets.get(preset, {}))
        configs[s.name] = dataclasses.replace(cfg, seed=cfg.seed + seed)
    return RunConfig(**configs)


def resolve_run(preset: str, args: list[str] | tuple[str, ...] = (), seed: int = 0):
    """`train`'s settings from a preset and its command-line overrides (["--lam.steps", "500"])."""
    import tyro

    default = run_preset(preset, seed)
    if not args:
        return default
    try:
        with unchecked():
            parsed = tyro.cli(RunConfig, args=list(args), default=default, prog="lapo-fast train")
    except SystemExit:
        raise ValueError(f"train settings {' '.join(args)!r}: not valid (the reason is above; `lapo-fast train "
                         "--help` lists them)") from None
    check(parsed)
    return parsed
