"""What a user sees instead of a traceback: one line naming the thing and the fix, before any work
(sizes that cannot work, wrong shapes and media, bad devices, full disks, a missing stage)."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import cli_error, write_dataset, write_lapo_chunk

from lapo_fast.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("faults") / "ds", episodes=3, length=12)


def test_stages_refuse_frames_of_another_shape(tmp_path, capsys):
    path = write_dataset(tmp_path / "ds", env=None)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["frame_shape"] = [32, 128, 3]  # the same bytes per frame: only the shape betrays it
    (path / "manifest.json").write_text(json.dumps(manifest))
    err = cli_error(["lam", "--data", str(path), "--out", str(tmp_path / "run"), "--preset", "smoke"], capsys)
    assert "frames are 32x128x3, the stages take 64x64x3" in err


@pytest.mark.parametrize("manifest, message", [
    ("[]", "a JSON object expected"), ("null", "a JSON object expected"),
    ("2D frames", r"frame_shape must be \[height, width, channels\] \(e.g. \[64, 64, 3\]\), got \[64, 64\]")])
def test_malformed_manifests_are_one_line_errors(tmp_path, capsys, manifest, message):
    path = write_dataset(tmp_path / "ds", env=None)
    if manifest == "2D frames":
        manifest = (path / "manifest.json").read_text().replace('"frame_shape": [\n  64,\n  64,\n  3\n ]',
                                                                '"frame_shape": [64, 64]')
        assert "[64, 64]" in manifest
    (path / "manifest.json").write_text(manifest)
    assert pytest.importorskip("re").search(message, cli_error(["data", "verify", str(path)], capsys))


def test_damaged_files_name_themselves(tmp_path, capsys):
    path = write_dataset(tmp_path / "ds", env=None)
    (path / "shards" / "00000.idx.npy").write_bytes(b"\x93NUMPY garbled header")
    assert "00000.idx.npy: unreadable or damaged .npy file" in cli_error(["data", "verify", str(path)], capsys)
    path = write_dataset(tmp_path / "ds2", env=None)
    (path / "shards" / "00000.bin").unlink()
    (path / "shards" / "00000.bin").mkdir()  # a shard that cannot be read
    assert "00000.bin" in cli_error(["data", "verify", str(path)], capsys)
    src = tmp_path / "lapo" / "train"
    src.mkdir(parents=True)
    write_lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.isin(np.arange(10), [0, 6]))
    (src / "0.npz").write_bytes((src / "0.npz").read_bytes()[:3000])  # truncated
    assert "0.npz: not a LAPO data chunk" in cli_error(["data", "import-lapo", str(tmp_path / "lapo"), "--out",
                                                          str(tmp_path / "out")], capsys)


def test_bad_media_are_one_line_errors(tmp_path, capsys):
    import av

    audio = tmp_path / "talk.mp4"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    assert "no video stream" in cli_error(["data", "ingest", str(audio), "--out", str(tmp_path / "a")], capsys)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "0.png: not a readable image" in cli_error(["data", "ingest", str(folder), "--out", str(tmp_path / "b")],
                                                       capsys)
    assert "--size must be a positive" in cli_error(["data", "ingest", str(folder), "--out", str(tmp_path / "c"),
                                                      "--size", "0"], capsys)


def test_small_ingest_then_a_stage_is_refused_clearly(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(folder / f"{i}.png")
    assert main(["data", "ingest", str(folder), "--out", str(tmp_path / "ds"), "--size", "32"]) == 0
    err = cli_error(["lam", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--preset", "smoke"],
                     capsys)
    assert "frames are 32x32x3, the stages take 64x64x3 (ingest again with --size 64)" in err


def test_second_import_names_the_cli_way_out(tmp_path, capsys):
    src = tmp_path / "lapo" / "train"
    src.mkdir(parents=True)
    write_lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.isin(np.arange(10), [0, 6]))
    argv = ["data", "import-lapo", str(tmp_path / "lapo"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "already holds a dataset: import into a new --out" in cli_error(argv, capsys)


@pytest.mark.parametrize("device, message", [("banana", "is not a torch device"), ("cuda", "no CUDA device")])
def test_bad_devices_are_one_line_errors(tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = write_dataset(tmp_path / "ds", env=None)
    assert message in cli_error(["lam", "--data", str(path), "--out", str(tmp_path / "run"), "--preset", "smoke",
                                  "--device", device], capsys)


def test_too_many_envs_and_full_disks_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert "use fewer envs" in cli_error(["collect", "--env", "starpilot", "--frames", "10", "--out",
                                           str(tmp_path / "a"), "--num-envs", "100000000"], capsys)
    import lapo_fast.data.writer as writer

    def full(path, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "atomic_write", full)
    err = cli_error(["collect", "--env", "starpilot", "--frames", "100", "--num-envs", "4", "--out",
                      str(tmp_path / "b")], capsys)
    assert "No space left on device (the disk is full" in err


def test_num_envs_and_threads_are_checked():
    from lapo_fast.envs import ProcgenVecEnv

    with pytest.raises(ValueError, match="num_envs must be a positive int, got True"):
        ProcgenVecEnv("starpilot", True)
    env = ProcgenVecEnv("starpilot", 8, num_threads=10_000, envs_per_instance=4)
    assert env.num_threads == 2  # one per libenv instance at most
    env.close()


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
    assert message in cli_error(argv + ["--out", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()


def test_eval_without_a_policy_names_the_stage_to_run(tmp_path, capsys):
    err = cli_error(["eval", "--env", "starpilot", "--out", str(tmp_path), "--preset", "smoke"], capsys)
    assert "no policy to evaluate yet: run stage 2 (`lapo-fast bc`)" in err


@pytest.mark.parametrize("argv", [["train", "--env", "starpilot", "--out", ""], ["lam", "--data", "d", "--out="]])
def test_an_empty_out_is_refused_not_the_current_folder(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--out is empty: name the run directory" in cli_error(argv, capsys)
    assert not list(tmp_path.iterdir())  # nothing written where the user stood


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--envs", "starpilot,starpilot", "--out", "sw", "--dry-run"], "names starpilot more than once"),
    (["sweep", "--envs", "all", "--seeds", "1000000000", "--out", "sw", "--dry-run"], "--seeds must be in [1, 10,000]"),
    (["aggregate", "sw", "--reps", "0"], "--reps (bootstrap resamples) must be an int >= 1, got 0"),
])
def test_sweep_and_aggregate_sizes_that_cannot_work_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sw").mkdir()
    assert message in cli_error(argv, capsys)


def test_a_bad_process_group_timeout_names_its_variable(monkeypatch):
    from lapo_fast.runtime.distributed import _timeout_s

    monkeypatch.setenv("LAPO_FAST_DIST_TIMEOUT_S", "abc")
    with pytest.raises(ValueError, match="LAPO_FAST_DIST_TIMEOUT_S='abc': must be a positive number of seconds"):
        _timeout_s()
    monkeypatch.setenv("LAPO_FAST_DIST_TIMEOUT_S", "90")
    assert _timeout_s() == 90.0


def test_a_process_group_left_in_the_environment_is_a_one_line_error_in_seconds(data, tmp_path):
    """WORLD_SIZE=2 left in a shell by an earlier torchrun: the stage says what it waits for and gives
    up after LAPO_FAST_DIST_JOIN_TIMEOUT_S, instead of waiting silently for hours."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "LAPO_FAST_DIST_JOIN_TIMEOUT_S": "3", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-m", "lapo_fast.cli", "lam", "--data", str(data), "--out",
                          str(tmp_path / "run"), "--preset", "smoke"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "waiting up to 3 s (LAPO_FAST_DIST_JOIN_TIMEOUT_S) for the other ranks" in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lapo-fast: error: the other ranks of WORLD_SIZE=2 did not join")
    assert "unset WORLD_SIZE" in last


