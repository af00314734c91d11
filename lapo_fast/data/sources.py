"""Where frame datasets come from: our engine (collect), the reference LAPO code's expert data
(import-lapo), and action-free video from anywhere (ingest)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from lapo_fast.envs.games import DEFAULT_DISTRIBUTION_MODE, NUM_ACTIONS, OBS_SHAPE
from lapo_fast.runtime.acting import Actor
from lapo_fast.runtime.lock import folder_lock

from .format import MANIFEST, DatasetError
from .writer import DatasetWriter

# What a resumed `collect` must share with the run that started the dataset.
RESUME_MUST_MATCH = ("env", "policy", "start_level", "num_levels", "distribution_mode", "num_envs", "codec")
COMMIT_SECONDS = 30.0  # `collect` commits at least this often, so a kill loses little


def by_number(paths) -> list[Path]:
    """Paths ordered by the numbers in their names (2.npz before 10.npz), then by name."""
    def key(p: Path):
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", p.name)]
    return sorted(map(Path, paths), key=key)


def collect(out_dir, env_name: str, policy: Actor, *, frames: int, num_envs: int = 64, seed: int = 0,
            start_level: int = 0, num_levels: int = 0, distribution_mode: str = DEFAULT_DISTRIBUTION_MODE,
            policy_name: str = "random", progress: bool = True, codec: str = "lz4",
            shard_frames: int = 16384, resume: bool = True) -> Path:
    """Records whole episodes from `num_envs` parallel envs until `frames` frames are stored.

    Each env's episode is buffered and written when it ends (episodes are never cut), with the
    true action, reward and done per frame and the episode return. The level range
    [start_level, start_level + num_levels) is the split (e.g. train: 0..N, test: N..). Writes
    shards as it goes: an interrupted run leaves a readable dataset, and running again with the
    same arguments resumes (with new seeds) until `frames` are stored.
    """
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"collect: frames must be a positive number of frames to store, got {frames!r}")
    with folder_lock(out_dir):  # one process per dataset folder
        return _collect(Path(out_dir), env_name, policy, frames=frames, num_envs=num_envs, seed=seed,
                        start_level=start_level, num_levels=num_levels, distribution_mode=distribution_mode,
                        policy_name=policy_name, progress=progress, codec=codec, shard_frames=shard_frames,
                        resume=resume)


def _collect(out_dir: Path, env_name: str, policy: Actor, *, frames: int, num_envs: int, seed: int,
             start_level: int, num_levels: int, distribution_mode: str, policy_name: str, progress: bool,
             codec: str, shard_frames: int, resume: bool) -> Path:
    from lapo_fast.envs import ProcgenVecEnv

    source = {"kind": "collect", "env": env_name, "policy": policy_name, "seed": seed,
              "num_envs": num_envs, "start_level": start_level, "num_levels": num_levels,
              "distribution_mode": distribution_mode}
    resuming = (out_dir / MANIFEST).exists()
    writer = DatasetWriter(out_dir, codec=codec, source=source, resume=resume, shard_frames=shard_frames)
    if resuming:
        had = {**writer.manifest.source, "codec": writer.manifest.codec}
        for key, value in {**source, "codec": codec}.items():
            if key in RESUME_MUST_MATCH and had.get(key) != value:
                raise DatasetError(f"{out_dir} was collected with {key}={had.get(key)!r}, this run asks for "
                                   f"{value!r}: collect into a new --out, or rerun with the same settings to resume")
    run = len(writer.manifest.source.setdefault("runs", []))
    writer.manifest.source["runs"].append({"seed": seed + run})
    env = ProcgenVecEnv(env_name, num_envs, seed=seed + run, start_level=start_level,
                        num_levels=num_levels, distribution_mode=distribution_mode)
    obs_buf: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
    act_buf: list[list[int]] = [[] for _ in range(num_envs)]
    rew_buf: list[list[float]] = [[] for _ in range(num_envs)]
    try:
        obs, _ = env.reset()
        committed = time.monotonic()
        with _progress(frames, writer.num_frames, progress) as bar:  # closed (its line ended) on errors too
            while writer.num_frames < frames:
                if time.monotonic() - committed > COMMIT_SECONDS:  # a kill loses at most this much work
                    writer.flush()
                    committed = time.monotonic()
                actions = np.asarray(policy(obs), dtype=np.int32)
                snapshot = obs.copy()
                obs, reward, terminated, _, info = env.step(actions)
                for i in range(num_envs):
                    obs_buf[i].append(snapshot[i])
                    act_buf[i].append(int(actions[i]))
                    rew_buf[i].append(float(reward[i]))
                    if terminated[i]:
                        n = len(obs_buf[i])
                        done = np.zeros(n, np.bool_)
                        done[-1] = True
                        writer.add_episode(np.stack(obs_buf[i]), action=np.array(act_buf[i]),
                                           reward=np.array(rew_buf[i]), done=done,
                                           episode_return=float(info["final_return"][i]))
                        bar.update(n)
                        obs_buf[i], act_buf[i], rew_buf[i] = [], [], []
                        if writer.num_frames >= frames:
                            break
            writer.close()
    finally:
        env.close()
    return out_dir


def import_lapo(src_dir, out_dir, *, codec: str = "lz4", progress: bool = True) -> list[Path]:
    """Converts the reference LAPO code's expert data: a game folder with train/ and test/
    folders of .npz chunks (obs (N,64,64,3) uint8, ta, done, rewards, ep_returns, values), one
    chunk in memory at a time, into OUT/train and OUT/test (episode boundaries: _import_chunk)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    splits = [s for s in ("train", "test") if (src_dir / s).is_dir()]
    if not splits:
        raise DatasetError(f"{src_dir}: expected train/ and/or test/ folders of .npz chunks")
    for split in splits:
        if (out_dir / split / MANIFEST).exists():
            raise DatasetError(f"{out_dir / split} already holds a dataset: import into a new --out (or delete it)")
    made = []
    for split in splits:
        files = by_number((src_dir / split).glob("*.npz"))  # LAPO numbers its chunks: 0, 1, ..., 10, 11
        if not files:
            raise DatasetError(f"{src_dir / split}: no .npz chunks")
        writer = DatasetWriter(out_dir / split, codec=codec, source={
            "kind": "import-lapo", "from": str(src_dir / split), "order": "by the number in each file name",
            "chunks": [f.name for f in files]})
        carry: dict[str, list[np.ndarray]] = {}
        with _progress(None, 0, progress, desc=f"import {split}") as bar:
            for f in files:
                bar.update(_import_chunk(f, writer, carry))
        if writer.num_frames == 0:
            raise DatasetError(f"{src_dir / split}: no whole episode in these chunks (LAPO's chunks mark each "
                               "episode's first frame with done=True; fewer than two are marked here)")
        writer.close()  # frames from the last done on belong to an episode whose end is not here: dropped
        made.append(out_dir / split)
    return made


