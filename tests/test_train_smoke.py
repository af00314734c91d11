"""`lapo-fast train` end to end with the smoke preset: every stage runs, the report says what each
measured, and a second call resumes instead of redoing work."""

import json

import pytest

from lapo_fast.cli import main
from lapo_fast.runtime.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "starpilot"
    assert main(["train", "--env", "starpilot", "--preset", "smoke", "--out", str(run),
                 "--decode.labelled", "4", "8", "--decode.deploy", "8"]) == 0
    return run


def test_every_stage_wrote_its_results(smoke_run):
    run = smoke_run
    for stage in ("demo", "lam", "bc", "finetune"):
        assert latest_checkpoint(run / stage) is not None, stage
    assert (run / "data" / "train" / "manifest.json").exists() and (run / "data" / "test" / "manifest.json").exists()
    report = json.loads((run / "report.json").read_text())
    assert report["stage1"]["test_fdm_loss"] is not None and report["stage1"]["test_fdm_loss_shuffled"] is not None
    assert report["stage1"]["probe"]["chance"] == pytest.approx(1 / 15)
    assert [e["labelled"] for e in report["decode"]] == [4, 8]
    assert set(report["eval"]) == {"demonstrator", "finetuned", "decoded (8 labels)"}
    assert set(report["online"]) == {"LAPO fine-tuned (frozen trunk)", "PPO from scratch (demo)"}
    for plot in report["plots"].values():
        assert (run / plot).stat().st_size > 1000, plot
    md = (run / "report.md").read_text()
    for section in ("Stage 1", "Latent probe", "Stage 2", "decoder sweep", "fine-tuning vs PPO from scratch",
                    "Evaluation", "Wall time"):
        assert section in md, section
    saved = json.loads((run / "config.lam.json").read_text())
    assert saved["preset"] == "smoke" and saved["config"]["steps"] == 20


def test_rerun_resumes_instead_of_redoing(smoke_run, capsys):
    before = {stage: latest_checkpoint(smoke_run / stage).stat().st_mtime_ns
              for stage in ("demo", "lam", "bc", "finetune")}
    evals = (smoke_run / "eval" / "results.json").read_text()
    assert main(["train", "--env", "starpilot", "--preset", "smoke", "--out", str(smoke_run),
                 "--decode.labelled", "4", "8", "--decode.deploy", "8"]) == 0
    after = {stage: latest_checkpoint(smoke_run / stage).stat().st_mtime_ns for stage in before}
    assert before == after  # nothing retrained
    assert json.loads((smoke_run / "eval" / "results.json").read_text()) == json.loads(evals)


def test_rerun_with_other_settings_is_refused_before_anything_is_recorded(smoke_run, capsys):
    recorded = (smoke_run / "config.lam.json").read_text()
    with pytest.raises(SystemExit) as e:
        main(["train", "--env", "starpilot", "--preset", "smoke", "--out", str(smoke_run),
              "--decode.labelled", "4", "8", "--decode.deploy", "8", "--lam.lr", "0.05"])
    assert e.value.code == 2
    assert "lam was trained with lr=0.0003; this run asks for lr=0.05" in capsys.readouterr().err
    assert (smoke_run / "config.lam.json").read_text() == recorded  # what ran is still what is recorded


def test_the_no_vq_ablation_runs_end_to_end(tmp_path):
    """lam.quantize=false (the paper's Figure 3 ablation): the IDM's continuous latent feeds the FDM,
    and stages 2 and 3 follow on it."""
    from lapo_fast.rundir import RunDir

    run = tmp_path / "novq"
    assert main(["train", "--env", "starpilot", "--preset", "smoke", "--out", str(run), "--lam.no-quantize",
                 "--decode.labelled", "4", "8", "--decode.deploy", "8"]) == 0
    idm = RunDir(run).load_lam().idm
    assert idm.vq is None and not any(k.startswith("vq.") for k in idm.state_dict())
    for stage in ("lam", "bc", "finetune"):
        assert latest_checkpoint(run / stage) is not None, stage
    report = json.loads((run / "report.json").read_text())
    assert report["stage1"]["quantize"] is False and set(report["eval"]) >= {"finetuned", "decoded (8 labels)"}
    assert "no vector quantisation (the ablation" in (run / "report.md").read_text()


def test_the_docs_example_stage_runs_as_written(smoke_run, tmp_path, monkeypatch, capsys):
    """docs/stages.md's three blocks -- config, module, record -- are a working stage: `lapo-fast probe`
    runs on a trained run, writes its results, and `RunDir(RUN).config("probe")` reads its settings."""
    import re
    import sys
    from pathlib import Path

    from lapo_fast import registry
    from lapo_fast.rundir import RunDir

    doc = (Path(__file__).resolve().parent.parent / "docs" / "stages.md").read_text()
    config, module, record = re.findall(r"```python\n(.*?)```", doc, re.S)
    # The config block goes where the docs put it (lapo_fast.config); here, at the top of the module.
    source = config + module.replace("from lapo_fast.config import ProbeConfig\n", "")
    (tmp_path / "docs_probe_stage.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = eval(record.replace("lapo_fast.stages.probe:run", "docs_probe_stage:run"),
                 {"Stage": registry.Stage, "ProbeConfig": _import("docs_probe_stage").ProbeConfig,
                  "DATA": registry.DATA, "LOOP": registry.LOOP})
    monkeypatch.setitem(registry.COMMANDS, "probe", stage)
    monkeypatch.setitem(registry.BY_NAME, "probe", stage)
    assert main(["probe", "--data", str(smoke_run / "data" / "train"), "--out", str(smoke_run), "--labels", "16",
                 "--held-out", "8"]) == 0
    assert "probe: results in" in capsys.readouterr().out
    saved = RunDir(smoke_run).config("probe")
    assert type(saved).__name__ == "ProbeConfig" and (saved.labels, saved.held_out) == (16, 8)
    result = json.loads(RunDir(smoke_run).results("probe").read_text())
    assert result and all(isinstance(k, str) for k in result)
    del sys.modules["docs_probe_stage"]


def _import(name):
    import importlib

    return importlib.import_module(name)
