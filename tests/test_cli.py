"""The lapo-fast command line: help, version, envs, errors, and the data commands."""

import json

import pytest

from lapo_fast import __version__
from lapo_fast.cli import main
from lapo_fast.envs import GAMES


def test_version_help_and_envs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 0 and "collect" in capsys.readouterr().out
    assert main(["envs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(GAMES)
    assert "memory" in next(line for line in lines if line.startswith("maze"))


def test_train_rejects_unknown_games_and_bad_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--env", "pong"])
    assert e.value.code == 2 and "unknown Procgen game" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--env", "starpilot", "--preset", "smoke", "--lam.stepz", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--lam.stepz" in err and "--lam.steps" in err  # what it is, and what was meant
    with pytest.raises(SystemExit) as e:
        main(["train", "--env", "starpilot", "--preset", "smoke", "--lam.steps", "0"])
    assert e.value.code == 2 and "LAMConfig.steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--env", "starpilot", "--preset", "huge"])
    assert e.value.code == 2 and "unknown preset 'huge'" in capsys.readouterr().err


def test_stages_without_their_inputs_say_what_to_run_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--env", "starpilot", "--out", str(tmp_path), "--preset", "smoke"])
    assert e.value.code == 2 and "no bc run here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", "--out", str(tmp_path / "none")])
    assert e.value.code == 2 and "no such run directory" in capsys.readouterr().err


def test_collect_then_info_and_verify(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["collect", "--env", "starpilot", "--frames", "200", "--num-envs", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] >= 200 and info["source"]["env"] == "starpilot"
    assert main(["data", "verify", str(out)]) == 0
    assert "all checksums match" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["data", "verify", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "no dataset manifest" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    from lapo_fast.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "sweep", "aggregate", "lam", "bc", "collect"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert "usage: lapo-fast " + name in capsys.readouterr().out
