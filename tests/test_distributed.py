"""torchrun-style DDP for stages 1 and 2, with gloo and 2 processes: the ranks stay in lock-step
(identical weights and codebooks after training, although each drew its own batches) and rank 0
alone writes the checkpoint."""

import hashlib
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lapo_fast.config import BCConfig, LAMConfig, resolve
from lapo_fast.data import DatasetWriter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(module: torch.nn.Module) -> str:
    """Of every parameter and buffer but BatchNorm's running statistics: on CPUs each rank's last
    forward updates them from its own batch (DDP syncs them from rank 0 before each forward)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        if k.endswith(("running_mean", "running_var")):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world: int, port: int, data: str, run: str, fdm: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")  # gloo on CPUs, even on a 1-GPU machine
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lapo_fast.stages import bc, lam

    # Keep each rank's own in-memory models (the checkpoints are rank 0's alone).
    built = []
    build_lam, policy_cls = lam.build_lam, bc.LatentPolicy
    lam.build_lam = lambda cfg: built.append(build_lam(cfg)) or built[-1]
    bc.LatentPolicy = lambda **kw: built.append(policy_cls(**kw)) or built[-1]

    arch, _, norm = fdm.partition("-")  # "unet-group", "unet-batch", "lapo" (BatchNorm)
    lam.train_lam(data, run, resolve(LAMConfig, "smoke", {"steps": 4, "checkpoint_every": 4, "log_every": 2,
                                                      "fdm_arch": arch, "fdm_norm": norm or "batch"}),
                  progress=False)
    bc.train_bc(data, run, resolve(BCConfig, "smoke", {"steps": 4, "checkpoint_every": 4}), progress=False)
    model, policy = built[0], built[-1]
    results[rank] = (_digest(model), _digest(policy), model.idm.vq.codebook.clone(), model.idm.vq.ema_count.clone())
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "ds"
    rng = np.random.default_rng(0)
    with DatasetWriter(path) as w:
        for _ in range(3):
            w.add_episode(rng.integers(0, 255, (16, 64, 64, 3), dtype=np.uint8),
                          action=rng.integers(0, 15, 16))
    return path


@pytest.mark.parametrize("fdm", ["unet-group", "lapo"])
def test_two_rank_gloo_training_stays_in_lock_step(dataset, tmp_path, fdm):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, _free_port(), str(dataset), str(tmp_path / "run"), fdm, results),
                           nprocs=2, join=True, start_method="spawn")
        results = dict(results)
    (lam0, bc0, codes0, counts0), (lam1, bc1, codes1, counts1) = results[0], results[1]
    assert torch.equal(codes0, codes1) and torch.equal(counts0, counts1)
    assert lam0 == lam1 and bc0 == bc1
    assert sorted(p.name for p in (tmp_path / "run" / "lam").glob("step-*")) == ["step-00000004"]
    lines = (tmp_path / "run" / "lam" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 1  # rank 0 alone logs: steps 1, 2 and 4, then the probe

    # Each rank labelled half of the windows; the gathered labels are the ones one process computes.
    from lapo_fast.data import FrameDataset
    from lapo_fast.latent import window_labels
    from lapo_fast.rundir import RunDir

    run = RunDir(tmp_path / "run")
    saved = np.load(run.labels)
    run.labels.unlink()
    starts, latents, _ = window_labels(run, FrameDataset(dataset), progress=False)
    np.testing.assert_array_equal(saved["starts"], starts)
    np.testing.assert_allclose(saved["latents"], latents, rtol=1e-5, atol=1e-6)


def test_a_local_rank_without_its_gpu_is_a_clear_error(monkeypatch):
    from lapo_fast.runtime import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail(f"set_device({i}) on a 1-GPU machine"))
    with pytest.raises(ValueError, match="LOCAL_RANK=1 but this machine has 1 CUDA device"):
        distributed.init()


def test_ranks_draw_different_batches(dataset):
    from lapo_fast.data import FrameDataset, WindowSampler

    ds = FrameDataset(dataset)
    cfg = resolve(LAMConfig, "smoke")
    a = WindowSampler(ds.cache(), ds.episodes, context=cfg.context, batch_size=8, seed=cfg.seed + 0)
    b = WindowSampler(ds.cache(), ds.episodes, context=cfg.context, batch_size=8, seed=cfg.seed + 1_000)
    assert not np.array_equal(a.sample_indices(), b.sample_indices())
