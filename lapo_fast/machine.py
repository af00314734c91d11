"""What this process may use of the machine: the cores it is allowed to run on (its CPU affinity:
a SLURM job's or a taskset's share, not the whole node's os.cpu_count()), or fewer where
$LAPO_FAST_CPUS says so (a local sweep gives each of its parallel runs its share)."""

from __future__ import annotations

import os


CPUS_ENV = "LAPO_FAST_CPUS"


def available_cpus() -> int:
    """Cores this process may run on (its threads' default: the engine's, the CPU VQ kernel's)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        cores = os.cpu_count() or 1
    share = os.environ.get(CPUS_ENV, "")
    if share:
        if not share.isdigit() or int(share) < 1:
            raise ValueError(f"{CPUS_ENV}={share!r}: must be a whole number of cores >= 1 (unset: all that this "
                             "process may use)")
        cores = min(cores, int(share))
    return cores