def _import_chunk(f: Path, writer: DatasetWriter, carry: dict) -> int:
    """One LAPO chunk into the writer: its whole episodes, the unfinished one carried over.
    Returns the chunk's frame count.

    LAPO's data comes from its PPO buffer, which stores dones[t] = next_done: done[t] is True when
    obs[t] is the first frame of an episode (the step before ended one; procgen has already reset).
    So an episode runs from one done to the frame before the next; frames before the stream's first
    done (an episode whose start is not in the data) and after its last (one whose end is not) are
    dropped. The return is the sum of the episode's rewards (rewards[t]: the step from obs[t])."""
    try:
        with np.load(f, allow_pickle=False) as chunk:
            obs = chunk["obs"]
            cols = {"action": chunk["ta"], "reward": chunk["rewards"], "done": chunk["done"].astype(bool),
                    "value": chunk["values"]}
    except Exception as e:  # numpy, zipfile and zlib each raise their own type for a damaged file
        raise DatasetError(f"{f}: not a LAPO data chunk, or a damaged one ({type(e).__name__}: {e})") from e
    if obs.dtype != np.uint8 or obs.shape[1:] != OBS_SHAPE:
        raise DatasetError(f"{f}: obs must be (N, {', '.join(map(str, OBS_SHAPE))}) uint8, got {obs.dtype} {obs.shape}")
    cols = {k: np.asarray(v).reshape(len(obs), -1)[:, 0] if np.ndim(v) > 1 else np.asarray(v) for k, v in cols.items()}
    action = cols["action"]
    if len(action) and (action.min() < 0 or action.max() >= NUM_ACTIONS):
        raise DatasetError(f"{f}: actions must lie in [0, {NUM_ACTIONS}), found {action.min()}..{action.max()}")
    cols["obs"] = obs
    if not carry:  # no episode has started yet in the stream: skip to the first that does
        first = np.flatnonzero(cols["done"])
        if not len(first):
            return len(obs)
        cols = {k: v[first[0]:] for k, v in cols.items()}
    for k, v in cols.items():
        carry.setdefault(k, []).append(v)
    joined = {k: np.concatenate(v) for k, v in carry.items()}  # begins with an episode's first frame
    starts = np.flatnonzero(joined["done"])
    for a, b in zip(starts[:-1], starts[1:]):
        n = b - a
        writer.add_episode(joined["obs"][a:b], action=joined["action"][a:b], reward=joined["reward"][a:b],
                           done=np.arange(n) == n - 1, value=joined["value"][a:b],  # ours: True on the last frame
                           episode_return=float(joined["reward"][a:b].sum()))
    carry.update({k: [v[starts[-1]:]] for k, v in joined.items()})
    return len(obs)


