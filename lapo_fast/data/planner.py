"""Which way a stage reads its frames, from what the machine has; the one place that decides.

    loader = auto | resident | cache | compressed      (a field of every frame-reading stage)

- resident: every frame decoded once into the training device's memory (GPU memory on CUDA,
  process RAM on the CPU), straight from the compressed shards; batches are gathered in place.
- cache: the decoded uint8 file on disk (FrameDataset.cache(), read with pread: data.cached),
  shared by every process and stage through the page cache; decoded once, kept for the next stage.
- compressed: no decoded copy anywhere; the memory-mapped shards are decoded batch by batch (CPU
  threads, or DALI on the GPU when it runs there).

auto: resident on a GPU whose free memory holds the decoded frames twice over; else a decoded
cache that already exists; else a new cache when the disk has room and RAM can hold it in the page
cache (single process only: no rank ever waits on another's decode); else compressed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lapo_fast.choices import Loader, values

from .cached import CachedFrames
from .compressed import CompressedFrames, decode_all, default_threads
from .reader import FrameDataset
from .stores import ArrayFrames, DeviceFrames

LOADERS = values(Loader)
GiB = 2**30


@dataclass
class Machine:
    """What the plan depends on (measured by `machine`; tests pass their own)."""

    cuda: bool
    gpu_free: int          # bytes of free memory on the training GPU (0 without one)
    ram_available: int     # bytes the kernel could give us now (MemAvailable)
    disk_free: int         # bytes free where the decoded cache would go
    dali: bool             # DALI runs on the training GPU
    world: int = 1         # processes training together


@dataclass
class LoaderPlan:
    kind: str              # resident | cache | compressed
    why: str
    decoder: str = "cpu"   # compressed: "cpu" threads or "dali"


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.0f} MiB"


def machine(ds: FrameDataset, device, world: int = 1) -> Machine:
    device = torch.device(device)
    cuda = device.type == "cuda"
    gpu_free = torch.cuda.mem_get_info(device)[0] if cuda else 0
    cache_dir = ds.cache_path().parent
    while not cache_dir.exists() and cache_dir != cache_dir.parent:
        cache_dir = cache_dir.parent
    dali = False
    if cuda and ds.manifest.codec == "lz4":
        from .loader import dali_available

        dali = dali_available(device.index if device.index is not None else torch.cuda.current_device())
    return Machine(cuda, gpu_free, _ram_available(), shutil.disk_usage(cache_dir).free, dali, world)


def _ram_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_loader(ds: FrameDataset, setting: str, facts: Machine) -> LoaderPlan:
    """The loader for `ds` on a machine with `facts`, as asked by `setting`, and why."""
    if setting not in LOADERS:
        raise ValueError(f"loader={setting!r}: choose one of {', '.join(LOADERS)}")
    decoded = ds.num_frames * ds.manifest.frame_bytes
    stored = sum(s.nbytes for s in ds.manifest.shards)
    size = f"{_size(decoded)} decoded, {_size(stored)} compressed"
    where = "GPU memory" if facts.cuda else "RAM"
    room = facts.gpu_free if facts.cuda else facts.ram_available // max(1, facts.world)
    resident_fits = 2 * decoded <= room  # the rest is the model's, and the other ranks'
    cache_ready = ds.cache_ready()
    cache_fits = decoded + GiB <= facts.disk_free and 2 * decoded <= facts.ram_available
    decoder = "dali" if facts.cuda and facts.dali else "cpu"
    compressed_why = ("decoding each batch's chunks on the GPU (DALI)" if decoder == "dali"
                      else f"decoding each batch's chunks on {default_threads(facts.world)} CPU threads")

    if setting == "resident":
        if not resident_fits:
            raise ValueError(f"loader=resident: the frames take {_size(decoded)} decoded, more than half of "
                             f"the {_size(room)} free {where}: use loader=compressed (or auto)")
        return LoaderPlan("resident", f"asked for; {size}")
    if setting == "cache":
        if not cache_ready and facts.world > 1:
            raise ValueError(f"loader=cache under {facts.world} processes: no decoded cache of {ds.dir} yet, and "
                             "no rank waits on another's decode: build it first (one process: `lapo-fast data cache "
                             f"{ds.dir}`) or use loader=compressed")
        return LoaderPlan("cache", f"asked for; {size}")
    if setting == "compressed":
        return LoaderPlan("compressed", f"asked for; {size}; {compressed_why}", decoder)

    if facts.cuda and resident_fits:
        return LoaderPlan("resident", f"{size}: fits twice in the {_size(room)} free {where}")
    if cache_ready:
        return LoaderPlan("cache", f"{size}: a decoded cache is already at {ds.cache_path()}")
    if cache_fits and facts.world == 1:
        return LoaderPlan("cache", f"{size}: the disk has {_size(facts.disk_free)} free and RAM "
                                   f"{_size(facts.ram_available)} available for a decoded cache")
    if not facts.cuda and facts.world > 1 and resident_fits:
        return LoaderPlan("resident", f"{size}; {facts.world} processes: each decodes its own copy into RAM "
                                      "(no rank waits on another's decode)")
    reason = ("a decoded cache would be built by one rank while the others wait" if facts.world > 1 and cache_fits
              else f"no room for a decoded copy ({_size(facts.disk_free)} disk free, "
                   f"{_size(facts.ram_available)} RAM available)")
    return LoaderPlan("compressed", f"{size}; {reason}; {compressed_why}", decoder)


def open_frames(ds: FrameDataset, plan: LoaderPlan, device, *, world: int = 1):
    """The FrameStore the plan reads from: the decoded cache file (CachedFrames), the decoded frames
    in RAM (ArrayFrames) or GPU memory (DeviceFrames) when resident, or the shards (CompressedFrames)."""
    device = torch.device(device)
    if plan.kind == "cache":
        ds.cache()  # checked against the dataset (rebuilt if damaged), then read with pread
        return CachedFrames(ds.cache_path(), (ds.num_frames, *ds.manifest.frame_shape))
    if plan.kind == "resident":
        shape = (ds.num_frames, *ds.manifest.frame_shape)
        out = (torch.empty(shape, dtype=torch.uint8, device=device) if device.type == "cuda"
               else np.empty(shape, np.uint8))
        decode_all(ds, out, threads=default_threads(world))
        return DeviceFrames(out) if device.type == "cuda" else ArrayFrames(out)
    return CompressedFrames(ds, threads=default_threads(world))


def make_loader(sampler, plan: LoaderPlan, device, *, prefetch: int | None = None):
    """The loader of `sampler`'s batches for `plan` (the sampler's frames came from open_frames);
    prefetch: batches made ahead on a thread (default: 4 for a GPU, none for the CPU)."""
    from .loader import DaliDecodeLoader, host_or_device_loader

    device = torch.device(device)
    if plan.kind == "compressed" and plan.decoder == "dali" and device.type == "cuda" \
            and not sampler.frames.gathers_on_device:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DaliDecodeLoader(sampler, sampler.frames, device_id=index)
    return host_or_device_loader(sampler, device, prefetch)


def window_loader(ds: FrameDataset, device="cpu", *, loader: str = "auto", context: int = 1, batch_size: int = 128,
                  seed: int = 0, meta: dict | None = None):
    """Batches of windows (o_{t-k}..o_t, o_{t+1}) of `ds` on `device`, uint8, its frames read as
    the planner decides for `loader` (printed)."""
    from lapo_fast.runtime.distributed import device as checked_device

    from .windows import WindowSampler

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"window_loader: seed must be an int >= 0, got {seed!r}")
    device = checked_device(str(device))  # "cuda" on a CPU build: one line naming the way out
    plan, frames = frames_for("data", ds, loader, device)
    sampler = WindowSampler(frames, ds.episodes, context=context, batch_size=batch_size, seed=seed, meta=meta)
    return make_loader(sampler, plan, device)


def frames_for(stage: str, ds: FrameDataset, setting: str, device, *, world: int = 1, rank: int = 0,
               facts: Machine | None = None):
    """(plan, frames) for a stage: planned (printed once, by rank 0) and opened."""
    plan = plan_loader(ds, setting, facts or machine(ds, device, world))
    if rank == 0:
        extra = f", {plan.decoder} decoder" if plan.kind == "compressed" else ""
        print(f"{stage}: loader {plan.kind}{extra} ({plan.why})", flush=True)
    return plan, open_frames(ds, plan, device, world=world)
