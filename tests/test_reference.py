"""Fidelity: our models and training steps reproduce the reference LAPO code's own numbers."""

from dataclasses import replace
from pathlib import Path

import pytest

import lapo_fast.eval.reference as reference
from lapo_fast.cli import main
from lapo_fast.config import BCConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lapo_reference"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "lapo_reference"


def _subset(tmp_path, *names) -> Path:
    for name in names:
        (tmp_path / name).symlink_to(FIXTURES / name)
    return tmp_path


def test_every_output_matches_the_reference_code():
    report = reference.check_reference(FIXTURES)
    failed = [r for r in report.rows if not r[4]]
    assert not failed and not report.skipped, report.table()
    checked = {r[0] for r in report.rows}
    assert checked == {"idm_small.npz", "fdm_small.npz", "policy_small.npz", "stage1_2steps_small.npz",
                       "stage2_step_small.npz", "stage3_policy_small.npz"}
    assert len(report.rows) > 270  # every output, parameter and buffer the files hold


def test_the_cli_exits_zero_when_everything_matches(tmp_path, capsys):
    assert main(["check-reference", str(_subset(tmp_path, "policy_small.npz"))]) == 0
    assert "3 of 3 outputs match the reference code" in capsys.readouterr().out


def test_a_different_schedule_is_caught(tmp_path, monkeypatch):
    """The check can fail: stage 2 warmed up from 0.1 x lr (the reference starts at 0.01 x lr)."""
    real = reference.resolve
    monkeypatch.setattr(reference, "resolve", lambda cls, preset, *a: (
        replace(real(cls, preset, *a), warmup_from=0.1) if cls is BCConfig else real(cls, preset, *a)))
    report = reference.check_reference(_subset(tmp_path, "idm_small.npz", "policy_small.npz", "stage2_step_small.npz"))
    failed = {r[1] for r in report.rows if not r[4]}
    assert "lr" in failed and any(f.startswith("param_after/") for f in failed)


def test_an_unreadable_fixture_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no reference fixtures"):
        reference.check_reference(tmp_path)


@pytest.mark.skipif(not (SHARED / "stage3_policy_small.npz").exists(), reason="shared fixtures not here")
def test_the_shared_fixture_folder_passes(capsys):
    assert main(["check-reference", str(SHARED)]) == 0


GRAD = "output/step0/grad_pre_clip/idm.conv_stack.1.res_block0.conv0.weight"


@pytest.mark.parametrize("tamper", [lambda g: g * 1.05, lambda g: -g], ids=["scaled by 1.05", "sign flipped"])
def test_one_tampered_gradient_fails_the_check(tmp_path, capsys, tamper):
    """The check reads the stored gradients: 5% off in one IDM conv's gradient, or its sign flipped,
    is a mismatch (the parameters after Adam's first step, within 2 x lr, cannot see either)."""
    import numpy as np

    folder = _subset(tmp_path, "idm_small.npz", "fdm_small.npz")
    d = dict(np.load(FIXTURES / "stage1_2steps_small.npz"))
    d[GRAD] = tamper(d[GRAD])
    np.savez(folder / "stage1_2steps_small.npz", **d)
    assert main(["check-reference", str(folder)]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")]
    assert failed and all("step0/grad_pre_clip/idm.conv_stack.1.res_block0.conv0.weight" in f for f in failed)


SEED7 = Path(__file__).resolve().parent / "fixtures" / "lapo_reference_seed7"


def test_a_near_tie_is_reported_as_such_and_never_hides_a_real_error(tmp_path):
    """Seed 7's fixtures hold an activation at a ReLU's boundary that our layout's round-off flips:
    the check tells it (the rows match in the reference's layout) from a wrong gradient."""
    import numpy as np

    report = reference.check_reference(SEED7)
    assert report.ok and report.near_ties
    tied = {report.rows[i][1] for i in report.near_ties}
    assert any(name.startswith("step0/grad_pre_clip/idm.") for name in tied)
    assert not any(name.startswith("step0/grad_pre_clip/wm.") for name in tied)  # the FDM's are not affected

    for name in ("idm_small.npz", "fdm_small.npz"):
        (tmp_path / name).symlink_to(SEED7 / name)
    d = dict(np.load(SEED7 / "stage1_2steps_small.npz"))
    d[GRAD] = d[GRAD] * 1.05  # one IDM gradient 5% off, on top of the near-tie
    np.savez(tmp_path / "stage1_2steps_small.npz", **d)
    report = reference.check_reference(tmp_path)
    failed = [r[1] for r in report.rows if not r[4]]
    assert failed == ["step0/grad_pre_clip/idm.conv_stack.1.res_block0.conv0.weight"]


def test_stage_3b_clips_as_the_reference_and_a_heads_only_clip_is_caught(tmp_path, monkeypatch):
    """Two PPO updates against the reference's: the norm its clip sees counts the trunk's and the
    decoder's gradients (outside the optimiser, never cleared). Clipping over the trained layers
    only (what stage 3b did before) gives another norm, and the check says so."""
    folder = _subset(tmp_path, "stage3_policy_small.npz")
    report = reference.check_reference(folder)
    rows = {r[1]: r for r in report.rows}
    assert report.ok and rows["ppo/update1/clip_total_norm"][2] <= 1e-5
    assert any(name.startswith("ppo/grad_after/conv_stack.") for name in rows)
    real = reference.ppo_step
    monkeypatch.setattr(reference, "ppo_step", lambda policy, optimizer, clip_params, *a: real(
        policy, optimizer, [p for g in optimizer.param_groups for p in g["params"]], *a))
    failed = {r[1] for r in reference.check_reference(folder).rows if not r[4]}
    assert {"ppo/update0/clip_total_norm", "ppo/update1/clip_total_norm"} <= failed
