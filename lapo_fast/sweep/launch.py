"""`lapo-fast sweep`: the paper's table as one `lapo-fast train` run per (game, seed), launched with
submitit: a SLURM job array on a cluster, or its local executor on one machine (at most
`max_parallel` runs at a time, each on its own GPUs when there are some).

    DIR/sweep.json             what the sweep is: games, seeds, preset, `train` flags, resources
    DIR/<game>/seed<k>/        one normal run directory each (resumable; `lapo-fast report` works on it)
        sweep-job.json         the launcher's record: state, host, pid, job id, the last error line
    DIR/submitit/              submitit's job pickles and logs (each job's stdout and stderr)

Rerunning the command skips finished runs and launches the others again (`train` resumes them).
A run is finished when its report exists (`train` writes it last).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lapo_fast.envs.games import GAMES, check_game
from lapo_fast.machine import CPUS_ENV, available_cpus
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.files import read_json, write_json

EXECUTORS = ("local", "slurm")
MAX_SEEDS = 10_000  # runs per game a sweep may plan (each is a run directory)


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: which runs, with which settings, on what resources."""

    envs: tuple[str, ...]
    seeds: int                               # runs per game: seeds 0 .. seeds-1
    preset: str
    train_args: tuple[str, ...] = ()         # `train` flags of every run (--lam.steps 500 ...)
    executor: str = "local"
    max_parallel: int = 1                    # runs at once (local) / the array's parallelism (slurm)
    gpus_per_run: int = 0
    cpus_per_run: int = 16
    mem_gb: int = 120
    time_min: int = 24 * 60
    partition: str = ""
    setup: tuple[str, ...] = ()              # shell lines before each SLURM job (module load, venv)
    slurm_args: tuple[str, ...] = field(default=())  # extra sbatch options, KEY=VALUE

    def __post_init__(self) -> None:
        for game in self.envs:
            check_game(game)
        if not self.envs:
            raise ValueError("sweep: no games (--envs all, or GAME,GAME)")
        twice = sorted({g for g in self.envs if self.envs.count(g) > 1})
        if twice:
            raise ValueError(f"sweep: --envs names {', '.join(twice)} more than once (each game is one set of run "
                             "directories): name each game once")
        if not 1 <= self.seeds <= MAX_SEEDS:
            raise ValueError(f"sweep: --seeds must be in [1, {MAX_SEEDS:,}], got {self.seeds}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"sweep: --executor {self.executor!r}; choose one of {list(EXECUTORS)}")
        if self.max_parallel < 1 or self.gpus_per_run < 0 or self.cpus_per_run < 1 or self.time_min < 1:
            raise ValueError("sweep: --max-parallel, --cpus-per-run and --time-min must be >= 1, --gpus-per-run >= 0")
        for arg in self.slurm_args:
            if "=" not in arg:
                raise ValueError(f"sweep: --slurm-arg {arg!r}: expected KEY=VALUE (e.g. constraint=h100)")

    def runs(self) -> list[tuple[str, int]]:
        return [(game, seed) for game in self.envs for seed in range(self.seeds)]


def parse_envs(text: str) -> tuple[str, ...]:
    """'all' (the 16 games) or 'GAME,GAME'."""
    return tuple(GAMES) if text == "all" else tuple(g.strip() for g in text.split(",") if g.strip())


def run_dir(out: Path, game: str, seed: int) -> Path:
    return Path(out) / game / f"seed{seed}"


TRAIN_INPUTS = ("--data", "--test-data", "--demonstrator")  # train's own flags a sweep passes to every run


def split_train_args(args) -> tuple[tuple[str, ...], dict[str, str]]:
    """A sweep's train flags as (the --STAGE.FIELD settings, train's own inputs {flag: path}):
    the settings resolve to every run's configs, the inputs must exist."""
    settings, inputs, rest = [], {}, list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in TRAIN_INPUTS:
            if not eq:
                if not rest:
                    raise ValueError(f"sweep: {name} needs a path after it")
                value = rest.pop(0)
            if not Path(value).exists():
                raise ValueError(f"sweep: {name} {value}: no such file or folder (every run reads it)")
            inputs[name] = value
        else:
            settings.append(arg)
    return tuple(settings), inputs


def train_setup(argv: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """(preset, the other train flags) of a run's `train` command line (train_argv's), without what
    differs from run to run (--env, --seed, --out)."""
    preset, flags, rest = None, [], list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg in ("--env", "--seed", "--out", "--preset") and rest:
            value = rest.pop(0)
            preset = value if arg == "--preset" else preset
        else:
            flags.append(arg)
    return preset, tuple(flags)


def train_argv(spec: SweepSpec, out: Path, game: str, seed: int) -> list[str]:
    """The `lapo-fast` command line of one run."""
    argv = ["train", "--env", game, "--seed", str(seed), "--preset", spec.preset,
            "--out", str(run_dir(out, game, seed))]
    return argv + list(spec.train_args)


def check_sweep(out: Path, spec: SweepSpec) -> None:
    """A rerun of the sweep at `out` may add games and seeds, but its runs' settings -- the preset
    and what the train flags resolve to (in any order or spelling) -- must stay the finished runs'."""
    from lapo_fast.registry import resolve_run

    path = Path(out) / "sweep.json"
    had = read_json(path)
    if had is None:
        return
    if not isinstance(had, dict) or "spec" not in had:
        raise ValueError(f"{path}: not a sweep record; use a new --out")
    had_spec = _upgrade(had["spec"])
    old_preset, old_args = had_spec.get("preset"), tuple(had_spec.get("train_args", ()))
    if old_preset != spec.preset:
        raise ValueError(f"{out} is a sweep with preset={old_preset!r}, this one asks for {spec.preset!r}: use a new "
                         "--out (or the same settings to continue it)")
    (old_settings, old_inputs), (settings, inputs) = split_train_args(old_args), split_train_args(spec.train_args)
    if old_args != spec.train_args and (old_inputs != inputs or resolve_run(spec.preset, old_settings)
                                        != resolve_run(spec.preset, settings)):
        raise ValueError(f"{out} is a sweep with train flags {' '.join(old_args) or '(none)'}, this one asks for "
                         f"{' '.join(spec.train_args) or '(none)'}: use a new --out (or the same settings to "
                         "continue it)")


def record_sweep(out: Path, spec: SweepSpec) -> None:
    """Records the sweep in DIR/sweep.json (after check_sweep)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "sweep.json", {"spec": dataclasses.asdict(spec)})


def load_spec(out: Path) -> SweepSpec:
    path = Path(out) / "sweep.json"
    had = read_json(path)
    if not isinstance(had, dict) or not isinstance(had.get("spec"), dict):
        raise FileNotFoundError(f"{path}: no sweep here (start one with `lapo-fast sweep ... --out {out}`)")
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in _upgrade(had["spec"]).items()}
    return SweepSpec(**spec)


def _upgrade(spec: dict) -> dict:
    """A sweep.json written before `train` took --STAGE.FIELD flags held `sets` of
    "STAGE.FIELD=VALUE" (comma-separated lists; "data" for the recording): as flags."""
    if "sets" not in spec:
        return spec
    from lapo_fast.registry import RunConfig

    configs = typing.get_type_hints(RunConfig)
    args: list[str] = []
    for item in spec["sets"]:
        key, _, value = item.partition("=")
        stage, _, name = key.partition(".")
        stage = {"data": "record"}.get(stage, stage)
        kind = typing.get_type_hints(configs[stage]).get(name) if stage in configs else None
        flag = f"--{stage}.{name.replace('_', '-')}"
        if kind is bool:
            args.append(flag if value.lower() in ("1", "true", "yes") else f"--{stage}.no-{name.replace('_', '-')}")
        else:
            args += [flag, *(value.split(",") if typing.get_origin(kind) is tuple else [value])]
    return {**{k: v for k, v in spec.items() if k != "sets"}, "train_args": args}


# -- one run, as a job -----------------------------------------------------------------------------

def train_job(argv: list[str], directory: str, threads: int | None = None) -> str:
    """What each job runs (on the node): `lapo-fast train ...` in a subprocess, its output passed
    through to the job's log, its state recorded in RUN/sweep-job.json. Raises when it fails, so
    the launcher (and SLURM's accounting) sees the failure. `threads`: torch's CPU threads in the
    run (runs sharing a machine each take their share, instead of every run taking every core)."""
    path = RunDir(directory).job
    Path(directory).mkdir(parents=True, exist_ok=True)
    record = {**(read_json(path) or {}), "state": "running", "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.time(), "job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
              "argv": argv, "threads": threads}
    write_json(path, record)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), CPUS_ENV: str(threads)} if threads else None
    proc = subprocess.Popen([sys.executable, "-m", "lapo_fast.cli", *argv], stderr=subprocess.PIPE, env=env)
    tail = _pass_through(proc.stderr)
    code = proc.wait()
    if code == 0:
        write_json(path, {**record, "state": "done", "ended": time.time()})
        return directory
    errors = [line for line in tail if line.startswith("lapo-fast: error:")]
    error = (errors or tail or [f"exit status {code}"])[-1]
    write_json(path, {**record, "state": "failed", "ended": time.time(), "exit": code, "error": error})
    raise RuntimeError(f"{directory}: {error}")


class TrainJob:
    """train_job as submitit's job function, requeued on SLURM's timeout or preemption signal: the
    run resumes from its last checkpoint in the requeued job (submitit calls `checkpoint`)."""

    def __call__(self, argv: list[str], directory: str) -> str:
        return train_job(argv, directory)

    def checkpoint(self, argv: list[str], directory: str):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainJob(), argv, directory)


def _pass_through(stream) -> list[str]:
    """Copies a child's stderr to ours as it comes; returns its last lines (progress bars' carriage
    returns split lines too)."""
    tail: list[str] = []
    buf = b""
    while chunk := stream.read1(65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        buf += chunk
        *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
        tail = (tail + [x.decode(errors="replace").strip() for x in lines if x.strip()])[-20:]
    if buf.strip():
        tail = (tail + [buf.decode(errors="replace").strip()])[-20:]
    return tail


# -- state of the runs --------------------------------------------------------------------------------

def run_state(directory: Path) -> tuple[str, str]:
    """(state, detail) of one run: done, failed (its last error line), running (by its job record,
    or held by a live process: an orphaned job of a killed launcher is not failed), died (its
    process is gone without a word: killed, out of memory, out of time), submitted, or pending."""
    from lapo_fast.runtime.lock import holder_of

    directory = Path(directory)
    state, detail = _recorded_state(directory)
    if state in ("failed", "died", "stopped", "pending") and directory.exists():
        holder = holder_of(directory)
        if holder is not None:
            return "running", f"held by {holder}"
    return state, detail


def _recorded_state(directory: Path) -> tuple[str, str]:
    """run_state by the run's files and its job record alone."""
    run = RunDir(directory)
    record = read_json(run.job) or {}
    if run.report("md").exists() and record.get("state", "done") == "done":
        return "done", str(run.report("md"))
    state = record.get("state")
    if state == "failed":
        return "failed", record.get("error", "")
    if state == "running":
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("started", 0)))
        if record.get("host") == socket.gethostname() and not _alive(record.get("pid")):
            return "died", f"its process {record.get('pid')} on {record.get('host')} is gone (started {since})"
        job = f", job {record['job_id']}" if record.get("job_id") else ""
        return "running", f"on {record.get('host')} since {since}{job}"
    if state == "submitted":
        return "submitted", f"job {record.get('job_id')}"
    return ("pending", "") if not run.identity.exists() else ("stopped", "started, not finished")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def status(out: Path) -> list[dict]:
    """One row per run of the sweep at `out`: game, seed, state, detail."""
    spec = load_spec(out)
    return [{"game": g, "seed": s, "run": str(run_dir(out, g, s)), **dict(zip(("state", "detail"),
                                                                          run_state(run_dir(out, g, s))))}
            for g, s in spec.runs()]


