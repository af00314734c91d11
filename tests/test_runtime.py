"""Infrastructure: the one atomic writer, the run directory's owner, config help texts."""

from dataclasses import fields

import numpy as np
import pytest

from lapo_fast.cli import main
from lapo_fast.config import PRESETS, FinetuneConfig, LAMConfig, PPOConfig, resolve
from lapo_fast.registry import STAGES
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.files import atomic_write, read_json, write_json


def test_atomic_write_replaces_whole_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    assert read_json(path) == {"v": 1}

    def fails(tmp):
        tmp.write_text('{"v": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert read_json(path) == {"v": 1}                   # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left behind

    atomic_write(tmp_path / "x.npy", lambda tmp: np.save(tmp, np.arange(3)))  # writers that add suffixes
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]


def test_atomic_write_of_a_directory_replaces_the_old_one(tmp_path):
    def folder(files):
        def write(tmp):
            tmp.mkdir()
            for name in files:
                (tmp / name).write_text(name)
        return write

    atomic_write(tmp_path / "ckpt", folder(["a", "b"]))
    atomic_write(tmp_path / "ckpt", folder(["c"]))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["c"]


def test_read_json_names_a_damaged_file(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 1')
    with pytest.raises(ValueError, match="state.json: not valid JSON"):
        read_json(tmp_path / "state.json")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes_its_configs_checks(preset):
    """The presets are built unchecked (checking imports torch, and the config module is imported
    by `lapo-fast --help`); every one must still pass the checks where it is used."""
    from lapo_fast.config import _PRESETS, check

    for cls, presets in _PRESETS.items():
        check(presets[preset])


def test_rundir_loads_typed_configs_and_says_what_to_run_first(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no lam run here .*lapo-fast lam"):
        run.config("lam")
    cfg = resolve(LAMConfig, "smoke")
    run.save_config("lam", cfg, data="somewhere")
    assert run.has("lam") and run.config("lam") == cfg
    with pytest.raises(FileNotFoundError, match="no checkpoint yet"):
        run.load_lam()
    assert str(run) == str(tmp_path) and (tmp_path / "x").parent == tmp_path  # a path wherever one goes
    assert RunDir(run).path == tmp_path


def test_rundir_loads_a_ppo_folder_as_the_config_it_holds(tmp_path):
    """A fine-tuning run under any --name loads as a FinetuneConfig (its policy is a DecodedPolicy);
    a PPO run as a PPOConfig; a stage-1 folder must hold a LAMConfig."""
    run = RunDir(tmp_path)
    run.save_config("ft2", resolve(FinetuneConfig, "smoke"))
    run.save_config("ppo", resolve(PPOConfig, "smoke"))
    assert type(run.config("ft2")) is FinetuneConfig and type(run.config("ppo")) is PPOConfig
    run.save_config("lam", resolve(PPOConfig, "smoke"))
    with pytest.raises(ValueError, match="holds a PPOConfig, expected a LAMConfig"):
        run.config("lam")


@pytest.mark.parametrize("stage", [s for s in STAGES if s.config is not None], ids=lambda s: s.name)
def test_every_setting_has_a_flag_with_its_help_and_the_presets_value(stage, capsys):
    """Each stage command's --help (train's for the stages it alone runs) lists every setting with
    its help text and the asked-for preset's value."""
    cls = stage.config
    for f in fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    prefix = "" if stage.command else f"{stage.name}."
    for preset in PRESETS:
        with pytest.raises(SystemExit) as e:
            main([stage.name if stage.command else "train", "--preset", preset, "--help"])
        assert e.value.code == 0
        out = " ".join("".join(c for c in capsys.readouterr().out if c not in "│╭╮╰╯─").split())
        for f in fields(cls):
            assert f"--{prefix}{f.name.replace('_', '-')}" in out, f.name
            assert " ".join(f.metadata["help"].split()[:3]) in out, f.name
        if cls is LAMConfig:  # the preset's own value is the default shown
            assert f"(default: {resolve(cls, preset).steps})" in out


def test_checkpoints_load_onto_the_cpu_whatever_device_saved_them(tmp_path, monkeypatch):
    """A GPU run's optimiser state must resume on a CPU (and each rank must not load onto cuda:0)."""
    import torch

    from lapo_fast.runtime.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, 1, model, opt)
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real(*a, **k))
    load_checkpoint(path, torch.nn.Linear(3, 2), torch.optim.AdamW(model.parameters()))
    assert seen and all(m == "cpu" for m in seen)


@pytest.mark.parametrize("torchrun", [True, False])
def test_the_process_group_waits_for_long_single_rank_work(monkeypatch, torchrun):
    """Rank 0 may decode a dataset alone for longer than the collectives' default 10 minutes, under
    torchrun (its agent's store) and in a group described by hand (our store, its join timeout apart)."""
    import torch.distributed as dist

    from lapo_fast.runtime import distributed

    got, stores = {}, []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    else:
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: got.update(kw, backend=backend))
    monkeypatch.setattr(dist, "TCPStore", lambda *a, **kw: stores.append(kw["timeout"]) or "store")
    distributed.init()
    assert got["timeout"].total_seconds() >= 3600
    if not torchrun:
        assert got["store"] == "store" and stores[0].total_seconds() == 300  # joining: minutes, not hours


def test_threads_follow_the_cpus_this_process_may_use():
    """A job limited to some cores (SLURM, taskset) gets that many threads by default, not the node's."""
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {0}); "
            "from lapo_fast.machine import available_cpus; from lapo_fast.envs import ProcgenVecEnv; "
            "from lapo_fast.ops import vq; env = ProcgenVecEnv('starpilot', 4, seed=0); "
            "print(available_cpus(), env.num_threads, vq._CORES); env.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1", "1"]


def test_a_runs_share_of_the_cores_is_its_threads_default(monkeypatch):
    """LAPO_FAST_CPUS (what a local sweep gives each parallel run) caps the default threads; a bad
    value names the variable."""
    from lapo_fast.machine import available_cpus

    monkeypatch.setenv("LAPO_FAST_CPUS", "1")
    assert available_cpus() == 1
    monkeypatch.setenv("LAPO_FAST_CPUS", "999")
    assert available_cpus() == len(__import__("os").sched_getaffinity(0))  # never more than the affinity
    monkeypatch.setenv("LAPO_FAST_CPUS", "half")
    with pytest.raises(ValueError, match="LAPO_FAST_CPUS='half': must be a whole number of cores"):
        available_cpus()
