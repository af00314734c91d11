"""`lapo-fast train`: the whole method on one game, every stage of lapo_fast.registry in its order,
in one run directory (its layout: lapo_fast/rundir.py). A demonstrator (given, shipped, or PPO from
scratch, which is then also the from-scratch baseline), datasets recorded from it, stages 1, 2, 3a
and 3b, PPO from scratch at equal env steps when no demonstrator was trained here, evaluation, UMAP
and the report.

Every stage resumes or skips what it has finished, so rerunning the command continues a run.
"""

from __future__ import annotations

import time
from pathlib import Path

from lapo_fast.config import save
from lapo_fast.envs.games import check_game
from lapo_fast.registry import STAGES, StageContext
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
        if not str(result).startswith("skipped"):
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0
            write_json(self.path, self.times)
        return result


def run_all(game: str, run_dir, cfgs, *, preset: str, demonstrator=None, data=None, test_data=None,
            progress: bool = True) -> Path:
    """Runs (or continues) every stage; returns the report's path. `cfgs` is a RunConfig
    (registry.resolve_run)."""
    check_game(game)
    run = RunDir(run_dir)
    with folder_lock(run.path):  # one process per run: a second `train` here is refused
        return _run_all(run, game, cfgs, preset=preset, demonstrator=demonstrator, data=data, test_data=test_data,
                        progress=progress)


def _run_all(run: RunDir, game: str, cfgs, *, preset: str, demonstrator, data, test_data, progress: bool) -> Path:
    from lapo_fast.data import FrameDataset

    stages = [(s, s.config_in(cfgs)) for s in STAGES]
    run.claim(game=game, data=None if data is None else FrameDataset(data))
    for s, cfg in stages:  # every stage's settings checked against what it ran with, then recorded
        if cfg is not None:
            run.claim(s.name, cfg, write=False)
    for s, cfg in stages:
        if cfg is not None:
            save(cfg, run.run_config_path(s.name), preset=preset, game=game)

    # The dataset: given, or recorded into the run from a demonstrator (given, shipped, or trained here).
    record = data is None
    if record:
        data, test_data = run.data("train"), run.data("test")
        if demonstrator is None:
            demonstrator = shipped_demonstrator(game)
            if demonstrator is not None:
                print(f"train: using the demonstrator shipped for {game}: {demonstrator}")
    ctx = StageContext(run=run, env=game, data=Path(data), test_data=None if test_data is None else Path(test_data),
                       demonstrator=demonstrator, record=record, train=True, progress=progress)
    timer = _Timer(run)
    for s, cfg in stages:
        print(f"{s.name}: {timer(s.name, s.runner(), ctx, cfg)}")
    report = run.report("md")
    print(f"train: report at {report}")
    return report
