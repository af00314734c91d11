"""Sweeps: a 2-game x 2-seed local sweep on submitit, end to end, one run made to fail; its status
and aggregate (rliable's IQM and CIs recomputed here from the runs' own files); the SLURM job
array's script and submission without a cluster; run seeds; stages 1 across two torchrun "nodes"."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lapo_fast.cli import main
from lapo_fast.eval import normalized_return
from lapo_fast.machine import available_cpus

GAMES = ("starpilot", "coinrun")
TINY = ["--decode.labelled", "4", "8", "--decode.deploy", "8", "--lam.steps", "6", "--lam.checkpoint-every", "6",
        "--bc.steps", "4", "--record.frames", "200", "--record.test-frames", "64", "--umap.points", "16",
        "--eval.episodes", "1", "--eval.num-envs", "1", "--decode.eval-episodes", "1"]


def _sweep_argv(out, *extra):
    return ["sweep", "--envs", ",".join(GAMES), "--seeds", "2", "--preset", "smoke", "--out", str(out),
            "--max-parallel", "2", *extra, "--", *TINY]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep, with coinrun seed 1 doomed: its folder already claims another game."""
    out = tmp_path_factory.mktemp("sweep") / "sw"
    doomed = out / "coinrun" / "seed1"
    doomed.mkdir(parents=True)
    (doomed / "run.json").write_text(json.dumps({"game": "starpilot"}))
    assert main(_sweep_argv(out)) == 1  # one run failed
    return out


def _state(out):
    from lapo_fast.sweep.launch import status

    return {(r["game"], r["seed"]): r for r in status(out)}


