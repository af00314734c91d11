"""What many test files share: small datasets, the CLI's one-line errors, an interruption after a
checkpoint, a video clip. Imported as `from helpers import ...` (tests/ is on pytest's path)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest


def write_dataset(path, *, episodes: int = 4, length: int = 20, seed: int = 0, env: str | None = "starpilot",
                  done: bool = False, actions: bool = True) -> Path:
    """`episodes` episodes of random 64x64 frames (with random true actions, and a done flag on
    each episode's last frame if asked)."""
    from lapo_fast.data import DatasetWriter

    rng = np.random.default_rng(seed)
    with DatasetWriter(path, source={"env": env} if env else None) as w:
        for _ in range(episodes):
            meta = {"action": rng.integers(0, 15, length)} if actions else {}
            if done:
                meta["done"] = np.arange(length) == length - 1
            w.add_episode(rng.integers(0, 255, (length, 64, 64, 3), dtype=np.uint8), **meta)
    return Path(path)


def cli_error(argv, capsys) -> str:
    """The one-line error `lapo-fast ARGV` exits 2 with (no traceback)."""
    from lapo_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # after any progress bar, which ends its line first
    assert last.startswith("lapo-fast: error: ") and "Traceback" not in err, err
    return last


@contextlib.contextmanager
def interrupt_after_checkpoint(step: int):
    """Ctrl-C right after the checkpoint of `step` is written, wherever a stage writes it: how a
    test interrupts a run to check that the rerun resumes it."""
    import lapo_fast.runtime.checkpoint as checkpoint

    real = checkpoint.save_checkpoint

    def save(directory, at, *args, **kwargs):
        saved = real(directory, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt
        return saved

    holders = [m for m in list(sys.modules.values()) if getattr(m, "save_checkpoint", None) is real]
    for m in holders:
        m.save_checkpoint = save
    try:
        yield
    finally:
        for m in holders:
            m.save_checkpoint = real


def write_video(path, frames: int = 90, codec: str = "libvpx-vp9") -> Path:
    """A 64x64 clip of a 4-pixel white bar moving right, one pixel a frame."""
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
    return Path(path)


def write_lapo_chunk(path, obs, done, actions=None) -> None:
    """A chunk of the reference code's dataset format (obs, ta, done, rewards, ep_returns, values)."""
    n = len(obs)
    np.savez(path, obs=obs, ta=(np.zeros((n, 1), np.int64) if actions is None else actions[:, None]), done=done,
             rewards=np.zeros(n), ep_returns=np.zeros(n), values=np.zeros(n))
