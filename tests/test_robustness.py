"""Nothing silently wrong: damaged data, killed runs, mismatched runs, forks, full disks, and the
one-line errors users see instead of tracebacks."""

import subprocess
import sys
import textwrap

FORK_AND_EXIT = textwrap.dedent("""
    import os, sys, time
    import numpy as np, torch
    from lapo_fast.envs import ProcgenVecEnv
    from lapo_fast.ops import VectorQuantizerEMA
    env = ProcgenVecEnv("starpilot", 8, seed=0, num_threads=2)
    env.reset()
    env.step(np.zeros(8, np.int32))
    VectorQuantizerEMA(backend="cpu")(torch.randn(1 << 14, 128))  # large enough for its thread pool
    pid = os.fork()
    if pid == 0:
        VectorQuantizerEMA(backend="cpu")(torch.randn(1 << 14, 128))  # usable in the child, on one thread
        sys.exit(0)                      # and exits normally: finalizers and static destructors run
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_a_forked_child_exits_cleanly_after_the_engine_and_the_cpu_vq_kernel():
    try:
        done = subprocess.run([sys.executable, "-c", FORK_AND_EXIT], timeout=60, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise AssertionError("the forked child hung") from None
    assert done.returncode == 0, done.stderr[-2000:]
