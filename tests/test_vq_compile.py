"""The GPU path checked without a GPU: every Triton VQ kernel variant the dispatcher launches
compiles to cubin for sm_80 and sm_90 (benchmarks.vq_kernel --compile-only), with no spill and
at least 16 resident warps per SM at the LAPO shape, shared memory within each target's limit,
and a roofline prediction of the LAPO step within 2x of its bandwidth floor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_triton_variant_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JITFunctions
    # Its own process: the tests' Triton runs interpreted (conftest), and that is decided at import.
    run = subprocess.run([sys.executable, "-m", "benchmarks.vq_kernel", "--compile-only", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = report["rows"]
    keys = {"kernel", "target", "case", "dtype", "registers", "spill_bytes", "shared_bytes", "warps_per_sm",
            "predicted_us", "floor_us"}
    assert all(keys <= set(r) for r in rows)
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    kernels = [r for r in rows if r["kernel"] != "step"]
    assert {r["kernel"] for r in kernels} >= {"vq_search_resident_kernel", "vq_search_kernel", "vq_finalize_kernel",
                                              "vq_backward_kernel"}
    for r in kernels:
        if r["case"].startswith("LAPO") and "search" in r["kernel"]:
            assert r["spill_bytes"] == 0 and r["warps_per_sm"] >= 16, r
    steps = {(r["target"], r["case"], r["dtype"]): r for r in rows if r["kernel"] == "step"}
    for target in ("sm_80", "sm_90"):
        big = steps[target, "LAPO B=65536 train", "float32"]
        assert big["predicted_us"] <= 2 * big["floor_us"], big
        assert steps[target, "LAPO B=128 train", "float32"]["predicted_us"] <= 10
