"""torchrun / DDP for stages 1 and 2. Without torchrun (no WORLD_SIZE > 1 in the environment)
every function is a no-op and training runs in one process.

    torchrun --nproc-per-node 8 -m lapo_fast.cli lam --data DATA --out RUN

Each rank samples its own batches; DDP averages gradients; the VQ op all-reduces its EMA counts
and sums, so every rank holds the same codebooks; rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lapo_fast.choices import Precision, values


def _wanted() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# One rank may work alone for a while (rank 0 decoding a large dataset's frame cache): the
# collectives' default 10-minute timeout would kill the others mid-wait.
def _timeout_s(name: str = "LAPO_FAST_DIST_TIMEOUT_S", default: float = 6 * 3600) -> float:
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={text!r}: must be a positive number of seconds (unset: {default:g})")
    return value


JOIN_TIMEOUT = "LAPO_FAST_DIST_JOIN_TIMEOUT_S"  # waiting for the other ranks to start: minutes, not hours


def init() -> None:
    """Joins the process group torchrun describes (nccl on CUDA, gloo on CPU), once."""
    if _wanted() and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s): start at most that many processes per node (torchrun --nproc-per-node)")
            torch.cuda.set_device(local)  # NCCL uses the current device
        backend, timeout = "nccl" if torch.cuda.is_available() else "gloo", datetime.timedelta(seconds=_timeout_s())
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun: its agent started every rank
            dist.init_process_group(backend, timeout=timeout)
            return
        _join_by_hand(backend, timeout)


def _join_by_hand(backend: str, timeout: datetime.timedelta) -> None:
    """A group described by WORLD_SIZE/RANK/MASTER_* set by hand (or left in a shell by an earlier
    torchrun): say what this rank waits for, and give up in minutes if the others never come."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    join = _timeout_s(JOIN_TIMEOUT, 300)
    print(f"rank {rank}: joining a process group of WORLD_SIZE={world} at {host}:{port}; waiting up to {join:g} s "
          f"({JOIN_TIMEOUT}) for the other ranks", flush=True)
    try:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=join))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, TimeoutError) as e:  # DistStoreError is a RuntimeError
        raise ValueError(f"the other ranks of WORLD_SIZE={world} did not join {host}:{port} within {join:g} s "
                         f"({type(e).__name__}): start every rank (torchrun), or unset WORLD_SIZE and RANK if they "
                         "were left from an earlier torchrun") from None


def launched_rank() -> int:
    """This process's global rank as torchrun set it (0 without torchrun), before any group exists."""
    return int(os.environ.get("RANK", "0")) if _wanted() else 0


def rank_and_world() -> tuple[int, int]:
    init()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device(requested: str = "") -> torch.device:
    """The one device choice: `requested` (e.g. "cpu", "cuda:1") if given, else this rank's GPU
    when CUDA is available, else the CPU."""
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {requested}: this torch build or machine has no CUDA device; "
                                 "use --device cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup(out: Path, requested_device: str = "", seed: int = 0) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, torch seeded; rank 0 creates the stage's folder."""
    torch.manual_seed(seed)
    rank, world = rank_and_world()
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
    return rank, world, device(requested_device)


PRECISIONS = values(Precision)


def autocast(device: torch.device, precision: str = "fp32", cache: bool = True):
    """A training step's precision: fp32 (PyTorch's defaults, the reference code's numerics: fp32
    matmuls, cuDNN free to use TF32 convolutions), tf32 (matmuls in TF32 too, on CUDA) or bf16
    (autocast, on CUDA or the CPU; the VQ op accumulates in fp32 whatever comes in). cache=False
    inside a CUDA graph capture (autocast's weight-cast cache would outlive the graph)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around `model` when distributed; rank 0's initial weights are broadcast by DDP.
    On GPUs, BatchNorm layers become SyncBatchNorm (changed in place, so `model` sees it): batch
    statistics over the global batch, as one process would compute them. On CPUs (gloo), where
    PyTorch has no SyncBatchNorm, each rank normalises by its own batch and DDP copies rank 0's
    running statistics to the others before each forward."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if device.type != "cuda":
        return DistributedDataParallel(model)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below a non-BatchNorm root
    return DistributedDataParallel(model, device_ids=[device.index])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(rows, device) -> np.ndarray:
    """Every rank's array of rows (same trailing shape and dtype; any number of rows), joined in
    rank order; `rows` itself when not distributed. Moves through `device` (NCCL needs CUDA)."""
    if not dist.is_initialized():
        return rows
    world = dist.get_world_size()
    counts = torch.tensor([len(rows)], device=device)
    sizes = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(sizes, counts)
    sizes = [int(n) for n in torch.cat(sizes).tolist()]
    local = torch.zeros((max(sizes), *rows.shape[1:]), dtype=torch.from_numpy(rows[:0]).dtype, device=device)
    local[:len(rows)] = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, sizes)])
