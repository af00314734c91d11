"""Nothing silently wrong: damaged data, killed runs, mismatched runs, forks, full disks, and the
one-line errors users see instead of tracebacks."""

import subprocess
import sys
import textwrap

FORK_AND_EXIT = textwrap.dedent("""
    import os, sys, time
    import numpy as np, torch
    from lapo_fast.envs import ProcgenVecEnv
    from lapo_fast.ops import VectorQuantizerEMA
    env = ProcgenVecEnv("starpilot", 8, seed=0, num_threads=2)
    env.reset()
    env.step(np.zeros(8, np.int32))
    VectorQuantizerEMA(backend="cpu")(torch.randn(1 << 14, 128))  # large enough for its thread pool
    pid = os.fork()
    if pid == 0:
        VectorQuantizerEMA(backend="cpu")(torch.randn(1 << 14, 128))  # usable in the child, on one thread
        sys.exit(0)                      # and exits normally: finalizers and static destructors run
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_a_forked_child_exits_cleanly_after_the_engine_and_the_cpu_vq_kernel():
    try:
        done = subprocess.run([sys.executable, "-c", FORK_AND_EXIT], timeout=60, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise AssertionError("the forked child hung") from None
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lapo_fast.cli import main  # noqa: E402
from lapo_fast.config import LAMConfig, resolve  # noqa: E402
from lapo_fast.data import DatasetError, DatasetWriter, FrameDataset, collect, import_lapo, ingest_videos  # noqa: E402
from lapo_fast.runtime.acting import random_policy  # noqa: E402
from lapo_fast.ops import NonFiniteError, VectorQuantizerEMA, vq_ema  # noqa: E402
from lapo_fast.rundir import RunDir  # noqa: E402
from lapo_fast.runtime.checkpoint import checkpoints, load_latest, save_checkpoint  # noqa: E402


def _dataset(path, episodes=4, length=20, seed=0, done=False, env=None):
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, source={"env": env} if env else None) as w:
        for _ in range(episodes):
            meta = {"action": rng.integers(0, 15, length)}
            if done:
                meta["done"] = np.arange(length) == length - 1
            w.add_episode(rng.integers(0, 255, (length, 64, 64, 3), dtype=np.uint8), **meta)
    return Path(path)


def _lapo_chunk(path, obs, done, actions=None):
    n = len(obs)
    np.savez(path, obs=obs, ta=(np.zeros((n, 1), np.int64) if actions is None else actions[:, None]), done=done,
             rewards=np.zeros(n), ep_returns=np.zeros(n), values=np.zeros(n))


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # after any progress bar, which ends its line first
    assert last.startswith("lapo-fast: error: ") and "Traceback" not in err, err
    return last


# 1. chunk and image order --------------------------------------------------------------------------

def test_import_lapo_episodes_never_cross_a_boundary(tmp_path):
    """LAPO's chunks come from its PPO buffer (dones[t] = next_done): done[t] marks obs[t] as an
    episode's FIRST frame. Hand-built: frame values are episode ids; episodes of 3..7 frames run
    across chunk ends; every imported episode must hold frames of one episode id, whole."""
    lengths = [4, 7, 3, 6, 5, 7, 3, 4, 6]
    ids = np.repeat(np.arange(len(lengths)), lengths)
    first = np.r_[True, ids[1:] != ids[:-1]]
    src = tmp_path / "lapo" / "train"
    src.mkdir(parents=True)
    for c, lo in enumerate(range(2, len(ids), 9)):  # the stream starts mid-episode 0
        sl = slice(lo, lo + 9)
        n = len(ids[sl])
        _lapo_chunk(src / f"{c}.npz", np.broadcast_to(ids[sl, None, None, None], (n, 64, 64, 3)).astype(np.uint8),
                    first[sl])
    import_lapo(tmp_path / "lapo", tmp_path / "out", progress=False)
    ds = FrameDataset(tmp_path / "out" / "train")
    got = [ds.episode(e)[:, 0, 0, 0].tolist() for e in range(ds.manifest.num_episodes)]
    whole = [[i] * n for i, n in enumerate(lengths)]
    assert got == whole[1:-1]  # episode 0 starts before the data, the last one ends after it
    assert np.asarray(ds.meta("done")).sum() == len(got)


def test_import_lapo_orders_chunks_by_number_and_says_so(tmp_path):
    src = tmp_path / "lapo" / "train"
    src.mkdir(parents=True)
    for c in range(12):  # chunk c holds frames of value c; episodes of 5 frames run across chunks
        obs = np.full((8, 64, 64, 3), c, np.uint8)
        done = (np.arange(8) + 8 * c) % 5 == 0
        _lapo_chunk(src / f"{c}.npz", obs, done)
    import_lapo(tmp_path / "lapo", tmp_path / "out", progress=False)
    ds = FrameDataset(tmp_path / "out" / "train")
    values = ds.frames(0, ds.num_frames)[:, 0, 0, 0]
    assert values.tolist() == sorted(values.tolist())  # text order (0, 1, 10, 11, 2...) would not be sorted
    assert ds.manifest.source["chunks"][:4] == ["0.npz", "1.npz", "2.npz", "3.npz"]
    assert "number" in ds.manifest.source["order"]


def test_ingest_orders_images_by_number(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((64, 64, 3), i * 10, np.uint8)).save(folder / f"{i}.png")
    ds = FrameDataset(ingest_videos([folder], tmp_path / "ds", progress=False, decoder="pyav"))
    assert ds.frames(0, 12)[:, 0, 0, 0].tolist() == [i * 10 for i in range(12)]


# 2. the decoded cache ------------------------------------------------------------------------------

def test_a_damaged_cache_is_found_and_rebuilt(tmp_path, capsys):
    path = _dataset(tmp_path / "ds", episodes=6, length=50)
    ds = FrameDataset(path)
    good = np.array(ds.cache())
    with open(ds.cache_path(), "r+b") as f:  # 60 frames zeroed behind the dataset's back
        f.seek(100 * 64 * 64 * 3)
        f.write(bytes(60 * 64 * 64 * 3))
    assert FrameDataset(path).verify()["cache"].startswith("removed (it disagrees")
    assert not ds.cache_path().exists()
    np.testing.assert_array_equal(FrameDataset(path).cache(), good)
    with open(FrameDataset(path).cache_path(), "r+b") as f:
        f.seek(0)
        f.write(bytes(64 * 64 * 3))
    np.testing.assert_array_equal(FrameDataset(path).cache(), good)  # rebuilt when read, too
    assert "disagrees with the dataset" in capsys.readouterr().out


# 3. run identity -----------------------------------------------------------------------------------

def test_a_run_refuses_another_game_dataset_or_model_shape(tmp_path):
    a = FrameDataset(_dataset(tmp_path / "a", env="starpilot"))
    b = FrameDataset(_dataset(tmp_path / "b", seed=1, env="starpilot"))
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
    c = FrameDataset(_dataset(tmp_path / "c", env="starpilot"))
    with pytest.raises(ValueError, match="holds starpilot episodes, not coinrun"):
        RunDir(tmp_path / "other").claim(game="coinrun", data=c)


def test_stages_refuse_a_run_of_another_game_before_working(tmp_path, capsys):
    RunDir(tmp_path).claim(game="starpilot")
    for argv in (["eval", "--env", "coinrun"], ["ppo", "--env", "coinrun", "--preset", "smoke"]):
        assert "not coinrun" in _cli_error(argv + ["--out", str(tmp_path)], capsys)


# 4. collect resumes only with its own settings --------------------------------------------------------

def test_collect_refuses_to_resume_with_other_settings(tmp_path):
    kw = dict(frames=100, num_envs=4, progress=False)
    collect(tmp_path / "ds", "starpilot", random_policy(), **kw)
    with pytest.raises(DatasetError, match="collected with start_level=0, this run asks for 50"):
        collect(tmp_path / "ds", "starpilot", random_policy(), start_level=50, **{**kw, "frames": 300})
    with pytest.raises(DatasetError, match="codec='lz4', this run asks for 'zstd'"):
        collect(tmp_path / "ds", "starpilot", random_policy(), codec="zstd", **{**kw, "frames": 300})


def test_collect_commits_by_time_as_well(tmp_path, monkeypatch):
    import lapo_fast.data.sources as sources

    monkeypatch.setattr(sources, "COMMIT_SECONDS", 0.0)
    collect(tmp_path / "ds", "starpilot", random_policy(), frames=300, num_envs=4, progress=False)
    assert len(FrameDataset(tmp_path / "ds").manifest.shards) > 1  # committed before 16,384 frames


# 5. the episode index is checked where the dataset opens ---------------------------------------------

@pytest.mark.parametrize("damage", ["longer", "moved", "merged", "high bit"])
def test_a_damaged_episode_index_is_refused_when_opened(tmp_path, damage):
    path = _dataset(tmp_path / "ds", done=True)
    file = path / "shards" / "00000.episodes.npy"
    ep = np.load(file)
    if damage == "longer":
        ep[-1, 1] += 8
    elif damage == "moved":
        ep[1, 0] += 3
        ep[0, 1] += 3
        ep[1, 1] -= 3
    elif damage == "merged":
        ep = np.concatenate([[[0, ep[0, 1] + ep[1, 1]]], ep[2:]])
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["num_episodes"] -= 1
        (path / "manifest.json").write_text(json.dumps(manifest))
    else:
        ep[2, 0] |= 1 << 40
    np.save(file, ep)
    with pytest.raises(DatasetError, match="episode index"):
        FrameDataset(path)


# 6. import and ingest refuse what they cannot use ---------------------------------------------------

def test_import_lapo_refuses_chunks_without_episode_ends_or_with_bad_actions(tmp_path):
    src = tmp_path / "nodone" / "train"
    src.mkdir(parents=True)
    _lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.zeros(10, bool))
    with pytest.raises(DatasetError, match="no whole episode in these chunks"):
        import_lapo(tmp_path / "nodone", tmp_path / "out1", progress=False)
    src = tmp_path / "badact" / "train"
    src.mkdir(parents=True)
    _lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.isin(np.arange(10), [0, 6]), np.arange(100, 110))
    with pytest.raises(DatasetError, match=r"actions must lie in \[0, 15\), found 100..109"):
        import_lapo(tmp_path / "badact", tmp_path / "out2", progress=False)


def _video(path, frames=90, codec="libvpx-vp9"):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((64, 64, 3), np.uint8)
            img[:, (i % 60):(i % 60) + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_ingest_refuses_a_truncated_video(tmp_path):
    full = _video(tmp_path / "clip.webm")
    assert FrameDataset(ingest_videos([full], tmp_path / "ok", progress=False, decoder="pyav")).num_frames == 90
    cut = tmp_path / "cut.webm"
    cut.write_bytes(full.read_bytes()[:len(full.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="cut.webm: decoded .* of the 90 frames"):
        ingest_videos([cut], tmp_path / "bad", progress=False, decoder="pyav")


def test_stages_refuse_frames_of_another_shape(tmp_path, capsys):
    path = _dataset(tmp_path / "ds")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["frame_shape"] = [32, 128, 3]  # the same bytes per frame: only the shape betrays it
    (path / "manifest.json").write_text(json.dumps(manifest))
    err = _cli_error(["lam", "--data", str(path), "--out", str(tmp_path / "run"), "--preset", "smoke"], capsys)
    assert "frames are 32x128x3, the stages take 64x64x3" in err


# 7. k-means start with NaN ---------------------------------------------------------------------------

def test_kmeans_init_refuses_nan_before_touching_the_codebook():
    vq = VectorQuantizerEMA(kmeans_init=True, backend="reference")
    bad = torch.randn(64, 128)
    bad[3, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        vq(bad)
    assert not bool(vq.initialized) and torch.isfinite(vq.codebook).all()
    assert torch.isfinite(vq(torch.randn(64, 128)).loss)


# 8 and 14. the cache on a full disk, and after a failed decode ---------------------------------------

def test_cache_checks_free_space_first_and_leaves_no_temp(tmp_path, monkeypatch):
    path = _dataset(tmp_path / "ds")
    import lapo_fast.data.cached as reader  # where the decoded cache is written

    monkeypatch.setattr(reader.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1000))
    with pytest.raises(DatasetError, match=r"the decoded cache needs 0.00 GiB, 0.00 GiB are free"):
        FrameDataset(path).cache()
    monkeypatch.undo()
    with open(path / "shards" / "00000.bin", "r+b") as f:  # damage a chunk: decoding fails midway
        f.seek(1000)
        f.write(b"\x5a" * 64)
    with pytest.raises(DatasetError):
        FrameDataset(path).cache()
    assert not [p for p in path.iterdir() if "tmp" in p.name or p.name.startswith("cache")]


# 10. read-only datasets ------------------------------------------------------------------------------

def test_caches_go_where_they_can_be_written(tmp_path, monkeypatch):
    path = _dataset(tmp_path / "ds")
    monkeypatch.setenv("LAPO_FAST_CACHE_DIR", str(tmp_path / "caches"))
    ds = FrameDataset(path)
    assert ds.cache_path().is_relative_to(tmp_path / "caches")
    monkeypatch.delenv("LAPO_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # a read-only dataset folder
    assert ds.cache_path().is_relative_to(tmp_path / "xdg" / "lapo_fast")
    np.testing.assert_array_equal(ds.cache(), ds.frames(0, ds.num_frames))
    assert not (path / "cache.u8").exists()


# 11 and 14. checkpoints --------------------------------------------------------------------------------

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


# 12 and 13. one-line errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("manifest, message", [
    ("[]", "a JSON object expected"), ("null", "a JSON object expected"),
    ("2D frames", r"frame_shape must be \[height, width, channels\] \(e.g. \[64, 64, 3\]\), got \[64, 64\]")])
def test_malformed_manifests_are_one_line_errors(tmp_path, capsys, manifest, message):
    path = _dataset(tmp_path / "ds")
    if manifest == "2D frames":
        manifest = (path / "manifest.json").read_text().replace('"frame_shape": [\n  64,\n  64,\n  3\n ]',
                                                                '"frame_shape": [64, 64]')
        assert "[64, 64]" in manifest
    (path / "manifest.json").write_text(manifest)
    assert pytest.importorskip("re").search(message, _cli_error(["data", "verify", str(path)], capsys))


def test_damaged_files_name_themselves(tmp_path, capsys):
    path = _dataset(tmp_path / "ds")
    (path / "shards" / "00000.idx.npy").write_bytes(b"\x93NUMPY garbled header")
    assert "00000.idx.npy: unreadable or damaged .npy file" in _cli_error(["data", "verify", str(path)], capsys)
    path = _dataset(tmp_path / "ds2")
    (path / "shards" / "00000.bin").unlink()
    (path / "shards" / "00000.bin").mkdir()  # a shard that cannot be read
    assert "00000.bin" in _cli_error(["data", "verify", str(path)], capsys)
    src = tmp_path / "lapo" / "train"
    src.mkdir(parents=True)
    _lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.isin(np.arange(10), [0, 6]))
    (src / "0.npz").write_bytes((src / "0.npz").read_bytes()[:3000])  # truncated
    assert "0.npz: not a LAPO data chunk" in _cli_error(["data", "import-lapo", str(tmp_path / "lapo"), "--out",
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
    assert "no video stream" in _cli_error(["data", "ingest", str(audio), "--out", str(tmp_path / "a")], capsys)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "0.png: not a readable image" in _cli_error(["data", "ingest", str(folder), "--out", str(tmp_path / "b")],
                                                       capsys)
    assert "--size must be a positive" in _cli_error(["data", "ingest", str(folder), "--out", str(tmp_path / "c"),
                                                      "--size", "0"], capsys)


def test_small_ingest_then_a_stage_is_refused_clearly(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(folder / f"{i}.png")
    assert main(["data", "ingest", str(folder), "--out", str(tmp_path / "ds"), "--size", "32"]) == 0
    err = _cli_error(["lam", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--preset", "smoke"],
                     capsys)
    assert "frames are 32x32x3, the stages take 64x64x3 (ingest again with --size 64)" in err


def test_second_import_names_the_cli_way_out(tmp_path, capsys):
    src = tmp_path / "lapo" / "train"
    src.mkdir(parents=True)
    _lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.isin(np.arange(10), [0, 6]))
    argv = ["data", "import-lapo", str(tmp_path / "lapo"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "already holds a dataset: import into a new --out" in _cli_error(argv, capsys)


@pytest.mark.parametrize("device, message", [("banana", "is not a torch device"), ("cuda", "no CUDA device")])
def test_bad_devices_are_one_line_errors(tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = _dataset(tmp_path / "ds")
    assert message in _cli_error(["lam", "--data", str(path), "--out", str(tmp_path / "run"), "--preset", "smoke",
                                  "--device", device], capsys)


def test_too_many_envs_and_full_disks_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert "use fewer envs" in _cli_error(["collect", "--env", "starpilot", "--frames", "10", "--out",
                                           str(tmp_path / "a"), "--num-envs", "100000000"], capsys)
    import lapo_fast.data.writer as writer

    def full(path, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "atomic_write", full)
    err = _cli_error(["collect", "--env", "starpilot", "--frames", "100", "--num-envs", "4", "--out",
                      str(tmp_path / "b")], capsys)
    assert "No space left on device (the disk is full" in err


def test_empty_vq_batch_and_state_json_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"x of shape \(0, 32\) holds no latents"):
        vq_ema(torch.zeros(0, 32), torch.zeros(2, 8, 16), torch.zeros(2, 8), torch.zeros(2, 8, 16))
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 1, model)
    (path / "state.json").write_text('{"step": 1')
    with pytest.raises(ValueError, match="every checkpoint is damaged"):
        load_latest(tmp_path, model)


def test_a_diverged_stage_1_says_where_and_what_to_try(tmp_path, monkeypatch):
    import lapo_fast.ops.vq_module as vq_module

    from lapo_fast.stages.lam import train_lam

    def nan(*a, **k):
        raise NonFiniteError("nan")

    monkeypatch.setattr(vq_module, "vq_ema", nan)
    path = _dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"stage 1 \(lam\) diverged at step 1: .* lower --lr"):
        train_lam(path, tmp_path / "run", resolve(LAMConfig, "smoke"), progress=False)


def test_num_envs_and_threads_are_checked():
    from lapo_fast.envs import ProcgenVecEnv

    with pytest.raises(ValueError, match="num_envs must be a positive int, got True"):
        ProcgenVecEnv("starpilot", True)
    env = ProcgenVecEnv("starpilot", 8, num_threads=10_000, envs_per_instance=4)
    assert env.num_threads == 2  # one per libenv instance at most
    env.close()
