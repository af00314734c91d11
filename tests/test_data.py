"""Frame datasets: round trip, windows, corruption, interrupted writes, import, ingest, loaders."""

import numpy as np
import pytest
import torch

from lapo_fast.data import (
    DatasetError, DatasetWriter, FrameDataset, PrefetchLoader, WindowSampler, collect, import_lapo,
    ingest_videos, normalize, valid_starts,
)
from lapo_fast.runtime.acting import random_policy


def fake_episodes(n_eps=5, seed=0, shape=(64, 64, 3)):
    rng = np.random.default_rng(seed)
    eps = []
    for e in range(n_eps):
        T = int(rng.integers(1, 300))
        frames = rng.integers(0, 256, (T, *shape), dtype=np.uint8)
        frames[:, :32] = 7  # some redundancy, like real frames
        eps.append((frames, rng.integers(0, 15, T), rng.random(T).astype(np.float32)))
    return eps


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_round_trip_is_bit_identical(tmp_path, codec):
    eps = fake_episodes()
    with DatasetWriter(tmp_path / "ds", codec=codec, chunk_frames=64, shard_frames=200) as w:
        for frames, actions, rewards in eps:
            w.add_episode(frames, action=actions, reward=rewards, episode_return=rewards.sum())
    ds = FrameDataset(tmp_path / "ds")
    info = ds.verify()
    assert info["episodes"] == len(eps) and info["shards"] >= 2
    for e, (frames, actions, rewards) in enumerate(eps):
        np.testing.assert_array_equal(ds.episode(e), frames)
    all_frames = np.concatenate([e[0] for e in eps])
    np.testing.assert_array_equal(ds.cache(), all_frames)
    np.testing.assert_array_equal(ds.meta("action"), np.concatenate([e[1] for e in eps]))
    np.testing.assert_allclose(ds.meta("episode_return"), [e[2].sum() for e in eps], rtol=1e-5)


def test_windows_never_cross_episodes_and_cover_every_position():
    episodes = np.array([[0, 5], [5, 1], [6, 3], [9, 10]])
    starts = valid_starts(episodes, 3)
    expected = [s for first, length in episodes for s in range(first, first + length - 2)]
    assert starts.tolist() == expected
    frames = np.arange(19, dtype=np.uint8).reshape(19, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    sampler = WindowSampler(frames, episodes, context=1, batch_size=512, seed=0,
                            meta={"ep": np.repeat(np.arange(4), episodes[:, 1])})
    seen = set()
    for _ in range(20):
        b = sampler.sample()
        assert b["obs"].shape == (512, 3, 2, 2, 3)
        ids = b["obs"][:, :, 0, 0, 0].astype(int)
        assert (np.diff(ids, axis=1) == 1).all()
        assert (b["ep"] == b["ep"][:, :1]).all(), "a window crossed an episode boundary"
        seen |= set(ids[:, 0].tolist())
    assert seen == set(expected)
    with pytest.raises(ValueError, match="no episode"):
        valid_starts(np.array([[0, 2]]), 3)


def test_same_seed_same_batches():
    episodes = np.array([[0, 50], [50, 50]])
    frames = np.random.default_rng(0).integers(0, 255, (100, 4, 4, 3), dtype=np.uint8)
    a = WindowSampler(frames, episodes, seed=3, batch_size=8).sample()["obs"]
    b = WindowSampler(frames, episodes, seed=3, batch_size=8).sample()["obs"]
    np.testing.assert_array_equal(a, b)


def _small_dataset(path, codec="lz4"):
    with DatasetWriter(path, codec=codec, chunk_frames=32, shard_frames=100) as w:
        for frames, actions, rewards in fake_episodes(4, seed=1):
            w.add_episode(frames, action=actions)
    return FrameDataset(path)


def test_corrupt_or_truncated_shards_raise_naming_the_file(tmp_path):
    ds = _small_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / ds.manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="00000.bin.*(corrupt|checksum)"):
        FrameDataset(tmp_path / "ds").verify()
    with pytest.raises(DatasetError, match="corrupt"):
        FrameDataset(tmp_path / "ds").cache()
    shard.write_bytes(bytes(data[:-50]))
    with pytest.raises(DatasetError, match="00000.bin: truncated"):
        FrameDataset(tmp_path / "ds").frames(0, 10)
    with pytest.raises(DatasetError, match="no dataset manifest"):
        FrameDataset(tmp_path / "nothing")


