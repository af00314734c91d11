"""Frame storage and window loading on real Procgen frames, ours beside the anchors, same run.

1. Codecs: bytes per frame and single-core decode frames/s for LZ4-HC and zstd in chunks.
2. Window batches/s (batch 128 of o_{t-1}, o_t, o_{t+1}): our sampler on the decoded memmap
   (direct, and through the prefetch thread), a torch DataLoader (2 workers) over the same memmap,
   and the reference LAPO way (all npz chunks loaded into RAM, then indexed).

    python benchmarks/loader.py [--frames 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import dump_json, median_time, print_table  # noqa: E402


def codec_rows(frames: np.ndarray, repeats: int) -> list[dict]:
    from lapo_fast.data.format import compress, decompress

    raw_fb = frames[0].nbytes
    rows = []
    for codec, level, chunk in [("lz4", 9, 256), ("lz4", 9, 64), ("zstd", 3, 256), ("zstd", 19, 256)]:
        blobs = [compress(codec, frames[i:i + chunk].tobytes(), level) for i in range(0, len(frames), chunk)]
        sizes = [min(chunk, len(frames) - i) * raw_fb for i in range(0, len(frames), chunk)]

        def decode():
            for b, n in zip(blobs, sizes):
                decompress(codec, b, n)

        t = median_time(decode, repeats)
        stored = sum(map(len, blobs))
        rows.append({"what": f"{codec}-{level} / {chunk}-frame chunks", "bytes_per_frame": stored / len(frames),
                     "ratio": len(frames) * raw_fb / stored, "frames_per_s": len(frames) / t})
    return rows


def loader_rows(ds_dir: Path, npz_dir: Path, batches: int, repeats: int) -> list[dict]:
    import torch

    from lapo_fast.data import FrameDataset, PrefetchLoader, WindowSampler

    ds = FrameDataset(ds_dir)
    mm = ds.cache()
    for i in range(0, len(mm), 4096):  # every contender starts from a warm page cache
        np.asarray(mm[i:i + 4096]).max()
    rows = []

    sampler = WindowSampler(mm, ds.episodes, context=1, batch_size=128, seed=0)
    t = median_time(lambda: [sampler.sample() for _ in range(batches)], repeats)
    rows.append({"what": "ours: WindowSampler on memmap", "batches_per_s": batches / t})

    loader = PrefetchLoader(WindowSampler(mm, ds.episodes, context=1, batch_size=128, seed=0), prefetch=8)
    t = median_time(lambda: [next(loader) for _ in range(batches)], repeats)
    loader.close()
    rows.append({"what": "ours: PrefetchLoader (thread) -> torch", "batches_per_s": batches / t})

    starts = sampler.starts

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(starts)

        def __getitem__(self, i):
            s = starts[i]
            return torch.from_numpy(np.array(mm[s:s + 3]))

    dl = torch.utils.data.DataLoader(Windows(), batch_size=128, shuffle=True, num_workers=2,
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

    t = median_time(pull, repeats)
    rows.append({"what": "anchor: torch DataLoader, 2 workers", "batches_per_s": batches / t})
    del it, dl

    t0 = time.perf_counter()
    obs = np.concatenate([np.load(f)["obs"] for f in sorted(npz_dir.glob("*.npz"))])
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    valid = np.arange(len(obs) - 2)  # the reference code samples windows across episode ends

    def ram():
        for _ in range(batches):
            i = rng.choice(valid, 128)[:, None] + np.arange(3)
            obs[i]

    t = median_time(ram, repeats)
    rows.append({"what": f"anchor: LAPO npz chunks in RAM (load {load_s:.1f}s)", "batches_per_s": batches / t})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from lapo_fast.data import FrameDataset, collect, random_policy

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"collecting {args.frames} real starpilot frames (uniform-random policy) ...", flush=True)
        collect(tmp / "ds", "starpilot", random_policy(), frames=args.frames, num_envs=32, progress=False)
        frames = FrameDataset(tmp / "ds").cache()
        (tmp / "npz").mkdir()
        for i in range(0, len(frames), 5000):  # the reference code's chunked npz layout
            np.savez(tmp / "npz" / f"chunk_{i // 5000}.npz", obs=np.asarray(frames[i:i + 5000]))

        crow = codec_rows(np.asarray(frames), args.repeats)
        print()
        print_table(crow, [("what", "codec", ""), ("bytes_per_frame", "B/frame", ",.0f"),
                           ("ratio", "x smaller than raw", ".1f"), ("frames_per_s", "decode frames/s (1 core)", ",.0f")])
        lrow = loader_rows(tmp / "ds", tmp / "npz", args.batches, args.repeats)
        ours = lrow[1]["batches_per_s"]  # the prefetching loader is what training uses
        for r in lrow:
            r["ours_over_it"] = ours / r["batches_per_s"]
        print()
        print_table(lrow, [("what", "window batches (128 x 3 frames)", ""), ("batches_per_s", "batches/s", ",.0f"),
                           ("ours_over_it", "ours / it", ".2f")])
        if args.json:
            dump_json(args.json, {"benchmark": "loader", "codecs": crow, "loaders": lrow})


if __name__ == "__main__":
    main()