@pytest.mark.parametrize("flag", ["--out", "--data"])
def test_a_symlink_loop_is_one_line_naming_the_flag(flag, data, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    argv = ["lam", "--data", str(loop if flag == "--data" else data), "--out",
            str(loop if flag == "--out" else tmp_path / "run"), "--preset", "smoke"]
    err = cli_error(argv, capsys)
    assert f"{flag} {loop}: a symlink loop" in err and "point it at a real folder" in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_missing_dataset_is_named_before_the_run_folder_is_made(tmp_path, capsys):
    err = cli_error(["lam", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--preset", "smoke"],
                    capsys)
    assert f"--data {tmp_path / 'nope'}: no such folder" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "--env", "starpilot", "--lam.no-quantize", "true"],
     "--lam.no-quantize takes no value: write --lam.quantize or --lam.no-quantize"),
    (["train", "--env", "starpilot", "--decode.online", "False"], "--decode.online takes no value"),
    (["lam", "--data", "d", "--quantize=false"], "--quantize takes no value: write --quantize or --no-quantize"),
    (["train", "--env", "starpilot", "--finetune.action-head-ramp", "1", "2", "3"],
     "--finetune.action-head-ramp takes 2 numbers (e.g. --finetune.action-head-ramp 1000 1000), got 3"),
])
def test_a_flag_in_the_wrong_form_is_named_with_its_form(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    assert message in cli_error(argv + ["--preset", "smoke"], capsys)
    assert not (tmp_path / "runs").exists()