def test_interrupted_writer_leaves_a_readable_dataset_and_resumes(tmp_path):
    eps = fake_episodes(6, seed=2)
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds", shard_frames=1) as w:  # a shard per episode
            for i, (frames, actions, _) in enumerate(eps):
                if i == 3:
                    w._pending.append(frames)  # half-written work of an episode in flight
                    raise RuntimeError("killed")
                w.add_episode(frames, action=actions)
    ds = FrameDataset(tmp_path / "ds")
    ds.verify()
    assert ds.manifest.num_episodes == 3
    with DatasetWriter(tmp_path / "ds", resume=True, shard_frames=1) as w:
        for frames, actions, _ in eps[3:]:
            w.add_episode(frames, action=actions)
    ds = FrameDataset(tmp_path / "ds")
    ds.verify()
    for e, (frames, actions, _) in enumerate(eps):
        np.testing.assert_array_equal(ds.episode(e), frames)
    with pytest.raises(DatasetError, match="resume"):
        DatasetWriter(tmp_path / "ds")


def test_committing_a_shard_leaves_earlier_shards_files_alone(tmp_path):
    """Format 2: a shard's episodes and metadata are written with it, so the cost of a commit does
    not grow with the dataset (version 1 rewrote whole-dataset files at every shard)."""
    eps = fake_episodes(4, seed=3)
    with DatasetWriter(tmp_path / "ds", shard_frames=1) as w:
        w.add_episode(eps[0][0], action=eps[0][1])
        first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ds" / "shards").iterdir()}
        for frames, actions, _ in eps[1:]:
            w.add_episode(frames, action=actions)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ds" / "shards").iterdir()}
    assert sorted(first) == ["00000.action.npy", "00000.bin", "00000.episodes.npy", "00000.idx.npy"]
    assert all(after[name] == stamp for name, stamp in first.items())
    assert not (tmp_path / "ds" / "episodes.npy").exists() and not (tmp_path / "ds" / "meta").exists()
    (tmp_path / "ds" / "shards" / "00001.episodes.npy").unlink()
    with pytest.raises(DatasetError, match="00001.episodes.npy"):
        FrameDataset(tmp_path / "ds")


def _as_version_1(directory):
    """Rewrites a dataset in format version 1's layout (whole-dataset episodes.npy, meta/<key>.npy)."""
    import json

    m = json.loads((directory / "manifest.json").read_text())
    shards = sorted((directory / "shards").glob("*.episodes.npy"))
    np.save(directory / "episodes.npy", np.concatenate([np.load(p) for p in shards]))
    (directory / "meta").mkdir()
    for key in m["meta_keys"]:
        parts = sorted((directory / "shards").glob(f"*.{key}.npy"))
        np.save(directory / "meta" / f"{key}.npy", np.concatenate([np.load(p) for p in parts]))
        for p in parts:
            p.unlink()
    for p in shards:
        p.unlink()
    m["version"] = 1
    (directory / "manifest.json").write_text(json.dumps(m))


