"""Nothing silently wrong, round two: settings that zeroed gradients or changed under a resume,
outputs lost to a kill, two processes on one run, degenerate sizes, overflowing VQ inputs, a
cache truncated mid-run, damaged run files, Ctrl-C and full disks. Each test failed before its fix."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lapo_fast.cli import main
from lapo_fast.config import LAMConfig, PPOConfig, resolve
from lapo_fast.data import DatasetError, DatasetWriter, FrameDataset
from lapo_fast.ops import NonFiniteError, vq_ema
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.checkpoint import checkpoints, save_checkpoint
from lapo_fast.runtime.runlog import RunLog, read_metrics


def _dataset(path, episodes=3, length=12, seed=0):
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, source={"env": "starpilot"}) as w:
        for _ in range(episodes):
            w.add_episode(rng.integers(0, 255, (length, 64, 64, 3), dtype=np.uint8),
                          action=rng.integers(0, 15, length))
    return Path(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("faults") / "ds")


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("lapo-fast: error: ") and "Traceback" not in err, err
    return last


def _lam(data, out, *extra):
    return ["lam", "--data", str(data), "--out", str(out), "--preset", "smoke", *extra]


# 1. grad_clip 0 means no clipping in PPO too -------------------------------------------------------

def test_ppo_grad_clip_0_is_no_clipping_not_zero_gradients():
    from lapo_fast.models import LatentPolicy
    from lapo_fast.data import prepare_obs
    from lapo_fast.runtime.ppo import make_ppo_step, ppo_epochs

    torch.manual_seed(0)
    start = LatentPolicy(impala_scale=1)
    obs = torch.randint(0, 255, (16, 64, 64, 3), dtype=torch.uint8)
    batch = (torch.randint(0, 15, (16,)), torch.full((16,), -2.7), torch.randn(16), torch.randn(16), torch.randn(16))
    weights = {}
    for clip in (0.0, 1e9):  # 0 must train exactly as no clip at all
        policy = LatentPolicy(impala_scale=1)
        policy.load_state_dict(start.state_dict())
        params = list(policy.parameters())
        cfg = resolve(PPOConfig, "smoke", {"grad_clip": clip, "minibatches": 2, "epochs": 1})
        step = make_ppo_step(policy, torch.optim.Adam(params, lr=1e-3), params, cfg, torch.device("cpu"),
                             lambda frames, p=policy: p.features(prepare_obs(frames)))
        inputs = dict(zip(("obs", "actions", "old_logp", "adv", "ret", "old_value"), (obs, *batch)))
        ppo_epochs(step, cfg, inputs, torch.Generator().manual_seed(1), torch.device("cpu"))
        weights[clip] = policy.state_dict()
    moved = [k for k in weights[0.0] if not torch.equal(weights[0.0][k], start.state_dict()[k])]
    assert moved, "grad_clip=0 left every weight untouched (gradients zeroed)"
    for k in weights[0.0]:
        torch.testing.assert_close(weights[0.0][k], weights[1e9][k], rtol=0, atol=0, msg=k)


# 2. a resumed stage keeps its settings; config.json says what ran ----------------------------------

def test_a_resumed_stage_refuses_other_settings_and_accepts_more_steps(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_lam(data, run, "--steps", "4", "--checkpoint-every", "2")) == 0
    err = _cli_error(_lam(data, run, "--steps", "6", "--lr", "0.05"), capsys)
    assert "lam was trained with lr=0.0003; this run asks for lr=0.05" in err and "new --out" in err
    assert RunDir(run).config("lam").lr == 3e-4  # config.json not overwritten by the refused run
    err = _cli_error(_lam(data, run, "--steps", "3"), capsys)
    assert "has already trained 4 steps, more than the 3 these settings ask for" in err
    assert main(_lam(data, run, "--steps", "6", "--checkpoint-every", "3", "--log-every", "1")) == 0  # may change
    assert RunDir(run).config("lam").steps == 6 and RunDir(run).checkpoint_step("lam") == 6


def test_a_resumed_ppo_run_refuses_another_lr(tmp_path, capsys):
    argv = ["ppo", "--env", "starpilot", "--out", str(tmp_path), "--preset", "smoke", "--env-steps", "64",
            "--num-envs", "2", "--rollout", "16"]
    assert main(argv) == 0
    assert "ppo was trained with lr=0.0005; this run asks for lr=0.05" in _cli_error(argv + ["--lr", "0.05"], capsys)


# 3. a stage is finished only when all its outputs exist ----------------------------------------------

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

    one = _dataset(tmp_path / "one", episodes=1, length=3)
    train_lam(one, tmp_path / "run", resolve(LAMConfig, "smoke", {"steps": 2, "checkpoint_every": 1}), progress=False)
    assert "window" in json.loads(RunDir(tmp_path / "run").probe.read_text())["skipped"]
    assert "Latent probe: not run (" in write_report(tmp_path / "run").read_text()


# 4. one process per run directory ------------------------------------------------------------------

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
        err = _cli_error(_lam(data, tmp_path / "run"), capsys)
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


# 5, 6, 9, 10, 15. sizes that cannot work are refused before any work ---------------------------------

@pytest.mark.parametrize("argv, message", [
    (["collect", "--env", "starpilot", "--frames", "0"], "frames must be a positive number of frames"),
    (["collect", "--env", "starpilot", "--frames", "-5"], "frames must be a positive number of frames"),
    (["ppo", "--env", "starpilot", "--preset", "smoke", "--env-steps", "0"], "PPOConfig.env_steps must be >= 1, got 0"),
    (["lam", "--log-every", "0"], "LAMConfig.log_every must be >= 1, got 0"),
    (["lam", "--checkpoint-every", "0"], "LAMConfig.checkpoint_every must be >= 1, got 0"),
    (["bc", "--log-every", "0"], "BCConfig.log_every must be >= 1, got 0"),
    (["bc", "--checkpoint-every", "0"], "BCConfig.checkpoint_every must be >= 1, got 0"),
    (["lam", "--impala-scale", "0"], "LAMConfig.impala_scale must be >= 1, got 0"),
    (["bc", "--label-batch", "0"], "BCConfig.label_batch must be >= 1, got 0"),
    (["umap", "--points", "0"], "UmapConfig.points must be >= 16, got 0"),
    (["lam", "--batch-size", "-1"], "LAMConfig.batch_size must be >= 1, got -1"),
    (["train", "--env", "starpilot", "--record.frames", "0"], "RecordConfig.frames must be >= 1, got 0"),
    (["train", "--env", "starpilot", "--finetune.decoder-every", "0"], "FinetuneConfig.decoder_every must be >= 1"),
    (["decode", "--labelled", "8", "0"], "DecodeConfig.labelled must be >= 1, got 0"),
    (["finetune", "--env", "starpilot", "--fc-ramp", "9", "3"], "FinetuneConfig.fc_ramp: need start <= end, got 9 3"),
])
def test_sizes_that_cannot_work_are_refused_before_any_work(data, tmp_path, capsys, argv, message):
    if argv[0] in ("lam", "bc", "umap", "decode"):
        argv = argv[:1] + ["--data", str(data), "--preset", "smoke"] + argv[1:]
    elif argv[0] in ("train", "finetune"):
        argv = argv + ["--preset", "smoke"]
    assert message in _cli_error(argv + ["--out", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()


def test_eval_without_a_policy_names_the_stage_to_run(tmp_path, capsys):
    err = _cli_error(["eval", "--env", "starpilot", "--out", str(tmp_path), "--preset", "smoke"], capsys)
    assert "no policy to evaluate yet: run stage 2 (`lapo-fast bc`)" in err


# 7. distances that overflow are non-finite input ----------------------------------------------------

def _vq_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(2, 64, 16, generator=g)
    return codebook, torch.ones(2, 64), codebook.clone()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("scale", [1e20, 1e30, 3e38])
def test_latents_whose_distances_overflow_are_refused_and_leave_the_codebook(backend, scale):
    state = _vq_state()
    before = [t.clone() for t in state]
    x = torch.full((8, 128), scale) * torch.where(torch.arange(128) % 2 == 0, 1.0, -1.0)  # finite: |x| <= 3e38
    assert torch.isfinite(x).all()
    with pytest.raises(NonFiniteError):
        vq_ema(x, *state, layout="lapo", num_latents=4, backend=backend)
    for t, old in zip(state, before):
        assert torch.equal(t, old)
    out = vq_ema(torch.randn(8, 128), *state, layout="lapo", num_latents=4, backend=backend)
    assert torch.isfinite(out.loss) and all(torch.isfinite(t).all() for t in state)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_overflow_under_the_cuda_policy_skips_the_update_and_makes_the_loss_nan(backend):
    state = _vq_state()
    before = [t.clone() for t in state]
    out = vq_ema(torch.full((8, 128), 1e25), *state, layout="lapo", num_latents=4, backend=backend,
                 raise_nonfinite=False)
    assert torch.isnan(out.loss)
    for t, old in zip(state, before):
        assert torch.equal(t, old)


# 8. a decoded cache truncated during a run ----------------------------------------------------------

TRUNCATE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from lapo_fast.data import DatasetError, FrameDataset, WindowSampler
    from lapo_fast.data.planner import frames_for, make_loader
    ds = FrameDataset(sys.argv[1])
    plan, frames = frames_for("lam", ds, "cache", "cpu")
    loader = make_loader(WindowSampler(frames, ds.episodes, batch_size=8, seed=0), plan, "cpu")
    next(loader)
    os.truncate(ds.cache_path(), ds.manifest.frame_bytes * 5)  # behind the run's back
    try:
        for _ in range(20):
            next(loader)
    except DatasetError as e:
        print("ERROR", e)
""")


