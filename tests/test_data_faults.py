"""Datasets that are damaged, truncated or not what they claim -- chunk and image order on import
and ingest, the decoded cache (damaged, truncated mid-run, out of disk, read-only folders), the
episode index, collect's resume -- are found where they are read, with a line naming the file."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import write_dataset, write_lapo_chunk, write_video

from lapo_fast.data import DatasetError, FrameDataset, collect, import_lapo, ingest_videos
from lapo_fast.runtime.acting import random_policy



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
        write_lapo_chunk(src / f"{c}.npz", np.broadcast_to(ids[sl, None, None, None], (n, 64, 64, 3)).astype(np.uint8),
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
        write_lapo_chunk(src / f"{c}.npz", obs, done)
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


def test_a_damaged_cache_is_found_and_rebuilt(tmp_path, capsys):
    path = write_dataset(tmp_path / "ds", episodes=6, length=50, env=None)
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


@pytest.mark.parametrize("damage", ["longer", "moved", "merged", "high bit"])
def test_a_damaged_episode_index_is_refused_when_opened(tmp_path, damage):
    path = write_dataset(tmp_path / "ds", done=True, env=None)
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


def test_import_lapo_refuses_chunks_without_episode_ends_or_with_bad_actions(tmp_path):
    src = tmp_path / "nodone" / "train"
    src.mkdir(parents=True)
    write_lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.zeros(10, bool))
    with pytest.raises(DatasetError, match="no whole episode in these chunks"):
        import_lapo(tmp_path / "nodone", tmp_path / "out1", progress=False)
    src = tmp_path / "badact" / "train"
    src.mkdir(parents=True)
    write_lapo_chunk(src / "0.npz", np.zeros((10, 64, 64, 3), np.uint8), np.isin(np.arange(10), [0, 6]),
                     np.arange(100, 110))
    with pytest.raises(DatasetError, match=r"actions must lie in \[0, 15\), found 100..109"):
        import_lapo(tmp_path / "badact", tmp_path / "out2", progress=False)


def test_ingest_refuses_a_truncatedwrite_video(tmp_path):
    full = write_video(tmp_path / "clip.webm")
    assert FrameDataset(ingest_videos([full], tmp_path / "ok", progress=False, decoder="pyav")).num_frames == 90
    cut = tmp_path / "cut.webm"
    cut.write_bytes(full.read_bytes()[:len(full.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="cut.webm: decoded .* of the 90 frames"):
        ingest_videos([cut], tmp_path / "bad", progress=False, decoder="pyav")


def test_cache_checks_free_space_first_and_leaves_no_temp(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "ds", env=None)
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


def test_caches_go_where_they_can_be_written(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "ds", env=None)
    monkeypatch.setenv("LAPO_FAST_CACHE_DIR", str(tmp_path / "caches"))
    ds = FrameDataset(path)
    assert ds.cache_path().is_relative_to(tmp_path / "caches")
    monkeypatch.delenv("LAPO_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # a read-only dataset folder
    assert ds.cache_path().is_relative_to(tmp_path / "xdg" / "lapo_fast")
    np.testing.assert_array_equal(ds.cache(), ds.frames(0, ds.num_frames))
    assert not (path / "cache.u8").exists()


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
    path = write_dataset(tmp_path / "ds", episodes=4, length=40)
    done = subprocess.run([sys.executable, "-c", TRUNCATE, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"  # SIGBUS is -7
    assert "cache.u8: the decoded cache holds 61,440 bytes, 1,966,080 expected" in done.stdout
    assert "rerun the same command" in done.stdout
    ds = FrameDataset(path)
    np.testing.assert_array_equal(ds.cache(), ds.frames(0, ds.num_frames))  # the rerun rebuilds it


def test_cached_frames_read_what_the_cache_holds(tmp_path):
    from lapo_fast.data import CachedFrames

    ds = FrameDataset(write_dataset(tmp_path / "ds", episodes=3, length=10))
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


def test_window_loader_names_a_bad_seed_and_a_missing_cuda(tmp_path):
    from lapo_fast.data import window_loader

    ds = FrameDataset(write_dataset(tmp_path / "ds", episodes=2, length=8))
    with pytest.raises(ValueError, match="window_loader: seed must be an int >= 0, got -1"):
        window_loader(ds, seed=-1)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="this torch build or machine has no CUDA device; use --device cpu"):
            window_loader(ds, device="cuda")
