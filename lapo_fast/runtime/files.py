"""Atomic writes: the one way anything the user keeps is written. A reader (or a run killed
mid-write, or a power cut) sees the old file or the new one, never half of one.

    atomic_write(path, b"bytes")                      # bytes or str
    atomic_write(path, lambda tmp: np.save(tmp, a))   # any writer given a temporary path
    write_json(path, {"step": 3})
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, content: bytes | str | Callable[[Path], object]) -> Path:
    """Writes `content` to a temporary name beside `path`, fsyncs it, renames it over `path` and
    fsyncs the directory (so the rename itself survives a crash). `content` may be a function that
    writes a file or a whole directory at the temporary path it is given; a directory replaces
    the old one. The temporary name keeps `path`'s suffix (some writers, np.save, add theirs)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    _remove(tmp)
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, (bytes, bytearray, memoryview)):
            tmp.write_bytes(content)
        else:
            content(tmp)
        for f in (tmp.rglob("*") if tmp.is_dir() else [tmp]):
            if f.is_file():
                _fsync(f)
        if tmp.is_dir():
            _fsync(tmp)
            _remove(path)  # a directory cannot be renamed over a non-empty one
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync(path.parent)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path, payload) -> Path:
    return atomic_write(path, json.dumps(payload, indent=1, default=str))


def read_json(path, default=None):
    """The JSON at `path`, `default` when there is none; a damaged file is a clear error."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to start that step again") from None
