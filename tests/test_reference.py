"""Fidelity: our models and training steps reproduce the reference LAPO code's own numbers."""

from dataclasses import replace
from pathlib import Path

import pytest

import lapo_fast.fidelity.reference as reference
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
                       "stage2_step_small.npz", "stage3_policy_small.npz", "stage1_train_small.npz",
                       "stage2_train_small.npz", "stage3_train_small.npz"}
    assert len(report.rows) > 3_200  # every output, parameter and buffer the files hold
    names = {r[1] for r in report.rows}
    # every term observable: each step's gradients, Adam's state, the replay, the clips, GAE, labels
    for expected in ("step4/grad_post_clip/wm.final_conv.3.weight", "adam/exp_avg_sq/idm.fc.weight",
                     "replay/param_after/idm.conv_stack.0.conv.weight", "step4/grad_stepped/fc.weight",
                     "ppo/update3/grad_pre_clip/value_head.weight", "gae/adv", "labels/latents",
                     "step0/zero-gradient (bias before BatchNorm)/wm.down.0.conv.bias"):
        assert expected in names, expected


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
    # at step 0, that tensor alone (step 1 starts where the stored gradients, replayed, lead: elsewhere)
    step0 = [f for f in failed if " step0/" in f]
    assert step0 and all("idm.conv_stack.1.res_block0.conv0.weight" in f for f in step0), step0
    assert any("step0/grad_pre_clip/idm.conv_stack.1.res_block0.conv0.weight" in f for f in failed)


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
    assert failed == [f"{row}/idm.conv_stack.1.res_block0.conv0.weight"
                      for row in ("step0/grad_pre_clip", "step0/grad_post_clip", "replay/param_after")]


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


TRAIN = ("stage1_train_small.npz", "stage2_train_small.npz", "stage3_train_small.npz")


def test_the_training_fixtures_make_every_clip_fire():
    """Stage 1's clip (2) fires on every step, PPO's ratio and value clips on some samples, and the
    reward scaling's clip (10) once: a mutant changing any of them changes what is stored."""
    import numpy as np

    s1, s3 = np.load(FIXTURES / TRAIN[0]), np.load(FIXTURES / TRAIN[2])
    assert all(float(s1[f"output/step{i}/grad_norm"]) > 2 for i in range(5))
    assert all(0 < float(s3[f"output/ppo/update{u}/clipfrac"]) < 1 for u in range(4))
    assert (np.abs(s3["output/rewards/scaled"]) == 10).any()
    lrs = [float(s3[f"output/ppo/lr/{g}"]) for g in ("policy_head", "value_head")]
    assert lrs[0] != lrs[1]  # the heads' learning rates differ at the PPO updates' env step


def test_the_replay_sees_an_optimiser_setting_adams_moves_would_hide(tmp_path, monkeypatch):
    """AdamW's weight decay moves a parameter by lr x 1e-2 x p a step (~1e-6 of it): far inside
    Adam's +-lr, but our optimiser replaying the reference's own gradients ends elsewhere."""
    import lapo_fast.fidelity.training as train

    real = train.resolve
    monkeypatch.setattr(train, "resolve", lambda cls, preset, *a: (
        replace(real(cls, preset, *a), weight_decay=0.0) if cls is train.LAMConfig else real(cls, preset, *a)))
    report = reference.check_reference(_subset(tmp_path, TRAIN[0]))
    failed = {r[1] for r in report.rows if not r[4]}
    assert failed and all(f.startswith(("replay/param_after/", "param_after/")) for f in failed), failed
    assert any(f.startswith("replay/") for f in failed)


def test_the_measured_roundoff_never_hides_a_wrong_gradient(tmp_path, capsys):
    """Stage 1's bounds add 3x the round-off measured between our two memory layouts: a stored
    gradient 5% off at step 3 still fails, alone."""
    import numpy as np

    key = "output/step3/grad_pre_clip/wm.up.1.conv.weight"
    d = dict(np.load(FIXTURES / TRAIN[0]))
    d[key] = d[key] * 1.05
    np.savez(tmp_path / TRAIN[0], **d)
    assert main(["check-reference", str(tmp_path)]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")]
    assert failed and all("wm.up.1.conv.weight" in f for f in failed), failed  # and only that tensor
    assert any("step3/grad_pre_clip/" in f for f in failed)


def test_zero_gradient_parameters_are_found_from_the_model():
    """The conv biases right before a BatchNorm (their true gradient is zero) are found by walking
    the FDM, and checked as zero gradients on both sides instead of Adam's round-off moves."""
    import lapo_fast.fidelity.training as train
    from lapo_fast.models import LapoFDM

    found = train._zero_gradient(LapoFDM(6, 128, width=2), "fdm.")
    assert found == {f"fdm.down.{i}.conv.bias" for i in range(5)} | {f"fdm.up.{i}.conv.bias" for i in range(6)}


MUTANTS = Path(__file__).resolve().parents[1] / "tools" / "reference_fixtures" / "mutants.py"


def _mutants():
    import importlib.util

    import sys

    spec = importlib.util.spec_from_file_location("mutants", MUTANTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_to_the_code_as_it_is(capsys):
    """The mutation harness's one-line mutants still find their lines (a refactor that moves one
    must update it, not silently drop it)."""
    mutants = _mutants()
    assert mutants.main(["--list"]) == 0
    assert len(mutants.MUTANTS) >= 40 and len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)


@pytest.mark.slow
def test_check_reference_kills_every_mutant(capsys):
    """~7 minutes on 2 cores: each mutant on a copy of the package through check-reference."""
    assert _mutants().main(["--jobs", "2"]) == 0, capsys.readouterr().out


@pytest.mark.slow
def test_fixtures_made_on_one_cpu_pass_on_another(tmp_path):
    """The shipped fixtures were made with AVX-512 kernels: checked with AVX2 ones (torch's and
    oneDNN's), as on another machine, every row still passes."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    code = "import sys; from lapo_fast.cli import main; sys.exit(main(['check-reference', sys.argv[1]]))"
    proc = subprocess.run([sys.executable, "-c", code, str(FIXTURES)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