def _decode_video_pyav(path: Path, resize) -> np.ndarray:
    """Every frame of a video, or a DatasetError: no video stream, undecodable, or fewer frames
    than its container declares (a truncated file)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetError(f"{path}: no video stream in this file (audio only?)")
            stream = container.streams.video[0]
            frames = [resize(fr.to_image()) for fr in container.decode(stream)]
            expected = _declared_frames(container, stream)
    except av.error.FFmpegError as e:
        raise DatasetError(f"{path}: cannot decode video ({e})") from e
    if not frames:
        raise DatasetError(f"{path}: no frames decoded")
    if expected and len(frames) < 0.95 * expected:
        raise DatasetError(f"{path}: decoded {len(frames)} of the {expected} frames the file declares "
                           "(truncated or damaged?)")
    return np.stack(frames)


def _declared_frames(container, stream) -> int:
    """The frame count a video's container declares (0 when it declares none)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if rate and stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base * rate)))
    if rate and container.duration:
        return int(round(container.duration / 1_000_000 * float(rate)))
    return 0


DALI_CHUNK = 64  # frames decoded at full resolution at a time (1080p: ~400 MB), then resized


def _decode_video_dali(path: Path, size: int, device_id: int | None = 0, chunk: int = DALI_CHUNK) -> np.ndarray:
    """Every frame of a video, decoded and resized by DALI: on the GPU with NVDEC (H.264, HEVC,
    VP9, AV1) for a device_id, or DALI's CPU backend for device_id=None. Decoded `chunk` frames
    at a time, so memory stays bounded whatever the video's length and resolution."""
    from nvidia.dali import fn, pipeline_def, types

    # Not pipelined: each run() answers the start frame fed just before it.
    @pipeline_def(batch_size=1, num_threads=2, device_id=device_id, exec_pipelined=False, exec_async=False,
                  prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=0)
        # One frame past the chunk: a shorter answer says the video ended, without asking past its end.
        frames = fn.decoders.video(encoded, device="cpu" if device_id is None else "mixed", start_frame=start,
                                   sequence_length=chunk + 1, pad_mode="none")
        return fn.resize(frames, resize_x=size, resize_y=size)

    p = pipe()
    p.build()
    data = np.fromfile(path, np.uint8)
    parts, start = [], 0
    while True:
        p.feed_input("video", [data])
        p.feed_input("start", [np.array(start, np.int32)])
        try:
            (out,) = p.run()
        except RuntimeError as e:
            raise DatasetError(f"{path}: DALI cannot decode this video ({str(e).strip().splitlines()[0]})") from e
        frames = np.asarray((out.as_cpu() if device_id is not None else out).as_array()[0], dtype=np.uint8)
        parts.append(frames[:chunk])
        if len(frames) <= chunk:
            break
        start += chunk
    return np.concatenate(parts)


def ingest_videos(paths, out_dir, *, size: int = OBS_SHAPE[0], codec: str = "lz4", progress: bool = True,
                  decoder: str = "auto") -> Path:
    """Action-free video into a dataset: each video file (mp4/H.264, webm/VP9, anything FFmpeg
    reads) or folder of images (sorted by name) is one episode, resized to size x size.

    decoder: "pyav" (CPU, FFmpeg), "dali" (GPU, NVDEC), or "auto": DALI when CUDA and DALI are
    both present, else PyAV.
    """
    from PIL import Image, UnidentifiedImageError

    if decoder not in ("auto", "pyav", "dali"):
        raise ValueError(f"unknown decoder {decoder!r}; use auto, pyav or dali")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size!r}")
    if (Path(out_dir) / MANIFEST).exists():
        raise DatasetError(f"{out_dir} already holds a dataset: ingest into a new --out (or delete it)")
    if decoder == "auto":
        import torch

        from .loader import dali_available

        decoder = "dali" if torch.cuda.is_available() and dali_available(torch.cuda.current_device()) else "pyav"

    writer = DatasetWriter(out_dir, frame_shape=(size, size, 3), codec=codec, source={
        "kind": "ingest", "files": [str(p) for p in paths], "image_order": "by the number in each file name"})

    def resize(img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)

    def image(f: Path) -> np.ndarray:
        try:
            with Image.open(f) as img:
                return resize(img)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL's errors for damaged images
            raise DatasetError(f"{f}: not a readable image ({e})") from e

    with _progress(None, 0, progress, desc="ingest") as bar:
        for p in map(Path, paths):
            if p.is_dir():
                files = by_number(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                if not files:
                    raise DatasetError(f"{p}: no images in this folder")
                frames = np.stack([image(f) for f in files])
            elif p.is_file():
                frames = _decode_video_dali(p, size) if decoder == "dali" else _decode_video_pyav(p, resize)
            else:
                raise DatasetError(f"{p}: no such file or folder")
            writer.add_episode(frames)
            bar.update(len(frames))
    writer.close()
    return Path(out_dir)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _progress(total, initial, enabled, desc="frames"):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="frame", unit_scale=True,
                desc=desc, dynamic_ncols=True)

