"""`lapo-fast selftest` on the CPU: it passes here, writes its JSON, names why each CUDA-only check
is skipped -- and its checks fail when what they compare is broken on purpose."""

import json

import pytest
import torch

from lapo_fast import selftest
from lapo_fast.cli import main
from lapo_fast.ops import vq as vq_op

CUDA_ONLY = ("graphs capture", "data DALI inflate", "data NVDEC ingest", "stage 1 (lam) fp32", "stage 2 (bc) fp32",
             "stage 3b update fp32")


def test_selftest_on_the_cpu_passes_and_says_why_cuda_checks_are_skipped(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    assert main(["selftest", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["checks"]}
    assert report["failed"] == 0 and report["facts"]["device"] == "cpu"
    assert report["facts"]["torch"] == torch.__version__
    for name in CUDA_ONLY:
        assert rows[name]["status"] == "skipped" and rows[name]["note"], name
    ran = {n for n, r in rows.items() if r["status"] == "ok"}
    for expected in ("vq LAPO B=128 fp32 train", "vq LAPO B=65536 bf16 train", "vq tokenizer K=1024 d=64 fp16 eval",
                     "vq LAPO B=4096 fp32 train, deterministic", "graphs static buffers", "stage 1 (lam) bf16",
                     "data lz4 prefetch loader", "engine vs gym3", "distributed VQ all-reduce"):
        assert expected in ran, expected
    printed = capsys.readouterr().out
    assert not any(line.startswith("FAIL") for line in printed.splitlines())
    assert ", 0 FAIL, " in printed.strip().splitlines()[-1]


def test_a_perturbed_vq_reference_fails_the_check_and_the_command(tmp_path, monkeypatch):
    real = vq_op.vq_ema_reference

    def perturbed(*args, **kwargs):  # the reference's loss off by 1e-4 relative: 10x the bound
        q, idx, loss, perp = real(*args, **kwargs)
        return q, idx, loss * (1 + 1e-4), perp

    monkeypatch.setattr(vq_op, "vq_ema_reference", perturbed)
    monkeypatch.setattr(selftest, "CHECKS", (selftest.check_vq,))
    out = tmp_path / "selftest.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["checks"]
    failed = [r for r in rows if r["status"] == "FAIL"]
    assert failed and all("worst: loss" in r["note"] for r in failed)
    assert len(failed) == sum(not r["name"].endswith("timing") for r in rows)  # every comparison, none of the timings


def test_a_perturbed_codebook_update_fails_the_vq_check(monkeypatch):
    """The C++ kernel's EMA state nudged after the call: the state comparison catches it."""
    real = vq_op._cpu_forward

    def nudged(x, spec, codebook, ema=None, keep_stats=False):
        out = real(x, spec, codebook, ema, keep_stats)
        if ema is not None:
            ema[1].mul_(1 + 1e-4)
        return out

    monkeypatch.setattr(vq_op, "_cpu_forward", nudged)
    rows = selftest.run("cpu", quick=True, checks=(selftest.check_vq,), echo=lambda _: None)
    train = [r for r in rows if r.name.endswith("train") or r.name.endswith("deterministic")]
    assert train and all(r.status == "FAIL" and "ema_weight" in r.note for r in train)
    assert all(r.status == "ok" for r in rows if r.name.endswith("eval"))


def test_static_buffers_that_are_not_refilled_fail_the_graph_check(monkeypatch):
    from lapo_fast.runtime import step

    def stale(buffers, inputs, name):  # the buffers keep the first step's inputs
        return {k: v.detach().clone() for k, v in inputs.items()} if buffers is None else buffers

    monkeypatch.setattr(step, "fill_static", stale)
    rows = selftest.run("cpu", checks=(selftest.check_graphs,), echo=lambda _: None)
    assert {r.name: r.status for r in rows}["graphs static buffers"] == "FAIL"


def test_a_check_that_crashes_is_a_fail_and_the_others_still_run():
    def broken(ctx):
        yield selftest.judged("fine", "x", 0.0, 1.0)
        raise RuntimeError("kernel exploded\nmore lines")

    rows = selftest.run("cpu", checks=(broken, selftest.check_distributed), echo=lambda _: None)
    assert [(r.name, r.status) for r in rows] == [("fine", "ok"), ("broken", "FAIL"),
                                                   ("distributed VQ all-reduce", "ok")]
    assert rows[1].note == "RuntimeError: kernel exploded"


def test_a_nan_bound_check_fails():
    assert selftest.judged("n", "x", float("nan"), 1.0).status == "FAIL"


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_selftest_on_a_machine_without_that_gpu_is_one_line(device, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        main(["selftest", "--device", device])
    assert e.value.code == 2 and "--device cuda" in capsys.readouterr().err


def test_a_missing_kernel_or_extension_is_a_fail_never_the_reference_against_itself(monkeypatch):
    from lapo_fast.ops import vq as vq_op

    monkeypatch.setattr(vq_op, "_cpu_kernel_available", lambda: False)  # as when lapo_fast._C failed to build

    def engine_without_extension(ctx):
        raise ModuleNotFoundError("No module named 'lapo_fast._C'", name="lapo_fast._C")
        yield

    rows = selftest.run("cpu", quick=True, checks=(selftest.check_vq, engine_without_extension), echo=lambda _: None)
    assert [(r.name, r.status) for r in rows] == [("vq kernels", "FAIL"), ("engine_without_extension", "FAIL")]
    assert "lapo_fast._C does not import" in rows[0].note and "lapo_fast._C does not import" in rows[1].note


@pytest.mark.parametrize("kwargs,message", [({"device": "meta"}, "--device meta: it checks cpu or cuda"),
                                            ({"json_out": "/no/such/folder/out.json"}, "its folder does not exist")])
def test_a_bad_device_or_json_path_is_refused_before_any_check(kwargs, message):
    ran = []
    with pytest.raises(ValueError, match=message):
        selftest.run(**{"device": "cpu", **kwargs}, checks=(lambda ctx: ran.append(1) or iter(()),),
                     echo=lambda _: None)
    assert not ran
