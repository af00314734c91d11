"""The product's own commands, exactly as its users type them (the wheel's `lapo-fast train --env
starpilot` and `from lapo_fast.ops import ...` in another project are in test_packaging.py)."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in ("__init__.py", "common.py"))


def _run(cmd: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pytest's pythonpath is not the user's
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, env=env, **kw)


def test_every_benchmark_runs_as_a_script_and_as_a_module():
    """`python benchmarks/X.py --help` and `python -m benchmarks.X --help` for every script, all
    started at once (each is a fresh interpreter importing torch)."""
    assert len(SCRIPTS) >= 5
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pytest's pythonpath is not the user's
    cmds = [[sys.executable, f"benchmarks/{s}", "--help"] for s in SCRIPTS]
    cmds += [[sys.executable, "-m", f"benchmarks.{s[:-3]}", "--help"] for s in SCRIPTS]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, (" ".join(cmd[1:]), err[-1500:])
    for script in SCRIPTS:
        assert "if __name__ == \"__main__\":" in (ROOT / "benchmarks" / script).read_text(), script


def test_python_benchmarks_vq_kernel_py_quick_prints_ours_beside_the_reference():
    out = _run(f"{sys.executable} benchmarks/vq_kernel.py --quick --threads 2", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for case in ("LAPO B=128", "LAPO B=4096"):
        line = next(ln for ln in out.stdout.splitlines() if case in ln and "ours" in ln)
        assert "vs reference" in line, line  # the anchor measured in the same run, and the ratio
    assert "LAPO B=65536" not in out.stdout  # --quick: the small cases only
