"""The `lapo-fast` command line."""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys

from . import __version__
from .envs.games import DEFAULT_DISTRIBUTION_MODE, OBS_SHAPE


def _cmd_envs(args: argparse.Namespace) -> int:
    from .envs import GAMES, modes_of

    for game in GAMES:
        print(f"{game:<10} modes: {', '.join(modes_of(game))}")
    return 0


def _preset(args: argparse.Namespace, command: str) -> str:
    from .config import default_preset

    preset, why = (args.preset, "asked for") if args.preset else default_preset()
    print(f"{command}: preset {preset!r} ({why})")
    return preset


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import resolve_run
    from .envs.games import check_game
    from .pipeline import run_all

    check_game(args.env)
    preset = _preset(args, "train")
    cfgs = resolve_run(preset, args.set, seed=args.seed)
    out = args.out or f"runs/{args.env}-{preset}" + (f"-seed{args.seed}" if args.seed else "")
    print(f"train: run directory {out}")
    run_all(args.env, out, cfgs, preset=preset, demonstrator=args.demonstrator, data=args.data,
            test_data=args.test_data)
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from .data import collect
    from .runtime.acting import checkpoint_policy, random_policy
    from .envs.games import check_game

    check_game(args.env)
    policy = (random_policy(seed=args.seed) if args.policy == "random"
              else checkpoint_policy(args.policy, seed=args.seed))
    out = collect(args.out, args.env, policy, frames=args.frames,
                  num_envs=args.num_envs, seed=args.seed, start_level=args.start_level,
                  num_levels=args.num_levels, distribution_mode=args.distribution_mode,
                  policy_name=args.policy, codec=args.codec)
    print(f"wrote {out}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    import json

    from .data import FrameDataset, import_lapo, ingest_videos

    if args.data_command == "info":
        print(json.dumps(FrameDataset(args.dir).info(), indent=1))
    elif args.data_command == "verify":
        info = FrameDataset(args.dir).verify()
        print(f"ok: {args.dir}: {info['frames']} frames in {info['episodes']} episodes, "
              f"{info['shards']} shards, {info['bytes_per_frame']:.0f} B/frame, all checksums match; "
              f"decoded cache: {info['cache']}")
    elif args.data_command == "cache":
        ds = FrameDataset(args.dir)
        ds.cache()
        print(f"ok: {args.dir}: decoded cache at {ds.cache_path()} "
              f"({ds.num_frames * ds.manifest.frame_bytes / 2**30:.2f} GiB)")
    elif args.data_command == "import-lapo":
        for out in import_lapo(args.dir, args.out, codec=args.codec):
            print(f"wrote {out}")
    elif args.data_command == "ingest":
        print(f"wrote {ingest_videos(args.videos, args.out, size=args.size, codec=args.codec, decoder=args.decoder)}")
    return 0


# Stage commands: given the parsed args and the stage's resolved config, they run the stage and
# return the line to print after "<command>: ".

def _cmd_lam(args: argparse.Namespace, cfg) -> str:
    from .stages.lam import train_lam

    return f"final checkpoint {train_lam(args.data, args.out, cfg, test_data=args.test_data)}"


def _cmd_bc(args: argparse.Namespace, cfg) -> str:
    from .stages.bc import train_bc

    return f"final checkpoint {train_bc(args.data, args.out, cfg)}"


def _cmd_decode(args: argparse.Namespace, cfg) -> str:
    from .rundir import RunDir
    from .stages.decode import train_decoders

    train_decoders(args.data, args.out, cfg, env_name=args.env, online=not args.offline_only)
    return f"results in {RunDir(args.out).results('decode')}"


def _cmd_ppo(args: argparse.Namespace, cfg) -> str:
    from .envs.games import check_game
    from .stages.ppo import train_ppo

    check_game(args.env)
    if args.command == "finetune":
        from .stages.ppo import finetune

        last = finetune(args.out, args.env, cfg, name=args.name or "finetune")
    else:
        last = train_ppo(args.out, args.env, cfg, name=args.name or "ppo")
    return f"final checkpoint {last}"


def _cmd_eval(args: argparse.Namespace, cfg) -> str:
    from .rundir import RunDir
    from .stages.evaluate import evaluate_run

    evaluate_run(args.out, args.env, cfg)
    return f"results in {RunDir(args.out).results('eval')}"


def _cmd_umap(args: argparse.Namespace, cfg) -> str:
    from .stages.umap import project_latents

    return f"wrote {project_latents(args.data, args.out, cfg)}"


def _cmd_report(args: argparse.Namespace, cfg) -> str:
    from .stages.report import write_report

    return f"wrote {write_report(args.out)}"


def _cmd_check_reference(args: argparse.Namespace) -> int:
    from .eval.reference import check_reference

    report = check_reference(args.dir)
    print(report.table())
    failed = sum(not ok for *_, ok in report.rows)
    ties = len(report.near_ties)
    print(f"check-reference: {len(report.rows) - failed} of {len(report.rows)} outputs match the reference code"
          + (f" ({ties} of them near-ties: off in our channels_last layout, matching in the reference's contiguous "
             "one: round-off flips a value at a boundary)" if ties else "")
          + (f", {failed} do not" if failed else "")
          + (f"; {len(report.skipped)} fixture(s) not checked yet" if report.skipped else ""))
    return 0 if report.ok else 1


def _cmd_selftest(args: argparse.Namespace) -> int:
    from .selftest import run

    rows = run(args.device, quick=args.quick, compile=args.compile, json_out=args.json)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


# What each command imports beyond the core (lapo_fast.extras names the extra that brings each).
_LOOP = ("safetensors", "lz4", "zstandard", "tqdm")
_ENGINE = ("procgen", "gym3", "gymnasium")
_NEEDS = {"collect": _LOOP + _ENGINE, "data": ("lz4", "zstandard"), "lam": _LOOP, "bc": _LOOP,
          "decode": _LOOP + _ENGINE, "finetune": _LOOP + _ENGINE, "ppo": _LOOP + _ENGINE, "eval": _LOOP + _ENGINE,
          "umap": _LOOP + ("umap", "matplotlib"), "report": ("matplotlib",), "sweep": ("submitit",),
          "aggregate": ("rliable", "matplotlib")}


def _check_needs(args: argparse.Namespace) -> None:
    """A command whose optional dependencies are missing stops before any work, naming the extra."""
    from .extras import TRAIN, missing_message

    needs = TRAIN if args.command == "train" else _NEEDS.get(args.command, ())
    if args.command == "data" and getattr(args, "data_command", "") == "ingest":
        needs = needs + ("av", "PIL")
    message = missing_message(needs, f"lapo-fast {args.command}")
    if message:
        raise ValueError(message)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .config import default_preset, resolve_run
    from .sweep.launch import SweepSpec, launch, load_spec, parse_envs, status, status_table

    if args.action:
        if len(args.action) != 2 or args.action[0] != "status":
            raise ValueError(f"sweep {' '.join(args.action)}: expected `lapo-fast sweep status DIR` (or options only)")
        print(status_table(status(args.action[1])))
        return 0
    if not args.out:
        raise ValueError("sweep: --out DIR is required (the folder of the sweep's runs)")
    if args.envs is None:  # continue the sweep recorded there
        spec = load_spec(args.out)
        print(f"sweep: continuing {args.out}/sweep.json ({len(spec.envs)} game(s) x {spec.seeds} seed(s))")
    else:
        import torch

        preset = args.preset or ("paper" if args.executor == "slurm" else default_preset()[0])
        gpus = args.gpus_per_run if args.gpus_per_run is not None else \
            int(args.executor == "slurm" or torch.cuda.is_available())
        spec = SweepSpec(envs=parse_envs(args.envs), seeds=args.seeds, preset=preset, sets=tuple(args.set),
                         executor=args.executor, max_parallel=args.max_parallel, gpus_per_run=gpus,
                         cpus_per_run=args.cpus_per_run, mem_gb=args.mem_gb, time_min=args.time_min,
                         partition=args.partition, setup=tuple(args.setup), slurm_args=tuple(args.slurm_arg))
    resolve_run(spec.preset, list(spec.sets))  # every run's settings checked before anything is launched
    rows = launch(args.out, spec, dry_run=args.dry_run)
    if not args.dry_run:
        print(status_table(rows))
    return 1 if any(r["state"] in ("failed", "died") for r in rows) else 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from .sweep.aggregate import aggregate

    print(f"aggregate: wrote {aggregate(args.dir, args.out, reps=args.reps)}")
    return 0


def _run_stage(args: argparse.Namespace) -> int:
    """A stage subcommand: its config resolved from preset and flags, then the stage, holding the
    run directory (report only reads the stages' files: it may run beside them)."""
    cfg = None
    if args.config_cls is not None:
        from .config import overrides_from, resolve

        cfg = resolve(args.config_cls, _preset(args, args.command), overrides_from(args, args.config_cls))
    with _holding(args.out) if args.command != "report" else contextlib.nullcontext():
        print(f"{args.command}: {args.stage(args, cfg)}")
    return 0


def _holding(folder):
    """The folder's lock (runtime/lock.py), taken by one process of a torchrun job (rank 0)."""
    from .runtime.distributed import launched_rank
    from .runtime.lock import folder_lock

    return folder_lock(folder) if launched_rank() == 0 else contextlib.nullcontext()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lapo-fast",
        description="LAPO (learning to act from action-free video), fast: one command from a "
        "Procgen game to a latent-action policy.",
    )
    parser.add_argument("--version", action="version", version=f"lapo-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("envs", help="list the Procgen games and their distribution modes")
    p.set_defaults(func=_cmd_envs)

    p = sub.add_parser("collect", help="record a frame dataset with the batched engine")
    p.add_argument("--env", required=True, help="Procgen game")
    p.add_argument("--policy", default="random",
                   help="'random' (uniform over the actions) or a torch.export policy file (.pt2: "
                        "uint8 obs (N,64,64,3) -> logits (N,actions) or actions (N,))")
    p.add_argument("--frames", type=int, required=True, help="frames to store (whole episodes)")
    p.add_argument("--out", required=True, help="dataset directory (resumes if it exists)")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-level", type=int, default=0, help="first level of this split")
    p.add_argument("--num-levels", type=int, default=0, help="levels in this split (0: unbounded)")
    p.add_argument("--distribution-mode", default=DEFAULT_DISTRIBUTION_MODE, help="Procgen distribution mode")
    p.add_argument("--codec", default="lz4", choices=["lz4", "zstd"])
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("data", help="inspect, verify, import and ingest frame datasets")
    data = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    q = data.add_parser("info", help="summarise a dataset")
    q.add_argument("dir")
    q = data.add_parser("verify", help="check every shard's checksums and that every chunk decodes")
    q.add_argument("dir")
    q = data.add_parser("cache", help="decode the whole dataset once into a raw uint8 memmap (loader=cache), e.g. "
                                      "before a multi-GPU run")
    q.add_argument("dir")
    q = data.add_parser("import-lapo", help="convert the reference LAPO code's npz expert data")
    q.add_argument("dir", help="a game folder with train/ and test/ folders of .npz chunks")
    q.add_argument("--out", required=True)
    q.add_argument("--codec", default="lz4", choices=["lz4", "zstd"])
    q = data.add_parser("ingest", help="action-free videos or image folders -> dataset (episode = file)")
    q.add_argument("videos", nargs="+")
    q.add_argument("--out", required=True)
    q.add_argument("--size", type=int, default=OBS_SHAPE[0], help="frame side in pixels (the stages take 64)")
    q.add_argument("--codec", default="lz4", choices=["lz4", "zstd"])
    q.add_argument("--decoder", default="auto", choices=["auto", "pyav", "dali"],
                   help="auto: DALI/NVDEC on a GPU when installed, else PyAV on the CPU")
    p.set_defaults(func=_cmd_data)

    from .config import (
        PRESETS, BCConfig, DecodeConfig, EvalConfig, FinetuneConfig, LAMConfig, PPOConfig, UmapConfig, add_arguments,
    )

    def stage(name: str, help: str, func, cls=None, *, data: bool = False, env: bool = False):
        q = sub.add_parser(name, help=help)
        if data:
            q.add_argument("--data", required=True, help="frame dataset directory")
        if env:
            q.add_argument("--env", required=True, help="Procgen game, e.g. starpilot")
        q.add_argument("--out", required=True, help="run directory")
        if cls is not None:
            q.add_argument("--preset", choices=PRESETS, default=None, help="default: paper on CUDA, else cpu")
            add_arguments(q, cls)
        q.set_defaults(func=_run_stage, stage=func, config_cls=cls)
        return q

    p = stage("lam", "stage 1: latent IDM + FDM with the VQ bottleneck (resumable)", _cmd_lam, LAMConfig, data=True)
    p.add_argument("--test-data", default=None, help="dataset of held-out episodes (test FDM loss)")
    stage("bc", "stage 2: latent behaviour cloning on the frozen IDM's cached labels (needs RUN/lam)",
          _cmd_bc, BCConfig, data=True)
    p = stage("decode", "stage 3a: latent -> action decoders from a few labelled transitions, evaluated online",
              _cmd_decode, DecodeConfig, data=True)
    p.add_argument("--env", default=None, help="game to act in (default: the dataset's)")
    p.add_argument("--offline-only", action="store_true", help="score decoders on held-out transitions only")
    for name, help, cls in (("finetune", "stage 3b: LAPO's online decoding and PPO fine-tuning of the latent policy "
                                         "(needs RUN/lam and RUN/bc)", FinetuneConfig),
                            ("ppo", "PPO from scratch (baselines, demonstrators)", PPOConfig)):
        p = stage(name, help, _cmd_ppo, cls, env=True)
        p.add_argument("--name", default=None, help=f"subdirectory of the run (default {name})")
    stage("eval", "returns of every policy in a run, normalised per game", _cmd_eval, EvalConfig, env=True)
    stage("umap", "UMAP of the IDM's latent actions coloured by true action (PNG)", _cmd_umap, UmapConfig, data=True)
    stage("report", "report.md/json and plots of a run", _cmd_report)

    p = sub.add_parser("check-reference", help="run our models on the reference LAPO code's saved weights and inputs, "
                                               "compare every output (exit 1 on a mismatch or an unchecked fixture)")
    p.add_argument("dir", help="a folder of reference fixtures (shared/fixtures/lapo_reference)")
    p.set_defaults(func=_cmd_check_reference)

    p = sub.add_parser("selftest", help="check every path this device has (VQ kernels, CUDA graphs, the stages' steps "
                                        "at paper size, loaders, engine, process group) against a reference; exit 1 "
                                        "on a FAIL. Run it first on a new GPU machine")
    p.add_argument("--device", default="", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every check and the machine's facts here")
    p.add_argument("--quick", action="store_true", help="the small cases only (seconds on a GPU)")
    p.add_argument("--compile", action="store_true", help="also torch.compile a stage-1 step on the CPU (~80 s on "
                                                          "2 cores; always tried on CUDA without --quick)")
    p.set_defaults(func=_cmd_selftest)

    p = sub.add_parser("train", help="the whole method on one game, in one run directory (resumable)")
    p.add_argument("--env", required=True, help="Procgen game, e.g. starpilot")
    p.add_argument("--out", default=None, help="run directory (default runs/<env>-<preset>)")
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: paper on CUDA, else cpu")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override one setting, e.g. --set lam.steps=500 (stages: demo, data, lam, bc, decode, "
                        "finetune, eval, umap)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed, added to every stage's own (demonstrator, "
                                                       "recording, models, PPO, evaluation)")
    p.add_argument("--demonstrator", default=None, help="torch.export policy (.pt2) that records the dataset")
    p.add_argument("--data", default=None, help="use this dataset instead of recording one")
    p.add_argument("--test-data", default=None, help="held-out dataset for the test FDM loss")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="one `train` run per (game, seed), on this machine or as a SLURM job array "
                                     "(resumable); `sweep status DIR`: how each run stands")
    p.add_argument("action", nargs="*", metavar="status DIR", help="`status DIR`: done / running / failed per run")
    p.add_argument("--envs", default=None,
                   help="all (the 16 games) or GAME,GAME (default: the sweep recorded in --out)")
    p.add_argument("--seeds", type=int, default=1, help="runs per game: seeds 0..N-1 (train --seed)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="every run's preset (default: paper for slurm, else this machine's)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE", help="every run's overrides")
    p.add_argument("--out", default=None, help="the sweep's folder: <game>/seed<k>/ run directories, sweep.json")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: submitit's local executor on this machine; slurm: one job array")
    p.add_argument("--max-parallel", type=int, default=1, help="runs at once (local) or the array's parallelism")
    p.add_argument("--gpus-per-run", type=int, default=None, help="GPUs per run (default: 1 on slurm or with CUDA)")
    p.add_argument("--cpus-per-run", type=int, default=16, help="slurm: CPUs per run")
    p.add_argument("--mem-gb", type=int, default=120, help="slurm: memory per run, GB")
    p.add_argument("--time-min", type=int, default=24 * 60, help="time limit per run, minutes (slurm requeues and "
                                                                 "the run resumes)")
    p.add_argument("--partition", default="", help="slurm partition")
    p.add_argument("--setup", action="append", default=[], help="slurm: a shell line before each run, e.g. "
                                                                "'source ~/venv/bin/activate' (repeatable)")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="another sbatch option, e.g. account=myproj or constraint=h100 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs (and for slurm the sbatch script); launch nothing")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("aggregate", help="a sweep's runs as the paper's table: per-game normalised returns, IQM/mean/"
                                         "median with 95%% bootstrap CIs (rliable), curves (markdown, JSON, plots)")
    p.add_argument("dir", help="the sweep's folder (<game>/seed<k>/ runs)")
    p.add_argument("--out", default=None, help="report folder (default DIR/aggregate)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    p.set_defaults(func=_cmd_aggregate)
    return parser


def _close_progress_bars() -> None:
    """Ends the lines of progress bars a stage left open, so the last line printed is ours."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .data.format import DatasetError
    from .extras import extra_of

    try:
        _check_needs(args)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: checkpoints and datasets are written atomically, so nothing is lost
        _close_progress_bars()
        parser.exit(130, "\nlapo-fast: stopped; rerun the same command to resume\n")
    except ModuleNotFoundError as e:  # an optional dependency deeper down: name the extra that brings it
        if extra_of(e) is None:
            raise
        parser.exit(2, f"lapo-fast: error: {e.name} is not installed: pip install 'lapo-fast[{extra_of(e)}]'\n")
    except (ValueError, DatasetError, FileNotFoundError) as e:
        parser.exit(2, f"lapo-fast: error: {e}\n")
    except OSError as e:  # a full disk, a read-only folder, a permission: one line, naming the file
        hint = " (the disk is full: free space or choose another --out; what was committed is kept)" \
            if e.errno == errno.ENOSPC else ""
        parser.exit(2, f"lapo-fast: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}{hint}\n")


if __name__ == "__main__":
    sys.exit(main())