def status_table(rows: list[dict]) -> str:
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    width = max([len(r["game"]) for r in rows] + [4])
    lines = [f"{'game':<{width}}  seed  {'state':<9}  detail"]
    lines += [f"{r['game']:<{width}}  {r['seed']:>4}  {r['state']:<9}  {r['detail']}" for r in rows]
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)


# -- launching ----------------------------------------------------------------------------------------

def _slurm_parameters(spec: SweepSpec) -> dict:
    """submitit's SLURM parameters of one run (a task of the sweep's job array)."""
    params = dict(job_name="lapo-fast-sweep", time=spec.time_min, cpus_per_task=spec.cpus_per_run,
                  mem=f"{spec.mem_gb}GB", array_parallelism=spec.max_parallel, setup=list(spec.setup),
                  additional_parameters=dict(arg.split("=", 1) for arg in spec.slurm_args))
    if spec.gpus_per_run:
        params["gpus_per_node"] = spec.gpus_per_run
    if spec.partition:
        params["partition"] = spec.partition
    return params


def sbatch_script(out: Path, spec: SweepSpec, count: int) -> str:
    """The sbatch script submitting `count` runs writes (for --dry-run; no cluster needed), made by
    the function submitit's SlurmExecutor writes it with, for the array batch() makes."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(out) / "submitit"
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=count, **_slurm_parameters(spec))


def launch(out: Path, spec: SweepSpec, *, dry_run: bool = False, poll_s: float = 2.0) -> list[dict]:
    """Launches every unfinished run of the sweep; returns the status rows (local: when all ended;
    slurm: as submitted)."""
    out = Path(out)
    check_sweep(out, spec)  # a dry run says what the real one would: refused, or these runs
    states = {(g, s): run_state(run_dir(out, g, s))[0] for g, s in spec.runs()}
    todo = [r for r in spec.runs() if states[r] not in ("done", "running")]  # a live job's run is not relaunched
    live = [r for r in spec.runs() if states[r] == "running"]
    if live:
        print(f"sweep: {len(live)} run(s) still being trained by a live process, not relaunched: "
              + ", ".join(f"{g}/seed{s}" for g, s in live))
    skipped = len(spec.runs()) - len(todo) - len(live)
    if dry_run:
        print(f"sweep: {len(todo)} run(s) to launch ({skipped} finished) with the {spec.executor} executor:")
        for g, s in todo:
            print("  lapo-fast " + " ".join(train_argv(spec, out, g, s)))
        if spec.executor == "slurm" and todo:
            print("\nsbatch script (one job array; each task unpickles its run's command):\n")
            print(sbatch_script(out, spec, len(todo)))
        return [{"game": g, "seed": s, "state": "would launch"} for g, s in todo]
    from lapo_fast.runtime.lock import folder_lock

    with folder_lock(out, "lapo-fast sweep (launcher)"):  # one launcher per sweep directory
        return _launch(out, spec, todo, skipped, poll_s)


def _launch(out: Path, spec: SweepSpec, todo: list, skipped: int, poll_s: float) -> list[dict]:
    record_sweep(out, spec)  # (checked by launch)
    if not todo:
        print(f"sweep: all {skipped} runs are finished")
        return status(out)
    print(f"sweep: launching {len(todo)} run(s) ({skipped} finished) with the {spec.executor} executor", flush=True)
    if spec.executor == "slurm":
        _launch_slurm(out, spec, todo)
    else:
        _launch_local(out, spec, todo, poll_s)
    return status(out)


def _launch_slurm(out: Path, spec: SweepSpec, todo: list[tuple[str, int]]) -> None:
    import submitit

    executor = submitit.SlurmExecutor(folder=out / "submitit")
    executor.update_parameters(**_slurm_parameters(spec))
    with executor.batch():  # one job array
        jobs = [executor.submit(TrainJob(), train_argv(spec, out, g, s), str(run_dir(out, g, s))) for g, s in todo]
    for (g, s), job in zip(todo, jobs):
        path = RunDir(run_dir(out, g, s)).job
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"state": "submitted", "job_id": job.job_id, "submitted": time.time()})
    print(f"sweep: submitted {len(jobs)} run(s) as SLURM job {jobs[0].job_id.split('_')[0]}; "
          f"`lapo-fast sweep status {out}` shows how they stand")


def _launch_local(out: Path, spec: SweepSpec, todo: list[tuple[str, int]], poll_s: float) -> None:
    """At most max_parallel runs at once; with GPUs, each run on its own `gpus_per_run` of them."""
    import submitit

    executor = submitit.LocalExecutor(folder=Path(out) / "submitit")
    slots = list(range(spec.max_parallel))
    threads = max(1, available_cpus() // spec.max_parallel)  # the runs share this process's cores
    running: dict[int, tuple[object, tuple[str, int]]] = {}
    queue = list(todo)
    while queue or running:
        while queue and len(running) < spec.max_parallel:
            slot = next(i for i in slots if i not in running)
            game, seed = queue.pop(0)
            gpus = list(range(slot * spec.gpus_per_run, (slot + 1) * spec.gpus_per_run))
            executor.update_parameters(timeout_min=spec.time_min, gpus_per_node=spec.gpus_per_run, visible_gpus=gpus)
            job = executor.submit(train_job, train_argv(spec, out, game, seed), str(run_dir(out, game, seed)), threads)
            running[slot] = (job, (game, seed))
        time.sleep(poll_s)
        for slot, (job, (game, seed)) in list(running.items()):
            if job.done():
                del running[slot]
                state, detail = run_state(run_dir(out, game, seed))
                print(f"sweep: {game} seed {seed}: {state}" + (f" ({detail})" if state != "done" else ""), flush=True)
