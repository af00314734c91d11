"""`lapo-fast train`: the whole method on one game, every stage in order, in one run directory
(its layout: lapo_fast/rundir.py). A demonstrator (given, shipped, or PPO from scratch, which is
then also the from-scratch baseline), datasets recorded from it, stages 1, 2, 3a and 3b, PPO from
scratch at equal env steps when no demonstrator was trained here, evaluation, UMAP and the report.

Every stage resumes or skips what it has finished, so rerunning the command continues a run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lapo_fast.config import save
from lapo_fast.envs.games import check_game
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.files import read_json, write_json
from lapo_fast.runtime.lock import folder_lock

SHIPPED = Path(__file__).resolve().parent / "demonstrators"  # <game>.pt2, torch.export policies


def shipped_demonstrator(game: str) -> Path | None:
    path = SHIPPED / f"{game}.pt2"
    return path if path.exists() else None


class _Timer:
    """Adds each stage's wall time to RUN/timings.json (accumulated over resumed calls)."""

    def __init__(self, run: RunDir):
        self.path = run.timings
        self.times = read_json(self.path, {})

    def __call__(self, stage: str, fn, *args, **kwargs):
        print(f"== {stage}")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0
        write_json(self.path, self.times)
        return result


def run_all(game: str, run_dir, cfgs: dict, *, preset: str, demonstrator=None, data=None, test_data=None,
            progress: bool = True) -> Path:
    """Runs (or continues) every stage; returns the report's path. `cfgs` is resolve_run's output."""
    check_game(game)
    run = RunDir(run_dir)
    with folder_lock(run.path):  # one process per run: a second `train` here is refused
        return _run_all(run, game, cfgs, preset=preset, demonstrator=demonstrator, data=data, test_data=test_data,
                        progress=progress)


def _run_all(run: RunDir, game: str, cfgs: dict, *, preset: str, demonstrator, data, test_data,
             progress: bool) -> Path:
    from lapo_fast.data import FrameDataset, collect
    from lapo_fast.runtime.acting import checkpoint_policy, policy_actor
    from lapo_fast.stages.bc import train_bc
    from lapo_fast.stages.decode import train_decoders
    from lapo_fast.stages.evaluate import evaluate_run
    from lapo_fast.stages.lam import train_lam
    from lapo_fast.stages.ppo import finetune, train_ppo
    from lapo_fast.stages.report import write_report
    from lapo_fast.stages.umap import project_latents

    run.claim(game=game, data=None if data is None else FrameDataset(data))
    for stage, cfg in cfgs.items():  # every stage's settings checked against what it ran with, then recorded
        run.claim(stage, cfg, write=False)
    for stage, cfg in cfgs.items():
        save(cfg, run.run_config_path(stage), preset=preset, game=game)
    timer = _Timer(run)
    dcfg = cfgs["data"]

    # A dataset: given, or recorded from a demonstrator (given, shipped, or trained here).
    if data is None:
        if demonstrator is None:
            demonstrator = shipped_demonstrator(game)
            if demonstrator is not None:
                print(f"train: using the demonstrator shipped for {game}: {demonstrator}")
        if demonstrator is None:
            steps = cfgs["demo"].env_steps
            print(f"train: no demonstrator given or shipped for {game}: training one with PPO from scratch "
                  f"for {steps:,} env steps (RUN/demo; it is also the from-scratch baseline)")
            timer("demonstrator (PPO)", train_ppo, run, game, cfgs["demo"], name="demo", progress=progress)
            act = policy_actor(run.load_policy("demo"), seed=dcfg.seed)
            policy_name = "ppo demonstrator (RUN/demo)"
        else:
            act = checkpoint_policy(demonstrator, seed=dcfg.seed)
            policy_name = str(demonstrator)
        data, test_data = run.data("train"), run.data("test")
        for path, frames, seed in ((data, dcfg.frames, dcfg.seed), (test_data, dcfg.test_frames, dcfg.seed + 10_000)):
            timer(f"collect {path.name}", collect, path, game, act, frames=frames, num_envs=dcfg.num_envs, seed=seed,
                  distribution_mode=dcfg.distribution_mode, policy_name=policy_name, progress=progress)

    timer("stage 1 (lam)", train_lam, data, run, cfgs["lam"], test_data=test_data, progress=progress)
    timer("stage 2 (bc)", train_bc, data, run, cfgs["bc"], progress=progress)
    timer("stage 3a (decode)", train_decoders, data, run, cfgs["decode"], env_name=game, progress=progress)
    timer("stage 3b (finetune)", finetune, run, game, cfgs["finetune"], progress=progress)
    if not run.has("demo"):
        # No demonstrator trained here: PPO from scratch at the fine-tuning's env steps, as the baseline.
        # The same network and env steps, with full PPO's own settings.
        scratch = dataclasses.replace(cfgs["demo"], impala_scale=cfgs["bc"].impala_scale,
                                      env_steps=cfgs["finetune"].env_steps, num_envs=cfgs["finetune"].num_envs)
        timer("PPO from scratch", train_ppo, run, game, scratch, name="ppo", progress=progress)
    timer("eval", evaluate_run, run, game, cfgs["eval"], progress=progress)
    if not run.umap_plot.exists():
        timer("umap", project_latents, data, run, cfgs["umap"])
    report = write_report(run)
    print(f"train: report at {report}")
    return report
