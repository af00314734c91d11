"""Training from the compressed shards: the same windows as the decoded cache, bit for bit; the GPU
decoder's plan checked with a CPU decoder in DALI's place; corrupt chunks named; the planner's
choices; and stage 1 trained from the compressed path with no decoded copy left anywhere."""

import json
import os

import lz4.block
import numpy as np
import pytest
import torch

from lapo_fast.config import LAMConfig, UmapConfig, resolve
from lapo_fast.registry import resolve_run
from lapo_fast.data import (
    CompressedFrames, DatasetError, DatasetWriter, FrameDataset, PrefetchLoader, RowSampler, WindowSampler,
    plan_loader,
)
from lapo_fast.data.compressed import plan_decode
from lapo_fast.data.loader import assemble, chunk_inputs, frames_at
from lapo_fast.data.planner import GiB, LoaderPlan, Machine, open_frames
from lapo_fast.latent import window_labels


def _dataset(path, *, codec="lz4", chunk_frames=8, shape=(6, 6, 3), episodes=7, seed=0):
    """Episodes of 1-60 frames whose pixels say (episode, frame); shards cut mid-chunk."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, frame_shape=shape, codec=codec, chunk_frames=chunk_frames, shard_frames=50) as w:
        for e in range(episodes):
            n = int(rng.integers(1, 60))
            frames = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            frames[:, 0, 0, 0], frames[:, 0, 0, 1] = e, np.arange(n)
            w.add_episode(frames, action=rng.integers(0, 15, n))
    return FrameDataset(path)


@pytest.mark.parametrize("codec,chunk_frames,partial", [("lz4", 8, True), ("lz4", 8, False), ("lz4", 1, True),
                                                        ("lz4", 256, True), ("zstd", 8, True)])
def test_compressed_windows_equal_the_decoded_cache(tmp_path, codec, chunk_frames, partial):
    ds = _dataset(tmp_path / "ds", codec=codec, chunk_frames=chunk_frames)
    cache = np.asarray(ds.cache())
    frames = CompressedFrames(ds, threads=2, partial=partial)
    assert frames.shape == cache.shape and len(frames) == len(cache)
    for seed in (0, 1):
        a = WindowSampler(cache, ds.episodes, context=1, batch_size=64, seed=seed, meta={"action": ds.meta("action")})
        b = WindowSampler(frames, ds.episodes, context=1, batch_size=64, seed=seed, meta={"action": ds.meta("action")})
        for _ in range(10):
            x, y = a.sample(), b.sample()
            np.testing.assert_array_equal(x["obs"], y["obs"])
            np.testing.assert_array_equal(x["action"], y["action"])
    every = np.arange(len(cache))
    np.testing.assert_array_equal(frames[every[::-1]], cache[::-1])  # any order, every chunk, shard tails
    np.testing.assert_array_equal(frames[5:17], cache[5:17])
    with pytest.raises(IndexError):
        frames[np.array([len(cache)])]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_prefetch_loader_from_compressed_frames_is_the_samplers_stream(tmp_path, prefetch):
    ds = _dataset(tmp_path / "ds")
    cache = np.asarray(ds.cache())
    ref = WindowSampler(cache, ds.episodes, batch_size=16, seed=5, meta={"action": ds.meta("action")})
    loader = PrefetchLoader(WindowSampler(CompressedFrames(ds), ds.episodes, batch_size=16, seed=5,
                                          meta={"action": ds.meta("action")}), prefetch=prefetch)
    for _ in range(6):
        want, got = ref.sample(), next(loader)
        assert got["obs"].dtype == torch.uint8
        np.testing.assert_array_equal(got["obs"].numpy(), want["obs"])
        np.testing.assert_array_equal(got["action"].numpy(), want["action"])
    # Its rng is the stream as of the batches handed out, not of those prefetched.
    assert loader.rng.bit_generator.state == ref.rng.bit_generator.state
    loader.close()


def test_a_pass_in_order_through_the_prefetching_loader_ends_cleanly(tmp_path):
    from lapo_fast.data.windows import InOrder

    ds = _dataset(tmp_path / "ds")
    cache = np.asarray(ds.cache())
    batches = [np.arange(i, min(i + 7, len(cache))) for i in range(0, len(cache), 7)]
    loader = PrefetchLoader(InOrder(CompressedFrames(ds), batches), prefetch=2)
    got = np.concatenate([next(loader)["obs"].numpy() for _ in batches])
    np.testing.assert_array_equal(got, cache)
    loader._thread.join(timeout=5)
    assert not loader._thread.is_alive() and loader._error is None  # it stopped when the batches ran out


def test_row_sampler_draws_frames_and_targets_of_the_same_rows(tmp_path):
    ds = _dataset(tmp_path / "ds")
    cache = np.asarray(ds.cache())
    rows = np.arange(10, 60)
    sampler = RowSampler(CompressedFrames(ds), rows, {"target": rows.astype(np.float32) * 2}, batch_size=32, seed=0)
    idx, extras = sampler.draw()
    np.testing.assert_array_equal(extras["target"], idx * 2)
    np.testing.assert_array_equal(frames_at(sampler.frames, idx, "cpu").numpy(), cache[idx])


def test_gpu_decode_plan_with_the_cpu_decoder_standing_in_for_dali(tmp_path):
    """The DALI loader's own inputs and assembly; each chunk inflated (whole, as nvCOMP does) and
    padded to the slot (as fn.pad does) on the CPU instead."""
    ds = _dataset(tmp_path / "ds", chunk_frames=8)
    cache = np.asarray(ds.cache())
    frames = CompressedFrames(ds)
    assert frames.chunk_slot == 8 and (frames.table.frames < 8).any()  # shard tails are short chunks
    sampler = WindowSampler(frames, ds.episodes, context=2, batch_size=32, seed=3)
    for _ in range(5):
        idx, _ = sampler.draw()
        blobs, shapes, plan = chunk_inputs(frames, idx)
        assert len(blobs) == len(plan.chunks) <= sampler.draw_size
        slots = np.zeros((len(blobs), frames.chunk_slot, *frames.shape[1:]), np.uint8)
        for i, (blob, shape) in enumerate(zip(blobs, shapes)):
            raw = lz4.block.decompress(blob.tobytes(), uncompressed_size=int(np.prod(shape)))
            slots[i, :shape[0]] = np.frombuffer(raw, np.uint8).reshape(shape)
        got = assemble(torch.from_numpy(slots), plan, frames.shape[1:])
        np.testing.assert_array_equal(got.numpy(), cache[idx])
    # The CPU plan decodes prefixes only: up to the furthest frame a batch needs of each chunk.
    prefix = plan_decode(frames.table, idx)
    assert (prefix.need <= frames.table.frames[prefix.chunks]).all()
    assert (prefix.need == plan.need).sum() < len(plan.need)
    np.testing.assert_array_equal(prefix.need,
                                  [prefix.within[prefix.slot == j].max() + 1 for j in range(len(prefix.need))])


def test_dali_decode_loader_on_dalis_cpu_backend_gives_the_samplers_batches(tmp_path):
    """The DALI loader's pipeline (variable batches of chunks, padding to slots, assembly) on DALI's
    CPU backend, python-lz4 in place of the GPU-only inflate."""
    from lapo_fast.data import DaliDecodeLoader, dali_available

    if not dali_available():
        pytest.skip("nvidia-dali is not installed (optional extra: pip install -e '.[dali]')")
    ds = _dataset(tmp_path / "ds", chunk_frames=8)
    cache = np.asarray(ds.cache())
    ref = WindowSampler(cache, ds.episodes, batch_size=16, seed=4, meta={"action": ds.meta("action")})
    loader = DaliDecodeLoader(WindowSampler(CompressedFrames(ds), ds.episodes, batch_size=16, seed=4,
                                            meta={"action": ds.meta("action")}),
                              CompressedFrames(ds), device_id=None, prefetch=2, inflate=False)
    for _ in range(5):
        want, got = ref.sample(), next(loader)
        np.testing.assert_array_equal(got["obs"].numpy(), want["obs"])
        np.testing.assert_array_equal(got["action"].numpy(), want["action"])
    assert loader.rng.bit_generator.state == ref.rng.bit_generator.state  # not the batches DALI prefetched
    loader.close()


def test_corrupt_chunk_found_at_decode_time_names_shard_and_chunk(tmp_path):
    ds = _dataset(tmp_path / "ds", chunk_frames=8)
    table = CompressedFrames(ds).table
    k = int(np.flatnonzero((table.shard == 1) & (table.number == 2))[0])
    shard = tmp_path / "ds" / ds.manifest.shards[1].file
    data = bytearray(shard.read_bytes())
    data[int(table.offset[k]) + 3] ^= 0x5A
    shard.write_bytes(bytes(data))
    frames = CompressedFrames(FrameDataset(tmp_path / "ds"))
    first = int(table.first[k])
    with pytest.raises(DatasetError,
                       match=r"shards/00001.bin: chunk 2 \(frames \d+-\d+, byte \d+\) is corrupt: checksum"):
        frames[np.array([first])]
    np.testing.assert_array_equal(frames[np.array([0, 1])].shape, (2, 6, 6, 3))  # other chunks still read
    with pytest.raises(DatasetError, match="00001.bin: chunk 2"):
        chunk_inputs(frames, np.array([first + 1]))  # the GPU path checks before feeding DALI
    loader = PrefetchLoader(RowSampler(frames, np.full(4, first), {}, batch_size=4, seed=0))
    with pytest.raises(DatasetError, match="00001.bin: chunk 2"):
        next(loader)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(DatasetError, match="00001.bin: truncated"):
        CompressedFrames(FrameDataset(tmp_path / "ds"))


def _facts(**kw):
    base = dict(cuda=False, gpu_free=0, ram_available=64 * GiB, disk_free=100 * GiB, dali=False, world=1)
    return Machine(**{**base, **kw})


def test_planner_picks_from_what_the_machine_has(tmp_path, monkeypatch):
    monkeypatch.setenv("LAPO_FAST_CACHE_DIR", str(tmp_path / "cache"))
    ds = _dataset(tmp_path / "ds")
    decoded = ds.num_frames * ds.manifest.frame_bytes
    assert plan_loader(ds, "auto", _facts(cuda=True, gpu_free=80 * GiB)).kind == "resident"
    gpu_full = plan_loader(ds, "auto", _facts(cuda=True, gpu_free=decoded, dali=True, disk_free=0))
    assert (gpu_full.kind, gpu_full.decoder) == ("compressed", "dali") and "DALI" in gpu_full.why
    assert plan_loader(ds, "auto", _facts()).kind == "cache"
    small_disk = plan_loader(ds, "auto", _facts(disk_free=decoded))
    assert small_disk.kind == "compressed" and "disk free" in small_disk.why and small_disk.decoder == "cpu"
    assert plan_loader(ds, "auto", _facts(ram_available=decoded)).kind == "compressed"
    # Several processes: nobody builds a cache the others wait for.
    two = plan_loader(ds, "auto", _facts(world=2))
    assert two.kind == "resident" and "no rank waits" in two.why
    assert plan_loader(ds, "auto", _facts(world=2, ram_available=3 * decoded)).kind == "compressed"
    with pytest.raises(ValueError, match="loader=cache under 2 processes.*lapo-fast data cache"):
        plan_loader(ds, "cache", _facts(world=2))
    with pytest.raises(ValueError, match="loader=resident.*more than half.*loader=compressed"):
        plan_loader(ds, "resident", _facts(ram_available=decoded))
    with pytest.raises(ValueError, match="loader='fast': choose one of auto, resident, cache, compressed"):
        plan_loader(ds, "fast", _facts())
    assert plan_loader(ds, "compressed", _facts()).kind == "compressed"
    ds.cache()  # once it exists, it is used, also by several processes
    assert plan_loader(ds, "auto", _facts(disk_free=0)).kind == "cache"
    assert plan_loader(ds, "cache", _facts(world=2)).kind == "cache"
    record = ds.cache_path().with_name("cache.u8.done")
    record.write_text(json.dumps({**json.loads(record.read_text()), "manifest": "{}"}))  # made from another manifest
    assert not ds.cache_ready() and plan_loader(ds, "auto", _facts(disk_free=0)).kind == "compressed"


def test_make_loader_gives_each_plan_its_loader(tmp_path, monkeypatch):
    """cuda without an index means the current device, not GPU 0; frames in GPU memory are gathered there."""
    from lapo_fast.data import DeviceResidentLoader, loader, make_loader

    ds = _dataset(tmp_path / "ds")
    sampler = WindowSampler(CompressedFrames(ds), ds.episodes, batch_size=4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(loader, "DaliDecodeLoader", lambda s, frames, device_id: ("dali", device_id))
    dali = LoaderPlan("compressed", "", "dali")
    assert make_loader(sampler, dali, "cuda") == ("dali", 3)
    assert make_loader(sampler, dali, "cuda:1") == ("dali", 1)
    cpu = make_loader(sampler, LoaderPlan("compressed", ""), "cpu")
    assert isinstance(cpu, PrefetchLoader) and cpu.prefetch == 0  # gathered in the training thread
    from lapo_fast.data.stores import DeviceFrames

    # GPU memory's store, standing in on the CPU.
    on_device = WindowSampler(DeviceFrames(torch.from_numpy(np.array(ds.cache()))), ds.episodes, batch_size=4, seed=1)
    resident = make_loader(on_device, LoaderPlan("resident", ""), "cpu")
    ref = WindowSampler(np.asarray(ds.cache()), ds.episodes, batch_size=4, seed=1)
    assert isinstance(resident, DeviceResidentLoader)
    np.testing.assert_array_equal(next(resident)["obs"].numpy(), ref.sample()["obs"])


def test_resident_frames_are_decoded_without_a_disk_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LAPO_FAST_CACHE_DIR", str(tmp_path / "cache"))
    ds = _dataset(tmp_path / "ds")
    frames = open_frames(ds, LoaderPlan("resident", ""), "cpu")
    assert not (tmp_path / "cache").exists()
    np.testing.assert_array_equal(frames.array, ds.cache())
    gpu_like = torch.empty((ds.num_frames, *ds.manifest.frame_shape), dtype=torch.uint8)
    from lapo_fast.data.compressed import decode_all

    decode_all(ds, gpu_like, threads=2)  # the GPU path's code, into a tensor
    np.testing.assert_array_equal(gpu_like.numpy(), frames.array)


def test_data_cache_command_builds_the_decoded_cache(tmp_path, monkeypatch, capsys):
    from lapo_fast.cli import main

    monkeypatch.setenv("LAPO_FAST_CACHE_DIR", str(tmp_path / "cache"))
    ds = _dataset(tmp_path / "ds")
    assert main(["data", "cache", str(tmp_path / "ds")]) == 0
    assert "decoded cache at" in capsys.readouterr().out
    assert plan_loader(ds, "cache", _facts(world=2)).kind == "cache"  # now usable by several processes


def test_loader_is_a_setting_of_every_frame_reading_stage():
    cfgs = resolve_run("smoke", ["--lam.loader", "compressed", "--bc.loader", "resident", "--decode.loader", "cache",
                                 "--umap.loader", "compressed"])
    loaders = [getattr(cfgs, s).loader for s in ("lam", "bc", "decode", "umap")]
    assert loaders == ["compressed", "resident", "cache", "compressed"]
    assert UmapConfig().loader == "auto"
    with pytest.raises(ValueError, match="LAMConfig.loader='disk'; choose one of"):
        resolve(LAMConfig, "smoke", {"loader": "disk"})


def test_stage1_trains_from_the_compressed_shards_and_leaves_no_decoded_copy(tmp_path, monkeypatch, capsys):
    from lapo_fast.rundir import RunDir
    from lapo_fast.stages.lam import train_lam

    monkeypatch.setenv("LAPO_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "ds"
    g = torch.Generator().manual_seed(0)
    with DatasetWriter(path) as w:
        for _ in range(3):
            w.add_episode((torch.rand(20, 64, 64, 3, generator=g) * 255).to(torch.uint8).numpy(),
                          action=np.arange(20) % 15)
    cfg = resolve(LAMConfig, "smoke", {"steps": 4, "checkpoint_every": 2, "log_every": 2, "loader": "compressed",
                                       "probe_labels": 16, "probe_held_out": 8})
    last = train_lam(path, tmp_path / "run", cfg, test_data=path, progress=False)
    assert last.name == "step-00000004"
    assert "lam: loader compressed, cpu decoder (asked for;" in capsys.readouterr().out
    # Its labels for stage 2 from the compressed shards equal those from a decoded copy.
    run = RunDir(tmp_path / "run")
    starts, from_shards, _ = window_labels(run, FrameDataset(path), progress=False)
    decoded = [p for p in tmp_path.rglob("*") if p.name.startswith("cache.u8") or ".tmp" in p.name]
    assert decoded == [], f"decoded copies left: {decoded}"
    from lapo_fast.latent import idm_latents

    ds = FrameDataset(path)
    again = idm_latents(run.load_lam().idm, np.asarray(ds.cache()), starts, 1)
    np.testing.assert_array_equal(from_shards, again)
    assert os.path.exists(ds.cache_path())  # (that comparison made one, where it was told to)