def test_version_1_datasets_still_read_and_resuming_upgrades_them(tmp_path):
    eps = fake_episodes(5, seed=4)
    with DatasetWriter(tmp_path / "ds", shard_frames=250) as w:
        for frames, actions, rewards in eps[:4]:
            w.add_episode(frames, action=actions, episode_return=rewards.sum())
    _as_version_1(tmp_path / "ds")
    old = FrameDataset(tmp_path / "ds")
    assert old.manifest.version == 1 and old.verify()["episodes"] == 4
    from lapo_fast.data import CompressedFrames

    every = np.arange(old.num_frames)[::-1]  # the compressed path reads it too
    np.testing.assert_array_equal(CompressedFrames(old)[every], np.concatenate([e[0] for e in eps[:4]])[every])
    np.testing.assert_array_equal(old.meta("action"), np.concatenate([e[1] for e in eps[:4]]))
    with DatasetWriter(tmp_path / "ds", resume=True, shard_frames=250) as w:
        frames, actions, rewards = eps[4]
        w.add_episode(frames, action=actions, episode_return=rewards.sum())
    ds = FrameDataset(tmp_path / "ds")
    assert ds.manifest.version == 2 and ds.verify()["episodes"] == 5
    assert not (tmp_path / "ds" / "episodes.npy").exists()
    for e, (frames, actions, rewards) in enumerate(eps):
        np.testing.assert_array_equal(ds.episode(e), frames)
    np.testing.assert_array_equal(ds.meta("action"), np.concatenate([e[1] for e in eps]))
    np.testing.assert_allclose(ds.meta("episode_return"), [e[2].sum() for e in eps], rtol=1e-5)


def test_writer_rejects_bad_frames(tmp_path):
    w = DatasetWriter(tmp_path / "ds")
    with pytest.raises(ValueError, match="uint8"):
        w.add_episode(np.zeros((3, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        w.add_episode(np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="has 2 values"):
        w.add_episode(np.zeros((3, 64, 64, 3), np.uint8), action=[1, 2])


def test_collect_records_true_episodes_and_resumes(tmp_path):
    out = tmp_path / "ds"
    collect(out, "starpilot", random_policy(seed=0), frames=400, num_envs=8, seed=1, progress=False)
    ds = FrameDataset(out)
    ds.verify()
    assert ds.num_frames >= 400
    done = ds.meta("done")
    ends = ds.episodes[:, 0] + ds.episodes[:, 1] - 1
    assert done[ends].all() and done.sum() == len(ends)
    rewards = np.asarray(ds.meta("reward"))
    returns = [rewards[f:f + n].sum() for f, n in ds.episodes]
    np.testing.assert_allclose(ds.meta("episode_return"), returns, rtol=1e-5)
    before = ds.num_frames
    collect(out, "starpilot", random_policy(seed=1), frames=before + 300, num_envs=8, seed=1, progress=False)
    ds2 = FrameDataset(out)
    ds2.verify()
    assert ds2.num_frames >= before + 300
    np.testing.assert_array_equal(ds2.frames(0, before), ds.frames(0, before))


def test_import_lapo_npz_chunks(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "starpilot"
    all_obs, all_done = [], []
    for split in ("train", "test"):
        (src / split).mkdir(parents=True)
        for c in range(3):
            n = 100
            obs = rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)
            done = rng.random(n) < 0.05
            np.savez(src / split / f"chunk_{c}.npz", obs=obs, ta=rng.integers(0, 15, (n, 1)),
                     done=done, rewards=rng.random(n), ep_returns=rng.random(n), values=rng.random(n))
            if split == "train":
                all_obs.append(obs)
                all_done.append(done)
    made = import_lapo(src, tmp_path / "out", progress=False)
    assert [p.name for p in made] == ["train", "test"]
    ds = FrameDataset(tmp_path / "out" / "train")
    ds.verify()
    obs, done = np.concatenate(all_obs), np.concatenate(all_done)
    starts = np.flatnonzero(done)  # LAPO's done[t]: obs[t] begins an episode
    np.testing.assert_array_equal(ds.cache(), obs[starts[0]:starts[-1]])  # partial first and last dropped
    assert ds.manifest.num_episodes == done.sum() - 1
    bad = tmp_path / "bad" / "train"
    bad.mkdir(parents=True)
    np.savez(bad / "x.npz", frames=np.zeros(3))
    with pytest.raises(DatasetError, match="x.npz: not a LAPO data chunk"):
        import_lapo(tmp_path / "bad", tmp_path / "out2", progress=False)


def test_ingest_video_and_image_folder(tmp_path):
    pytest.importorskip("av")
    from PIL import Image

    from lapo_fast.selftest import write_bar_clip

    video = write_bar_clip(tmp_path / "clip.webm", frames=12, step=10)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 40, 3), i * 50, np.uint8)).save(folder / f"{i:03d}.png")
    ds = FrameDataset(ingest_videos([video, folder], tmp_path / "ds", progress=False))
    ds.verify()
    assert ds.episodes[:, 1].tolist() == [12, 5]
    clip = ds.episode(0)
    assert clip.shape == (12, 64, 64, 3)
    assert clip[0].mean() < clip[-1].mean()  # the white bar grows
    np.testing.assert_array_equal(ds.episode(1)[:, 0, 0, 0], [0, 50, 100, 150, 200])
    with pytest.raises(DatasetError, match="no such file"):
        ingest_videos([tmp_path / "missing.mp4"], tmp_path / "ds2", progress=False)

    # DALI's decoder (CPU backend here: VP9; NVDEC on a GPU) gives the same frames as PyAV.
    from lapo_fast.data import dali_available
    from lapo_fast.data.sources import _decode_video_dali

    if dali_available():
        # In chunks (a ragged last one; an exact multiple of the chunk), as one decode would give.
        for chunk in (5, 4, 64):
            np.testing.assert_array_equal(_decode_video_dali(video, 64, device_id=None, chunk=chunk), clip)
        if torch.cuda.is_available() and dali_available(0):  # NVDEC: +-1 levels from the CPU decoder are normal
            gpu = _decode_video_dali(video, 64, device_id=0, chunk=5).astype(np.int16)
            assert gpu.shape == clip.shape and np.abs(gpu - clip).max() <= 2 and np.abs(gpu - clip).mean() < 0.5


