"""The stage registry is the one list of stages: the CLI's commands, `train`'s settings namespaces
and order, and RunDir's config types come from it; a stage added to it is a command."""

import dataclasses

import pytest

from lapo_fast import pipeline, registry
from lapo_fast.cli import build_parser, main
from lapo_fast.config import FinetuneConfig, LAMConfig, PPOConfig
from lapo_fast.registry import COMMANDS, STAGES, RunConfig, Stage, StageContext, folder_config


def test_the_commands_and_trains_settings_are_the_registrys():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {s.name for s in STAGES if s.command} <= commands
    assert commands - set(COMMANDS) == {"envs", "collect", "data", "check-reference", "selftest", "train", "sweep",
                                        "aggregate"}
    assert [f.name for f in dataclasses.fields(RunConfig)] == [s.name for s in STAGES if s.config and s.settings]
    assert folder_config("lam") is LAMConfig and folder_config("demo") is PPOConfig
    assert folder_config("finetune") is FinetuneConfig and folder_config("my-ppo") is PPOConfig
    for s in STAGES:
        assert callable(s.runner()), s.name  # every record points at a run function that exists


def test_train_runs_the_registrys_stages_in_order(tmp_path, monkeypatch, capsys):
    """`train` calls each record's run function in the registry's order, with its config and one
    context (the dataset it recorded, the game); nothing else decides the order."""
    calls = []

    def fake(ctx, cfg):
        calls.append((ctx.env, ctx.data.name, ctx.train, type(cfg).__name__ if cfg is not None else None))
        return "done"

    fakes = tuple(dataclasses.replace(s, run=f"{__name__}:_FAKE") for s in STAGES)
    monkeypatch.setattr(registry, "STAGES", fakes)
    monkeypatch.setattr(pipeline, "STAGES", fakes)  # (imported above: its own STAGES is the real one)
    monkeypatch.setitem(globals(), "_FAKE", fake)
    assert main(["train", "--env", "coinrun", "--preset", "smoke", "--out", str(tmp_path / "run")]) == 0
    assert [c[3] for c in calls] == [None if s.config is None else s.config.__name__ for s in STAGES]
    assert all(c[:3] == ("coinrun", "train", True) for c in calls)
    out = capsys.readouterr().out
    assert [line[3:] for line in out.splitlines() if line.startswith("== ")] == [s.name for s in STAGES]


def test_a_new_record_is_a_command_with_its_settings_flags(tmp_path, monkeypatch, capsys):
    """What docs/stages.md promises: a record naming a config class and a run function makes
    `lapo-fast <name>` with one flag per setting, the preset applied, and the run called once."""
    seen = []

    def hello(ctx: StageContext, cfg) -> str:
        seen.append((ctx.run.path, ctx.data, cfg.steps, cfg.impala_scale))
        return "hello"

    monkeypatch.setitem(globals(), "_HELLO", hello)
    record = Stage("hello", LAMConfig, f"{__name__}:_HELLO", "a stage added in a test", inputs=(registry.DATA,))
    monkeypatch.setitem(COMMANDS, "hello", record)
    (tmp_path / "d").mkdir()
    assert main(["hello", "--data", str(tmp_path / "d"), "--out", str(tmp_path), "--preset", "smoke", "--steps",
                 "3"]) == 0
    assert len(seen) == 1 and seen[0][0] == tmp_path and seen[0][1] == tmp_path / "d" and seen[0][2:] == (3, 1)
    assert "hello: hello" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["hello", "--out", str(tmp_path)])  # a required input missing: tyro names it
    assert e.value.code == 2 and "--data" in capsys.readouterr().err


@pytest.mark.parametrize("name,config,run,error", [
    ("my-probe", LAMConfig, "m:run", "must be a Python identifier .*use e.g. 'my_probe'"),
    ("class", LAMConfig, "m:run", "must be a Python identifier"),
    ("probe", dict, "m:run", "must be a @dataclass subclassing lapo_fast.config.StageConfig"),
    ("probe", LAMConfig, "lapo_fast.stages.probe.run", "must be 'module:function'"),
])
def test_a_record_that_breaks_a_stage_rule_is_refused_when_made(name, config, run, error):
    with pytest.raises((ValueError, TypeError), match=error):
        Stage(name, config, run, "a stage that breaks a rule")


def test_every_stage_config_says_how_far_a_finished_run_goes():
    """The resume check reads planned_steps (not a `steps` field): stages 1-2 their steps, PPO its
    updates, the rest None (no step checkpoints)."""
    from lapo_fast.config import BCConfig, DecodeConfig

    assert LAMConfig(steps=7).planned_steps() == 7 and BCConfig(steps=9).planned_steps() == 9
    assert PPOConfig(env_steps=1000, num_envs=4, rollout=32, minibatches=2).planned_steps() == 7  # 7.8: floored
    # The reference's ppo.train: num_updates = steps // batch_size (4M / (64 x 64) -> 976, not 977).
    assert FinetuneConfig().planned_steps() == 976
    assert DecodeConfig().planned_steps() is None
