"""Frame storage and window loading on real Procgen frames, ours beside the anchors, same run.

1. Chunk size: bytes per frame of LZ4-HC (and zstd) chunks, and what a batch costs to decode
   from them (the compressed path decodes, per window, its chunk up to the frames it needs).
2. Window batches/s (batch 128 of o_{t-1}, o_t, o_{t+1}) with the host RAM each holds (peak RSS
   of its own process over the idle one) and the disk it reads:
   ours: the compressed shards (CPU threads; DALI's GPU inflate when a GPU is there), the decoded
   memmap, each through the prefetching loader the stages use; anchors: a torch DataLoader
   (2 workers) over the decoded memmap, and the reference LAPO way (all npz chunks in RAM, indexed).
3. The arithmetic for the paper's 8M frames from the measured bytes per frame.

    python benchmarks/loader.py [--frames 20000] [--batches 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/loader.py`: the repository root on the path, not benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import dump_json, median_time, print_table

PAPER_FRAMES = 8_000_000
BATCH, WINDOW = 128, 3


def _rss(field: str = "VmHWM") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def chunk_rows(frames: np.ndarray, repeats: int) -> list[dict]:
    """Per chunk size: B/frame, and batches/s of one thread decoding what 128 random windows need."""
    from lapo_fast.data.compressed import _lz4_partial
    from lapo_fast.data.format import compress, decompress

    partial = _lz4_partial()
    fb = frames[0].nbytes
    flat = frames.reshape(len(frames), -1)
    rng = np.random.default_rng(0)
    starts = [rng.integers(0, len(frames) - WINDOW, BATCH) for _ in range(50)]
    rows = []
    for codec, level, chunk in [("lz4", 9, 16), ("lz4", 9, 24), ("lz4", 9, 32), ("lz4", 9, 64), ("lz4", 9, 256),
                                ("zstd", 3, 256)]:
        blobs = [np.frombuffer(compress(codec, flat[i:i + chunk].tobytes(), level), np.uint8)
                 for i in range(0, len(frames), chunk)]
        out = np.empty(chunk * fb, np.uint8)

        def batches():
            for s in starts:
                for w in s:
                    k, o = divmod(int(w), chunk)
                    for kk, need in ((k, min(o + WINDOW, chunk)), (k + 1, o + WINDOW - chunk)):
                        if need <= 0 or kk >= len(blobs):
                            continue
                        n = min(chunk, len(frames) - kk * chunk)
                        if codec == "lz4" and partial is not None:
                            partial(blobs[kk].ctypes.data, out.ctypes.data, len(blobs[kk]), need * fb, need * fb)
                        else:
                            decompress(codec, blobs[kk], n * fb)

        t = median_time(batches, repeats)
        stored = sum(map(len, blobs))
        rows.append({"what": f"{codec}-{level}, {chunk}-frame chunks", "bytes_per_frame": stored / len(frames),
                     "ratio": len(frames) * fb / stored, "batches_per_s": len(starts) / t,
                     "paper_gib": PAPER_FRAMES * stored / len(frames) / 2**30})
    return rows


def one(kind: str, ds_dir: str, npz_dir: str, batches: int, repeats: int) -> dict:
    """One contender in this (fresh) process: batches/s and peak RSS over the idle process."""
    import torch

    from lapo_fast.data import CompressedFrames, FrameDataset, WindowSampler, make_loader
    from lapo_fast.data.planner import LoaderPlan, open_frames

    torch.set_num_threads(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # ours: the loaders the stages use there
    ds = FrameDataset(ds_dir)
    base = _rss("VmRSS")
    disk, note = sum(s.nbytes for s in ds.manifest.shards), ""
    loader, sync = None, torch.cuda.synchronize if device == "cuda" else None  # ours end on the device
    if kind in ("compressed", "compressed-1", "dali"):
        frames = CompressedFrames(ds, threads=1 if kind == "compressed-1" else 2)
        sampler = WindowSampler(frames, ds.episodes, context=1, batch_size=BATCH, seed=0)
        if kind == "dali":
            from lapo_fast.data import DaliDecodeLoader

            loader = DaliDecodeLoader(sampler, frames, device_id=0)
        else:
            loader = make_loader(sampler, LoaderPlan("compressed", ""), device)
    elif kind in ("cache", "cache-mmap"):
        mm = ds.cache()
        disk = mm.nbytes
        for i in range(0, len(mm), 4096):  # every contender starts from a warm page cache
            np.asarray(mm[i:i + 4096]).max()
        plan = LoaderPlan("cache", "")
        frames = open_frames(ds, plan, device) if kind == "cache" else mm  # pread (the stages') or the memmap
        loader = make_loader(WindowSampler(frames, ds.episodes, context=1, batch_size=BATCH, seed=0), plan, device)
    elif kind == "dataloader":
        mm = ds.cache()
        disk, sync = mm.nbytes, None
        starts = WindowSampler(mm, ds.episodes, context=1, batch_size=BATCH).starts

        class Windows(torch.utils.data.Dataset):
            def __len__(self):
                return len(starts)

            def __getitem__(self, i):
                s = starts[i]
                return torch.from_numpy(np.array(mm[s:s + WINDOW]))

        dl = torch.utils.data.DataLoader(Windows(), batch_size=BATCH, shuffle=True, num_workers=2,
                                         persistent_workers=True, prefetch_factor=4)
        it = iter(dl)

        def pull():
            nonlocal it
            for _ in range(batches):
                try:
                    next(it)
                except StopIteration:
                    it = iter(dl)
                    next(it)
    elif kind == "lapo":
        t0 = time.perf_counter()
        files = sorted(Path(npz_dir).glob("*.npz"))
        obs = np.concatenate([np.load(f)["obs"] for f in files])
        disk, sync = sum(f.stat().st_size for f in files), None
        rng = np.random.default_rng(0)
        valid = np.arange(len(obs) - 2)  # the reference code samples windows across episode ends

        def pull():
            for _ in range(batches):
                obs[rng.choice(valid, BATCH)[:, None] + np.arange(WINDOW)]
        note = f" (load {time.perf_counter() - t0:.1f}s)"
    else:
        raise ValueError(kind)
    if loader is not None:
        def pull():
            for _ in range(batches):
                next(loader)
    t = median_time(pull, repeats, sync=sync)
    if loader is not None:
        loader.close()
    return {"batches_per_s": batches / t, "ram_mb": (_rss() - base) / 2**20, "disk_mb": disk / 2**20,
            "frames": ds.num_frames, "note": note}


NAMES = {"compressed": "ours: compressed shards, 2 CPU threads -> loader",
         "compressed-1": "ours: compressed shards, 1 CPU thread -> loader",
         "dali": "ours: compressed shards, DALI GPU inflate -> loader",
         "cache": "ours: decoded cache, pread -> loader",
         "cache-mmap": "ours before: decoded memmap -> loader (SIGBUS if truncated)",
         "dataloader": "anchor: torch DataLoader (2 workers), decoded memmap",
         "lapo": "anchor: LAPO npz chunks in RAM"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--one", nargs=3, metavar=("KIND", "DATASET", "NPZ"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.batches, args.repeats)))
        return

    import torch

    from lapo_fast.data import FrameDataset, collect
    from lapo_fast.runtime.acting import random_policy

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"collecting {args.frames} real starpilot frames (uniform-random policy) ...", flush=True)
        collect(tmp / "ds", "starpilot", random_policy(), frames=args.frames, num_envs=32, progress=False)
        ds = FrameDataset(tmp / "ds", cache_dir=tmp / "decoded")
        frames = np.asarray(ds.frames(0, ds.num_frames))
        (tmp / "npz").mkdir()
        for i in range(0, len(frames), 5000):  # the reference code's chunked npz layout
            np.savez(tmp / "npz" / f"chunk_{i // 5000}.npz", obs=frames[i:i + 5000])

        crow = chunk_rows(frames, args.repeats)
        print()
        print_table(crow, [("what", "codec", ""), ("bytes_per_frame", "B/frame", ",.0f"),
                           ("ratio", "x smaller", ".1f"), ("batches_per_s", "batches/s decoded (1 thread)", ",.0f"),
                           ("paper_gib", "8M frames, GiB", ".1f")])
        kinds = ["compressed", "compressed-1"] + (["dali"] if torch.cuda.is_available() else []) + \
                ["cache", "cache-mmap", "dataloader", "lapo"]
        env = {**os.environ, "LAPO_FAST_CACHE_DIR": str(tmp / "decoded")}
        lrow = []
        for kind in kinds:
            # Each loader in its own process: its RSS and page cache use are its own.
            out = subprocess.run([sys.executable, "-m", "benchmarks.loader", "--one", kind, str(tmp / "ds"),
                                  str(tmp / "npz"), "--batches", str(args.batches), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
            if out.returncode:
                why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
                print(f"{kind}: failed: {why}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["what"] = NAMES[kind] + r["note"]
            r["ram_per_frame"] = r["ram_mb"] * 2**20 / r["frames"]
            lrow.append(r)
        lapo = next(r for r in lrow if r["what"].startswith(NAMES["lapo"]))
        for r in lrow:
            r["over_lapo"] = r["batches_per_s"] / lapo["batches_per_s"]
        print()
        print_table(lrow, [("what", f"window batches ({BATCH} x {WINDOW} frames), {ds.num_frames:,} frames", ""),
                           ("batches_per_s", "batches/s", ",.0f"), ("over_lapo", "x LAPO npz", ".2f"),
                           ("ram_mb", "host RAM MiB", ",.0f"), ("ram_per_frame", "RAM B/frame", ",.0f"),
                           ("disk_mb", "disk MiB", ",.0f")])
        bpf = sum(s.nbytes for s in ds.manifest.shards) / ds.num_frames
        comp = next(r for r in lrow if r["what"] == NAMES["compressed"])
        fixed = comp["ram_mb"] * 2**20 - bpf * ds.num_frames  # scratch, prefetch, index: not per frame
        paper = {"frames": PAPER_FRAMES, "stored_bytes_per_frame": bpf,
                 "compressed_gib": PAPER_FRAMES * bpf / 2**30,
                 "decoded_gib": PAPER_FRAMES * ds.manifest.frame_bytes / 2**30,
                 "index_gib": PAPER_FRAMES / ds.manifest.chunk_frames * 5 * 8 / 2**30 + PAPER_FRAMES * 8 / 2**30,
                 "fixed_mib": max(fixed, 0) / 2**20}
        paper["host_ram_gib"] = paper["compressed_gib"] + paper["index_gib"] + paper["fixed_mib"] / 1024
        print(f"\n8M frames from the compressed shards ({ds.manifest.chunk_frames}-frame chunks): "
              f"{bpf:,.0f} B/frame x 8M = {paper['compressed_gib']:.1f} GiB of shards on disk and, all in the page "
              f"cache, in RAM; + chunk index and window starts {paper['index_gib']:.2f} GiB; + the loader's buffers "
              f"{paper['fixed_mib']:.0f} MiB (measured here) = {paper['host_ram_gib']:.1f} GiB of host RAM; no "
              f"decoded copy (that would be {paper['decoded_gib']:.0f} GiB).")
        if args.json:
            dump_json(args.json, {"benchmark": "loader", "chunks": crow, "loaders": lrow, "paper": paper})


if __name__ == "__main__":
    main()
