"""Run directories keep what the user made: a run's identity, settings that may not change under a
resume, outputs a kill interrupted, one process per run, damaged run files and checkpoints, Ctrl-C
and full disks."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import cli_error, write_dataset

from lapo_fast.cli import main
from lapo_fast.config import LAMConfig, resolve
from lapo_fast.data import FrameDataset
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.checkpoint import checkpoints, load_latest, save_checkpoint
from lapo_fast.runtime.runlog import RunLog, read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("faults") / "ds", episodes=3, length=12)


def _lam(data, out, *extra):
    return ["lam", "--data", str(data), "--out", str(out), "--preset", "smoke", *extra]


def test_a_run_refuses_another_game_dataset_or_model_shape(tmp_path):
    a = FrameDataset(write_dataset(tmp_path / "a", env="starpilot"))
    b = FrameDataset(write_dataset(tmp_path / "b", seed=1, env="starpilot"))
    run = RunDir(tmp_path / "run")
    run.claim("lam", resolve(LAMConfig, "smoke"), data=a)
    run.save_config("lam", resolve(LAMConfig, "smoke"))
    run.claim("lam", resolve(LAMConfig, "smoke"), data=a)  # the same: fine
    with pytest.raises(ValueError, match="is a run of starpilot, not coinrun: use a new --out"):
        run.claim(game="coinrun")
    with pytest.raises(ValueError, match=r"is a run of the dataset .*a \(manifest .*, not .*b \(manifest"):
        run.claim("lam", resolve(LAMConfig, "smoke"), data=b)
    with pytest.raises(ValueError, match="trained with fdm_width=8, this run asks for 12"):
        run.claim("lam", resolve(LAMConfig, "smoke", {"fdm_width": 12}), data=a)
    c = FrameDataset(write_dataset(tmp_path / "c", env="starpilot"))
    with pytest.raises(ValueError, match="holds starpilot episodes, not coinrun"):
        RunDir(tmp_path / "other").claim(game="coinrun", data=c)


def test_stages_refuse_a_run_of_another_game_before_working(tmp_path, capsys):
    RunDir(tmp_path).claim(game="starpilot")
    for argv in (["eval", "--env", "coinrun"], ["ppo", "--env", "coinrun", "--preset", "smoke"]):
        assert "not coinrun" in cli_error(argv + ["--out", str(tmp_path)], capsys)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 1, model)
    torch.nn.init.zeros_(model.weight)
    newest = save_checkpoint(tmp_path, 2, model)
    (newest / "model.safetensors").write_bytes(b"garbage")
    fresh = torch.nn.Linear(3, 2)
    path, state = load_latest(tmp_path, fresh)
    assert path.name == "step-00000001" and state["step"] == 1 and fresh.weight.abs().sum() > 0
    assert "step-00000002 is unreadable" in capsys.readouterr().out


def test_old_checkpoints_are_deleted_by_rename(tmp_path):
    model = torch.nn.Linear(3, 2)
    (tmp_path / ".trash-step-00000000").mkdir()  # what a kill during a delete leaves
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


def test_a_resumed_stage_refuses_other_settings_and_accepts_more_steps(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_lam(data, run, "--steps", "4", "--checkpoint-every", "2")) == 0
    err = cli_error(_lam(data, run, "--steps", "6", "--lr", "0.05"), capsys)
    assert "lam was trained with lr=0.0003; this run asks for lr=0.05" in err and "new --out" in err
    assert RunDir(run).config("lam").lr == 3e-4  # config.json not overwritten by the refused run
    err = cli_error(_lam(data, run, "--steps", "3"), capsys)
    assert "has already trained 4 steps, more than the 3 these settings ask for" in err
    assert main(_lam(data, run, "--steps", "6", "--checkpoint-every", "3", "--log-every", "1")) == 0  # may change
    assert RunDir(run).config("lam").steps == 6 and RunDir(run).checkpoint_step("lam") == 6


def test_a_resumed_ppo_run_refuses_another_lr(tmp_path, capsys):
    argv = ["ppo", "--env", "starpilot", "--out", str(tmp_path), "--preset", "smoke", "--env-steps", "64",
            "--num-envs", "2", "--rollout", "16"]
    assert main(argv) == 0
    assert "ppo was trained with lr=0.0005; this run asks for lr=0.05" in cli_error(argv + ["--lr", "0.05"], capsys)


def test_a_kill_during_the_final_probe_is_made_good_by_the_rerun(data, tmp_path, monkeypatch):
    import lapo_fast.stages.lam as lam
    from lapo_fast.stages.report import write_report

    cfg = resolve(LAMConfig, "smoke", {"steps": 4, "checkpoint_every": 4, "probe_labels": 8})

    def killed(*a, **k):
        raise KeyboardInterrupt  # what a kill -9 during the probe leaves: the last checkpoint, no probe.json

    monkeypatch.setattr(lam, "latent_probe", killed)
    with pytest.raises(KeyboardInterrupt):
        lam.train_lam(data, tmp_path, cfg, progress=False)
    run = RunDir(tmp_path)
    assert run.checkpoint_step("lam") == 4 and not run.probe.exists()
    monkeypatch.undo()
    lam.train_lam(data, tmp_path, cfg, progress=False)
    probe = json.loads(run.probe.read_text())
    assert 0 <= probe["accuracy"] <= 1
    assert "Latent probe: decoders from" in write_report(tmp_path).read_text()


def test_a_dataset_with_one_window_says_why_it_has_no_probe(tmp_path):
    from lapo_fast.stages.lam import train_lam
    from lapo_fast.stages.report import write_report

    one = write_dataset(tmp_path / "one", episodes=1, length=3)
    train_lam(one, tmp_path / "run", resolve(LAMConfig, "smoke", {"steps": 2, "checkpoint_every": 1}), progress=False)
    assert "window" in json.loads(RunDir(tmp_path / "run").probe.read_text())["skipped"]
    assert "Latent probe: not run (" in write_report(tmp_path / "run").read_text()


HOLD = textwrap.dedent("""
    import sys, time
    from lapo_fast.runtime.lock import folder_lock
    with folder_lock(sys.argv[1], "lapo-fast lam (test holder)"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_second_process_on_a_run_is_refused_naming_the_holder(data, tmp_path, capsys):
    from lapo_fast.runtime.lock import FolderInUse, folder_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = cli_error(_lam(data, tmp_path / "run"), capsys)
        assert f"is in use by pid {holder.pid} (lapo-fast lam (test holder))" in err
        assert not (tmp_path / "run" / "lam").exists()  # refused before any work
        with pytest.raises(FolderInUse):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        holder.kill()  # a holder that dies releases the lock
        holder.wait()
    with folder_lock(tmp_path / "run"), folder_lock(tmp_path / "run"):  # re-entrant in one process
        pass
    assert main(_lam(data, tmp_path / "run", "--steps", "2")) == 0


@pytest.mark.parametrize("content", ['{"type": "LAMConfig"}', "[1, 2]", '{"type": "LAMConfig", "config": 3}'])
def test_a_damaged_stage_config_is_one_line_naming_it(data, tmp_path, capsys, content):
    run = RunDir(tmp_path)
    run.save_config("lam", resolve(LAMConfig, "smoke"))
    run.config_path("lam").write_text(content)
    err = cli_error(["umap", "--data", str(data), "--out", str(tmp_path), "--preset", "smoke"], capsys)
    assert "lam/config.json: not a lapo-fast config" in err


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_is_named(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = RunLog(path, None, "lam")
    for step in (1, 2):
        log.log({"step": step, "loss": 0.5})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert f"{path}: dropped its torn last line 3" in capsys.readouterr().out
    RunLog(path, None, "lam").truncate(2)  # resume repairs the file
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 2
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + '{"step": 2, "lo\n' + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is damaged"):
        read_metrics(path)


def test_a_torn_metrics_line_does_not_block_resume_or_report(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_lam(data, run, "--steps", "4", "--checkpoint-every", "2", "--log-every", "1")) == 0
    with open(run / "lam" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "fdm')
    assert main(["report", "--out", str(run)]) == 0
    assert main(_lam(data, run, "--steps", "6", "--checkpoint-every", "2", "--log-every", "1")) == 0
    assert [r["step"] for r in RunDir(run).read_metrics("lam") if "fdm_loss" in r] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_during_a_stage_is_one_line_and_exit_130(data, tmp_path):
    run = tmp_path / "run"
    # As from a terminal: a job started in the background (CI's shell) inherits SIGINT ignored.
    proc = subprocess.Popen([sys.executable, "-m", "lapo_fast.cli", *_lam(data, run, "--steps", "100000",
                             "--log-every", "1")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (run / "lam" / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.rstrip().endswith("lapo-fast: stopped; rerun the same command to resume")


@pytest.mark.parametrize("command", ["collect", "train"])
def test_ctrl_c_in_collect_and_train_is_one_line(tmp_path, capsys, monkeypatch, command):
    import lapo_fast.data as data_pkg
    import lapo_fast.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_pkg, "collect", interrupted)
    monkeypatch.setattr(pipeline, "run_all", interrupted)
    argv = {"collect": ["collect", "--env", "starpilot", "--frames", "10", "--out", str(tmp_path / "d")],
            "train": ["train", "--env", "starpilot", "--preset", "smoke", "--out", str(tmp_path / "r")]}[command]
    with pytest.raises(SystemExit) as e:
        try:
            main(argv)
        except KeyboardInterrupt:  # (raised on, it would stop pytest itself)
            pytest.fail("KeyboardInterrupt escaped main")
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "lapo-fast: stopped; rerun the same command to resume"


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_full_disk_during_a_checkpoint_is_the_disk_full_error(tmp_path, monkeypatch, writer):

    import lapo_fast.runtime.checkpoint as checkpoint
    from safetensors import SafetensorError

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    kept = save_checkpoint(tmp_path, 1, model, optimizer)

    def full(*a, **k):  # the words each library uses for ENOSPC (measured on a full tmpfs)
        if writer == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    if writer == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", full)
    else:  # torch's words do not say "disk full": the free space does
        monkeypatch.setattr(torch, "save", full)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 100))
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path, 2, model, optimizer)
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in checkpoints(tmp_path)] == [kept.name]  # the one already written is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]  # and no half-written temp folder


def test_a_real_full_disk_during_a_checkpoint(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(OSError) as e:
            save_checkpoint(mount, 1, torch.nn.Linear(512, 512))  # 1 MB of weights into 256 KB
        assert e.value.errno == errno.ENOSPC
        assert not list(mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_resume_without_config_json_is_checked_against_the_checkpoints_settings(data, tmp_path, capsys):
    """config.json deleted mid-run: the checkpoint carries the settings it was trained with, so the
    resume is still refused another lr, and a resume with the same settings writes config.json again."""
    run = tmp_path / "run"
    assert main(_lam(data, run, "--steps", "4", "--checkpoint-every", "2")) == 0
    RunDir(run).config_path("lam").unlink()
    err = cli_error(_lam(data, run, "--steps", "6", "--checkpoint-every", "2", "--lr", "0.001"), capsys)
    assert "lam was trained with lr=0.0003; this run asks for lr=0.001" in err
    assert main(_lam(data, run, "--steps", "6", "--checkpoint-every", "2")) == 0
    assert RunDir(run).config("lam").lr == 3e-4 and RunDir(run).checkpoint_step("lam") == 6
