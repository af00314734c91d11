"""What this process may use of the machine: the cores it is allowed to run on (its CPU affinity:
a SLURM job's or a taskset's share, not the whole node's os.cpu_count())."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1
