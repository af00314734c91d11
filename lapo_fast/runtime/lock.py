"""One process per run directory (or dataset folder): an advisory file lock, released by the
kernel when its holder exits or dies, so a crashed run never leaves a stale lock behind.

    with folder_lock(run_dir, "lapo-fast lam"):
        ...   # a second process gets FolderInUse naming the holder's pid and command

Re-entrant within a process (`train` holds the run while each stage takes it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from pathlib import Path

LOCK_FILE = ".lapo-fast.lock"
_held: dict[Path, list] = {}  # folder -> [open lock file, depth, pid]: this process's locks
_guard = threading.Lock()


class FolderInUse(ValueError):
    """Another process holds the folder."""


def holder_of(folder) -> str | None:
    """Who holds `folder`'s lock now ("pid N (command)"), or None: free, or no lock file there."""
    path = Path(folder) / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "another process"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _command() -> str:
    """This process's command line, short: what the other process's error names."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]) if sys.argv and sys.argv[0] else "python"


@contextlib.contextmanager
def folder_lock(folder, what: str | None = None):
    """Holds `folder`'s lock for the block (creating the folder); FolderInUse when another process
    has it."""
    folder = Path(folder).resolve()
    with _guard:
        if folder in _held and _held[folder][2] == os.getpid():  # (a forked child holds nothing)
            _held[folder][1] += 1
        else:
            folder.mkdir(parents=True, exist_ok=True)
            f = open(folder / LOCK_FILE, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise FolderInUse(f"{folder} is in use by {holder}: wait for it to finish or stop it (its lock goes "
                                  "when it exits), or use another --out") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} ({what or _command()})\n")
            f.flush()
            _held[folder] = [f, 1, os.getpid()]
    try:
        yield
    finally:
        with _guard:
            entry = _held.get(folder)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    _held.pop(folder)
                    entry[0].close()  # closing the file releases the lock
