"""Two runs sharing one machine: each run's wall time alone, then two at once with every run on
every core (the default before local sweeps divided them) and with the cores divided (what
`lapo-fast sweep --max-parallel 2` does: OMP_NUM_THREADS and LAPO_FAST_CPUS = cores / 2).

    python benchmarks/contention.py [--env-steps 2048] [--json out.json]

The run is `lapo-fast ppo --preset smoke` (the engine, the policy's forward and PPO's update: the
threads the default sets). Printed: seconds, and each shared run's speed as a fraction of alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/contention.py`: the repository root on the path, not benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import dump_json, print_table  # noqa: E402
from lapo_fast.machine import CPUS_ENV, available_cpus  # noqa: E402


def _runs(n: int, env_steps: int, share: int | None, tmp: str) -> float:
    """Wall seconds of n simultaneous runs (the slowest), each with `share` cores (None: all)."""
    env = dict(os.environ)
    if share is not None:
        env.update({"OMP_NUM_THREADS": str(share), CPUS_ENV: str(share)})
    argv = [sys.executable, "-m", "lapo_fast.cli", "ppo", "--env", "starpilot", "--preset", "smoke", "--env-steps",
            str(env_steps), "--checkpoint-every", "1000"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv + ["--out", os.path.join(tmp, f"r{share}-{n}-{i}")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
    if any(p.wait() for p in procs):
        raise SystemExit("contention: a run failed")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-steps", type=int, default=2048)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = available_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        alone = _runs(1, args.env_steps, None, tmp)
        rows = [{"setup": "one run alone, every core", "seconds": alone, "speed": 1.0}]
        for label, share in (("two runs, every core each", None), ("two runs, cores divided", max(1, cores // 2))):
            both = _runs(2, args.env_steps, share, tmp)
            rows.append({"setup": label, "seconds": both, "speed": alone / both})
    print(f"{cores} cores; lapo-fast ppo --preset smoke --env-steps {args.env_steps}; speed: each run's, as a fraction "
          "of its speed alone (0.5: the machine shared evenly)")
    print_table(rows, [("setup", "setup", ""), ("seconds", "wall s", ".1f"), ("speed", "speed vs alone", ".2f")])
    if args.json:
        dump_json(args.json, {"benchmark": "contention", "cores": cores, "rows": rows})


if __name__ == "__main__":
    main()
