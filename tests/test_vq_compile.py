"""The GPU path checked without a GPU: every Triton VQ kernel variant the dispatcher launches
compiles to cubin for sm_80 and sm_90 (benchmarks.vq_kernel --compile-only), with no spill and
at least 16 resident warps per SM at the LAPO shape, shared memory within each target's limit;
and the time model's instruction counts are those of the compiled SASS, counted here again by a
separate parse of nvdisasm's listing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"kernel", "target", "case", "dtype", "registers", "spill_bytes", "shared_bytes", "warps_per_sm",
          "predicted_us", "floor_us", "sass_loop_instructions", "loop_iterations", "warps", "issue_us", "memory_us",
          "mma_us", "launch_us"}


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JITFunctions
    # Its own process: the tests' Triton runs interpreted (conftest), and that is decided at import.
    run = subprocess.run([sys.executable, "-m", "benchmarks.vq_kernel", "--compile-only", "--json",
                          str(out / "aot.json"), "--dump", str(out / "cubins")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "aot.json").read_text()), out / "cubins"


def test_every_triton_variant_compiles_for_sm80_and_sm90(aot):
    report, _ = aot
    assert report["failures"] == []
    rows = report["rows"]
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    kernels = [r for r in rows if r["kernel"] != "step"]
    assert all(FIELDS <= set(r) for r in kernels)
    assert {r["kernel"] for r in kernels} >= {"vq_search_resident_kernel", "vq_search_kernel", "vq_code_norms_kernel",
                                              "vq_search_gemm_kernel", "vq_finalize_kernel", "vq_backward_kernel"}
    for r in kernels:
        if r["case"].startswith("LAPO") and "search" in r["kernel"]:
            assert r["spill_bytes"] == 0 and r["warps_per_sm"] >= 16, r
    for target, c in report["constants"].items():
        assert {"sms", "schedulers", "clock_hz", "bandwidth", "sustained"} <= set(c), target


def test_a_training_step_is_search_finalize_and_backward(aot):
    report, _ = aot
    rows = report["rows"]
    steps = {(r["target"], r["case"], r["dtype"]): r for r in rows if r["kernel"] == "step"}
    for (target, case, dtype), step in steps.items():
        parts = [r for r in rows if r["kernel"] != "step" and (r["target"], r["case"], r["dtype"]) == (target, case,
                                                                                                        dtype)]
        if case.endswith("train"):
            assert {p["kernel"] for p in parts} >= {"vq_finalize_kernel", "vq_backward_kernel"}, case
        zero_fill = report["constants"][target]["launch_s"] * 1e6  # vq_code_norms_kernel zeroes instead
        zero_fill *= not any(p["kernel"] == "vq_code_norms_kernel" for p in parts)
        assert step["predicted_us"] == pytest.approx(zero_fill + sum(p["predicted_us"] for p in parts), abs=0.05)
        assert step["predicted_us"] >= step["floor_us"] >= 0 and (step["floor_us"] > 0 or "N=1 " in case)
    # At LAPO's batch the step is launches, not work: what CUDA graphs remove (runtime/step.py).
    small = steps["sm_90", "LAPO B=128 train", "float32"]
    assert small["launch_us"] > 0.5 * small["predicted_us"]


def _independent_loop_count(listing: str) -> tuple[int, int]:
    """(instructions, SHFLs) of the longest backward branch's loop, counted as lines of the listing
    from the target's label line to the branch's line (NOPs left out)."""
    lines = listing.splitlines()
    label_at = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and label_at[m.group(1)] < i:
            body = [x for x in lines[label_at[m.group(1)]:i + 1] if re.match(r"\s*/\*[0-9a-f]{4,}\*/", x)
                    and not re.search(r"\bNOP\b", x)]
            best = max(best, (len(body), sum("SHFL" in x for x in body)))
    return best


def test_the_models_sass_counts_are_the_listings(aot):
    import triton

    report, cubins = aot
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    rows = {(r["kernel"], r["target"], r["case"], r["dtype"]): r for r in report["rows"]}
    checked = 0
    for target in ("sm_80", "sm_90"):
        for kernel, case in (("vq_search_resident_kernel", "LAPO B=65536 train"),
                             ("vq_search_kernel", "K1024 d64 N=8192 train-det"),
                             ("vq_search_gemm_kernel", "K1024 d64 N=8192 train")):
            slug = case.replace("=", "-").replace(" ", "-")
            path = cubins / f"{kernel}.{target}.{slug}.float32.cubin"
            listing = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout
            instructions, shfl = _independent_loop_count(listing)
            row = rows[kernel, target, case, "float32"]
            assert row["sass_loop_instructions"] == instructions > 100, (kernel, target)
            assert row["loop_ops"]["SHFL"] == shfl
            # The issue time is those instructions, executed: every row tile once, each by `warps` warps.
            if kernel == "vq_search_resident_kernel":
                c = report["constants"][target]
                at_least = instructions * row["loop_iterations"] * row["warps"] / (c["sms"] * c["schedulers"]
                                                                                  * c["clock_hz"]) * 1e6
                assert row["issue_us"] >= at_least - 0.01
            checked += 1
    assert checked == 6