def test_a_cache_truncated_during_a_run_is_an_error_not_a_bus_error(tmp_path):
    path = _dataset(tmp_path / "ds", episodes=4, length=40)
    done = subprocess.run([sys.executable, "-c", TRUNCATE, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"  # SIGBUS is -7
    assert "cache.u8: the decoded cache holds 61,440 bytes, 1,966,080 expected" in done.stdout
    assert "rerun the same command" in done.stdout
    ds = FrameDataset(path)
    np.testing.assert_array_equal(ds.cache(), ds.frames(0, ds.num_frames))  # the rerun rebuilds it


def test_cached_frames_read_what_the_cache_holds(tmp_path):
    from lapo_fast.data import CachedFrames

    ds = FrameDataset(_dataset(tmp_path / "ds", episodes=3, length=10))
    cache = np.asarray(ds.cache())
    frames = CachedFrames(ds.cache_path(), cache.shape)
    idx = np.array([[3, 4, 5], [29, 0, 1], [7, 7, 8]])  # runs, a wrap back, a repeat
    np.testing.assert_array_equal(frames[idx], cache[idx])
    np.testing.assert_array_equal(frames[2:9], cache[2:9])
    with pytest.raises(IndexError):
        frames[np.array([30])]
    with pytest.raises(DatasetError, match="holds 0 bytes"):
        open(tmp_path / "empty.u8", "wb").close()
        CachedFrames(tmp_path / "empty.u8", cache.shape)


# 11, 12. damaged run files ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", ['{"type": "LAMConfig"}', "[1, 2]", '{"type": "LAMConfig", "config": 3}'])
def test_a_damaged_stage_config_is_one_line_naming_it(data, tmp_path, capsys, content):
    run = RunDir(tmp_path)
    run.save_config("lam", resolve(LAMConfig, "smoke"))
    run.config_path("lam").write_text(content)
    err = _cli_error(["umap", "--data", str(data), "--out", str(tmp_path), "--preset", "smoke"], capsys)
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


# 13. Ctrl-C ---------------------------------------------------------------------------------------------

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


# 14. a full disk during a checkpoint ---------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_full_disk_during_a_checkpoint_is_the_disk_full_error(tmp_path, monkeypatch, writer):
    import shutil

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
