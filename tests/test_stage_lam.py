"""Stage 1 end to end on a tiny dataset: runs, logs, checkpoints, and resume == uninterrupted."""

import json

import pytest
import torch

from lapo_fast.cli import main
from lapo_fast.config import LAMConfig, resolve
from lapo_fast.data import DatasetWriter
from lapo_fast.stages.checkpoint import load_checkpoint
from lapo_fast.stages.lam import build_model, load_lam, train_lam


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ds"
    g = torch.Generator().manual_seed(0)
    with DatasetWriter(path) as w:
        for e in range(4):
            frames = (torch.rand(20, 64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
            w.add_episode(frames)
    return path


def _weights(path):
    model = build_model(resolve(LAMConfig, "smoke", {"steps": 6}))
    load_checkpoint(path, model)
    return model.state_dict()


def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    cfg = resolve(LAMConfig, "smoke", {"steps": 6, "checkpoint_every": 3, "log_every": 3})
    straight = train_lam(tiny_dataset, tmp_path / "a", cfg, progress=False)
    interrupted = train_lam(tiny_dataset, tmp_path / "b", cfg, stop_after=3, progress=False)
    assert interrupted.name == "step-00000003"
    resumed = train_lam(tiny_dataset, tmp_path / "b", cfg, progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in (tmp_path / "a" / "lam" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [3, 6] and all(m["perplexity"] >= 1 for m in lines)
    saved = json.loads((tmp_path / "a" / "lam" / "config.json").read_text())
    assert saved["config"]["steps"] == 6 and "torch" in saved["versions"]
    assert isinstance(load_lam(tmp_path / "a").idm.vq.codebook, torch.Tensor)


def test_cli_runs_stage1_with_a_preset(tiny_dataset, tmp_path, capsys):
    assert main(["lam", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--preset", "smoke",
                 "--steps", "2", "--checkpoint-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "preset 'smoke' (asked for)" in out and "step-00000002" in out


def test_bad_config_and_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no setting"):
        resolve(LAMConfig, "smoke", {"stepz": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        resolve(LAMConfig, "huge")
    with pytest.raises(ValueError, match="vq_decay"):
        resolve(LAMConfig, "smoke", {"vq_decay": 1.5})
    with pytest.raises(FileNotFoundError, match="lapo-fast lam"):
        load_lam(tmp_path / "nothing")