def test_a_local_sweep_runs_every_game_and_seed_and_reports_the_failure(sweep, capsys):
    rows = _state(sweep)
    assert {k: r["state"] for k, r in rows.items()} == {("starpilot", 0): "done", ("starpilot", 1): "done",
                                                       ("coinrun", 0): "done", ("coinrun", 1): "failed"}
    assert "is a run of starpilot, not coinrun" in rows[("coinrun", 1)]["detail"]
    assert main(["sweep", "status", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "3 done" in out and "1 failed" in out and "not coinrun" in out
    for game in GAMES:  # each run is a normal run directory, with its own seed everywhere
        report = json.loads((sweep / game / "seed0" / "report.json").read_text())
        assert report["seeds"]["lam"] == 0 and report["seeds"]["eval"] == 12345
    seeds1 = json.loads((sweep / "starpilot" / "seed1" / "report.json").read_text())["seeds"]
    assert seeds1["lam"] == 1 and seeds1["record"] == 1 and seeds1["demo"] == 1 and seeds1["eval"] == 12346
    assert "Seeds: " in (sweep / "starpilot" / "seed1" / "report.md").read_text()
    job = json.loads((sweep / "starpilot" / "seed0" / "sweep-job.json").read_text())
    assert job["threads"] == max(1, available_cpus() // 2)  # two runs at once: each on its share of the cores
    from lapo_fast.data import FrameDataset

    a, b = (FrameDataset(sweep / "starpilot" / f"seed{s}" / "data" / "train") for s in (0, 1))
    assert a.identity() != b.identity()  # the seed reached the demonstrator and the recording


def test_rerunning_a_sweep_skips_finished_runs(sweep, capsys):
    done = sweep / "starpilot" / "seed0" / "report.md"
    before = done.stat().st_mtime_ns
    assert main(["sweep", "--out", str(sweep)]) == 1  # the recorded sweep; the doomed run fails again
    assert done.stat().st_mtime_ns == before
    assert "launching 1 run(s) (3 finished)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(_sweep_argv(sweep) + ["--lam.lr", "0.1"])  # another sweep's settings in the same folder
    assert "is a sweep with train flags --decode.labelled 4 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a dry run says the same, instead of "1 run(s) to launch"
        main(_sweep_argv(sweep, "--dry-run") + ["--lam.lr", "0.1"])
    assert "is a sweep with train flags" in capsys.readouterr().err
    reordered = TINY[3:] + TINY[:3]  # the same settings in another order and spelling: the same sweep
    reordered[reordered.index("--lam.steps"):reordered.index("--lam.steps") + 2] = ["--lam.steps=6"]
    assert main(_sweep_argv(sweep, "--dry-run")[:-len(TINY)] + reordered) == 0
    assert "1 run(s) to launch (3 finished)" in capsys.readouterr().out


def _decoded(sweep, game, seed) -> float:
    """The decoded policy's normalised return, read from the run's eval file."""
    res = json.loads((sweep / game / f"seed{seed}" / "eval" / "results.json").read_text())["policies"]
    return float(normalized_return(next(v["mean_return"] for k, v in res.items() if k.startswith("decoded")), game))


def test_aggregate_computes_iqm_and_cis_from_the_runs_and_lists_the_failed_one(sweep):
    from rliable import metrics

    assert main(["aggregate", str(sweep), "--reps", "200"]) == 0
    report = json.loads((sweep / "aggregate" / "aggregate.json").read_text())
    dec = report["aggregate"]["decoded"]
    assert dec["seeds"] == [0] and dec["games"] == sorted(GAMES)  # coinrun seed 1 has no results
    m = np.array([[_decoded(sweep, g, 0) for g in sorted(GAMES)]])  # (seeds, games)
    assert dec["IQM"]["estimate"] == pytest.approx(metrics.aggregate_iqm(m))
    assert dec["mean"]["estimate"] == pytest.approx(m.mean())
    assert dec["median"]["estimate"] == pytest.approx(np.median(m))
    for name in ("IQM", "mean", "median"):
        low, high = dec[name]["ci95"]
        assert low <= dec[name]["estimate"] + 1e-9 and dec[name]["estimate"] <= high + 1e-9
    per_game = report["per_game"]["starpilot"]["decoded"]
    assert per_game["seeds"] == 2 and per_game["mean"] == pytest.approx(
        np.mean([_decoded(sweep, "starpilot", s) for s in (0, 1)]))
    missing = {(m["game"], m["seed"]): m for m in report["missing"]}
    assert missing[("coinrun", 1)]["state"] == "failed"
    curves = report["curves"]
    assert len(curves["online"]["finetuned"]["iqm"]) == len(curves["online"]["env_steps"]) == 50
    assert np.isfinite(curves["online"]["finetuned"]["iqm"][-1]) and np.isfinite(curves["online"]["scratch"]["iqm"][-1])
    assert curves["decoding"]["labelled"] == [4, 8]
    md = (sweep / "aggregate" / "aggregate.md").read_text()
    assert "Across games" in md and "| coinrun | 1 | failed |" in md
    for plot in report["plots"].values():
        assert (sweep / "aggregate" / plot).stat().st_size > 1000


def test_aggregate_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["aggregate", str(tmp_path)])
    assert "no runs (<game>/seed<k>/ folders)" in capsys.readouterr().err


def _fake_sweep(out: Path, returns: dict, presets: dict | None = None) -> Path:
    """A sweep directory with results but no training: sweep.json planning starpilot and coinrun x 2
    seeds; a run per (game, seed) in `returns` ({(game, seed): finetuned mean return}), each done."""
    from lapo_fast.sweep.launch import SweepSpec, record_sweep, train_argv

    spec = SweepSpec(envs=GAMES, seeds=2, preset="smoke", train_args=("--lam.steps", "6"))
    record_sweep(out, spec)
    for (game, seed), ret in returns.items():
        run = out / game / f"seed{seed}"
        (run / "eval").mkdir(parents=True)
        argv = train_argv(dataclasses.replace(spec, preset=(presets or {}).get((game, seed), "smoke")), out, game,
                          seed)
        (run / "sweep-job.json").write_text(json.dumps({"state": "done", "argv": argv}))
        (run / "report.md").write_text("# report\n")
        policies = {"finetuned": {"mean_return": ret}, "demonstrator": {"mean_return": 30.0},
                    "decoded (8 labels)": {"mean_return": 10.0 + seed}}
        (run / "eval" / "results.json").write_text(json.dumps({"policies": policies}))
    return out


def test_the_aggregate_says_what_it_is_over_and_names_what_it_left_out(tmp_path):
    from lapo_fast.sweep.aggregate import aggregate

    out = _fake_sweep(tmp_path / "sw", {("starpilot", 0): 20.0, ("starpilot", 1): float("nan"),
                                        ("coinrun", 0): 5.0})
    (out / "starpilot" / "seed01").mkdir()  # would have been a second seed 1
    aggregate(out, reps=50)
    report = json.loads((out / "aggregate" / "aggregate.json").read_text())
    missing = {(m["game"], m["seed"]): m for m in report["missing"]}
    assert missing[("coinrun", 1)]["state"] == "not started"  # planned, never started: listed, not dropped
    assert "its mean return is NaN/inf" in "; ".join(missing[("starpilot", 1)]["lacks"])
    assert report["ignored"] == [{"game": "starpilot", "folder": "seed01",
                                  "why": "not a run folder name (seed<k>, k without leading zeros)"}]
    assert report["aggregate"]["finetuned"]["seeds"] == [0]  # only seed 0 has both games
    assert report["preset"] == "smoke" and report["train_flags"] == ["--lam.steps", "6"]
    md = (out / "aggregate" / "aggregate.md").read_text()
    assert "Over the plan: starpilot, coinrun x seeds 0..1; preset smoke, train flags --lam.steps 6" in md
    assert "| starpilot | seed01 |" in md


def test_the_aggregate_refuses_to_pool_runs_of_another_preset(tmp_path):
    from lapo_fast.sweep.aggregate import aggregate

    out = _fake_sweep(tmp_path / "sw", {("starpilot", 0): 20.0, ("coinrun", 0): 5.0},
                      presets={("coinrun", 0): "paper"})
    with pytest.raises(ValueError, match=r"different settings \(preset paper with --lam.steps 6: coinrun/seed0; "
                                         r"preset smoke with --lam.steps 6: starpilot/seed0\)"):
        aggregate(out, reps=50)  # (runs in folder order: coinrun first)


# -- SLURM, without a cluster ---------------------------------------------------------------------

def _slurm_argv(out):
    return ["sweep", "--envs", "starpilot,coinrun", "--seeds", "2", "--executor", "slurm", "--out", str(out),
            "--max-parallel", "3", "--partition", "gpu", "--time-min", "600",
            "--setup", "source /opt/venv/bin/activate", "--slurm-arg", "account=lapo", "--", "--lam.steps", "1000"]


def test_the_slurm_dry_run_prints_a_job_array_script(tmp_path, capsys):
    argv = _slurm_argv(tmp_path / "sw")
    assert main(argv[:-3] + ["--dry-run"] + argv[-3:]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=600",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --mem=120GB", "#SBATCH --account=lapo",
                 "source /opt/venv/bin/activate", "-m submitit.core._submit"):
        assert line in out, line
    assert (f"lapo-fast train --env coinrun --seed 1 --preset paper --out {tmp_path / 'sw' / 'coinrun' / 'seed1'} "
            "--lam.steps 1000") in out
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing


def test_a_slurm_submission_makes_one_array_and_records_its_jobs(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(_slurm_argv(tmp_path / "sw")) == 0
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-3%3" in script and "#SBATCH --partition=gpu" in script
    record = json.loads((tmp_path / "sw" / "coinrun" / "seed1" / "sweep-job.json").read_text())
    assert record["state"] == "submitted" and record["job_id"] == "4242_3"
    assert "submitted 4 run(s) as SLURM job 4242" in capsys.readouterr().out
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["spec"]["executor"] == "slurm"


def test_status_tells_a_run_whose_process_died(tmp_path):
    from lapo_fast.sweep.launch import run_state

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "sweep-job.json").write_text(json.dumps({"state": "running", "host": socket.gethostname(),
                                                         "pid": int(dead.stdout), "started": 0}))
    assert run_state(tmp_path)[0] == "died"


def test_a_sweep_recorded_with_set_strings_continues_with_flags(tmp_path):
    """sweep.json files written before `train` took --STAGE.FIELD flags hold `sets` of
    "STAGE.FIELD=VALUE" (comma lists, booleans as words, "data" for the recording): they load as
    the flags that mean the same settings."""
    from lapo_fast.registry import resolve_run
    from lapo_fast.sweep.launch import load_spec

    old = {"envs": ["starpilot"], "seeds": 1, "preset": "smoke",
           "sets": ["lam.steps=7", "lam.quantize=false", "decode.labelled=4,8", "decode.deploy=8",
                    "data.frames=300", "finetune.fc_ramp=0,128"]}
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": old}))
    spec = load_spec(tmp_path)
    assert spec.train_args == ("--lam.steps", "7", "--lam.no-quantize", "--decode.labelled", "4", "8",
                               "--decode.deploy", "8", "--record.frames", "300", "--finetune.fc-ramp", "0", "128")
    cfg = resolve_run(spec.preset, spec.train_args)
    assert (cfg.lam.steps, cfg.lam.quantize, cfg.decode.labelled, cfg.record.frames, cfg.finetune.fc_ramp) == \
        (7, False, (4, 8), 300, (0, 128))


def test_train_seed_reaches_every_stage():
    from lapo_fast.registry import resolve_run

    base, seeded = resolve_run("smoke"), resolve_run("smoke", seed=3)
    names = [f.name for f in dataclasses.fields(base)]
    assert names and all(getattr(seeded, k).seed == getattr(base, k).seed + 3 for k in names)
    assert resolve_run("smoke", ["--lam.seed", "9"], seed=3).lam.seed == 9  # an explicit --lam.seed wins
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        resolve_run("smoke", seed=-1)


# -- multi-node ----------------------------------------------------------------------------------------

NODE = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from lapo_fast.config import LAMConfig, resolve
    from lapo_fast.stages import lam
    built = []
    real = lam.build_lam
    lam.build_lam = lambda cfg: built.append(real(cfg)) or built[-1]  # keep this rank's own model
    lam.train_lam(sys.argv[1], sys.argv[2], resolve(LAMConfig, "smoke", {"steps": 3, "checkpoint_every": 3}),
                  progress=False)
    vq = built[0].idm.vq
    torch.save({"codebook": vq.codebook, "count": vq.ema_count, "world": dist.get_world_size()},
               f"{sys.argv[3]}/rank{dist.get_rank()}.pt")
""")


def test_stage_1_across_two_torchrun_nodes_keeps_one_codebook(tmp_path):
    """Two torchrun agents (two "nodes", one process each) meet at a c10d rendezvous on localhost."""
    from lapo_fast.data import DatasetWriter

    data, rng = tmp_path / "ds", np.random.default_rng(0)
    with DatasetWriter(data) as w:
        for _ in range(3):
            w.add_episode(rng.integers(0, 255, (16, 64, 64, 3), dtype=np.uint8), action=rng.integers(0, 15, 16))
    script = tmp_path / "node.py"
    script.write_text(NODE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    nodes = [subprocess.Popen([str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lapo-test", str(script), str(data),
                               str(tmp_path / "run"), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(log[-2000:] for log in logs)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a["world"] == b["world"] == 2
    assert torch.equal(a["codebook"], b["codebook"]) and torch.equal(a["count"], b["count"])
    assert (tmp_path / "run" / "lam" / "step-00000003").exists()


def test_a_sweep_passes_trains_own_flags_to_every_run(tmp_path, capsys):
    """-- --data DS: every run trains on the given dataset (train's own flag), checked to exist first."""
    data = tmp_path / "ds"
    data.mkdir()
    argv = ["sweep", "--envs", "starpilot", "--seeds", "2", "--preset", "smoke", "--out", str(tmp_path / "sw"),
            "--dry-run", "--", "--lam.steps", "6", "--data", str(data)]
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("lapo-fast train")]
    assert len(lines) == 2 and all(f"--data {data}" in ln for ln in lines)
    with pytest.raises(SystemExit):
        main(argv[:-1] + [str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert f"sweep: --data {tmp_path / 'missing'}: no such file or folder" in err


HOLD = textwrap.dedent("""
    import sys, time
    from lapo_fast.runtime.lock import folder_lock
    with folder_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


def _holding(folder, what):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), what], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_launcher_per_sweep_and_a_run_held_by_a_live_job_is_not_relaunched(tmp_path, capsys):
    """A second launcher on the same --out is refused naming the first; a run whose folder a live
    process holds (an orphaned job of a killed launcher) is 'running', not failed, and not relaunched."""
    from lapo_fast.sweep.launch import run_state

    out = tmp_path / "sw"
    argv = ["sweep", "--envs", "starpilot", "--seeds", "2", "--preset", "smoke", "--out", str(out)]
    orphan = _holding(out / "starpilot" / "seed1", "lapo-fast train (orphaned)")
    try:
        assert run_state(out / "starpilot" / "seed1")[0] == "running"
        assert main(argv + ["--dry-run"]) == 0
        printed = capsys.readouterr().out
        assert "1 run(s) still being trained by a live process, not relaunched: starpilot/seed1" in printed
        assert "1 run(s) to launch" in printed and "--seed 1 " not in printed
        launcher = _holding(out, "lapo-fast sweep (launcher)")
        try:
            with pytest.raises(SystemExit):
                main(argv)
            assert "is in use by pid" in capsys.readouterr().err
        finally:
            launcher.kill()
            launcher.wait()
    finally:
        orphan.kill()
        orphan.wait()
    assert run_state(out / "starpilot" / "seed1")[0] == "pending"  # its holder gone: the lock goes with it