def test_dali_that_cannot_run_on_the_gpu_falls_back(monkeypatch):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali.pipeline import Pipeline

    from lapo_fast.data.loader import dali_available

    def broken(self, *a, **k):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nmore")

    monkeypatch.setattr(Pipeline, "build", broken)
    with pytest.warns(UserWarning, match="cannot run on GPU 0 .CUDA driver version is insufficient"):
        assert dali_available.__wrapped__(0) is False
    assert dali_available.__wrapped__(None) is True  # the import alone is fine


def test_prefetch_loader_yields_the_samplers_batches(tmp_path):
    ds = _small_dataset(tmp_path / "ds")
    mm = ds.cache()
    ref = WindowSampler(mm, ds.episodes, seed=5, batch_size=16, meta={"action": ds.meta("action")})
    loader = PrefetchLoader(WindowSampler(mm, ds.episodes, seed=5, batch_size=16,
                                          meta={"action": ds.meta("action")}), prefetch=3)
    for _ in range(5):
        want = ref.sample()
        got = next(loader)
        np.testing.assert_array_equal(got["obs"].numpy(), want["obs"])
        np.testing.assert_array_equal(got["action"].numpy(), want["action"])
    loader.close()
    x = normalize(got["obs"])
    assert x.shape == (16, 3, 3, 64, 64) and x.min() >= -0.5 and x.max() <= 0.5


def test_collect_with_a_torchscript_policy(tmp_path):
    from lapo_fast.runtime.acting import checkpoint_policy

    class AlwaysRight(torch.nn.Module):
        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            logits = obs.float().mean(dim=(1, 2, 3))[:, None] * 0.0 - 1e9 + torch.zeros(1, 15)
            return logits + 1e9 * torch.nn.functional.one_hot(torch.tensor(7), 15)

    path = tmp_path / "policy.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(AlwaysRight(), (torch.zeros(2, 64, 64, 3, dtype=torch.uint8),),
                                  dynamic_shapes={"obs": {0: batch}})
    torch.export.save(program, str(path))
    collect(tmp_path / "ds", "starpilot", checkpoint_policy(path), frames=100, num_envs=4,
            policy_name=str(path), progress=False)
    ds = FrameDataset(tmp_path / "ds")
    assert (np.asarray(ds.meta("action")) == 7).all()
    assert ds.manifest.source["policy"] == str(path)
    with pytest.raises(DatasetError, match="no such policy"):
        checkpoint_policy(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a torch.export policy"):
        checkpoint_policy(tmp_path / "junk.pt2")
