"""The `lapo-fast` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__

# What `train` will chain once the stages land; listed so the stub says exactly what is missing.
_PLANNED_STAGES = ("bc", "decode", "finetune", "eval", "umap", "report")


def _cmd_envs(args: argparse.Namespace) -> int:
    from .envs import GAMES, modes_of

    for game in GAMES:
        print(f"{game:<10} modes: {', '.join(modes_of(game))}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .envs.games import check_game

    check_game(args.env)
    print(
        f"lapo-fast {__version__}: the end-to-end trainer for {args.env} is not built yet.\n"
        "Available now:\n"
        "  - lapo_fast.envs.ProcgenVecEnv: the batched C++ Procgen engine (lapo-fast envs lists the games)\n"
        "  - lapo_fast.ops: the fused VQ-EMA op (Triton / C++ / reference)\n"
        "  - lapo-fast collect / data {info,verify,import-lapo,ingest}: frame datasets and loaders\n"
        "  - lapo-fast lam: stage 1 (latent IDM + FDM), resumable\n"
        "  - benchmarks/: env_step.py, vq_kernel.py, loader.py\n"
        f"Still to come: {', '.join(_PLANNED_STAGES)}.",
        file=sys.stderr,
    )
    return 3


def _cmd_collect(args: argparse.Namespace) -> int:
    from .data import checkpoint_policy, collect, random_policy
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
              f"{info['shards']} shards, {info['bytes_per_frame']:.0f} B/frame, all checksums match")
    elif args.data_command == "import-lapo":
        for out in import_lapo(args.dir, args.out, codec=args.codec):
            print(f"wrote {out}")
    elif args.data_command == "ingest":
        print(f"wrote {ingest_videos(args.videos, args.out, size=args.size, codec=args.codec, decoder=args.decoder)}")
    return 0


def _cmd_lam(args: argparse.Namespace) -> int:
    from .config import LAMConfig, default_preset, overrides_from, resolve
    from .stages.lam import train_lam

    preset, why = (args.preset, "asked for") if args.preset else default_preset()
    print(f"lam: preset {preset!r} ({why})")
    cfg = resolve(LAMConfig, preset, overrides_from(args, LAMConfig))
    print(f"lam: final checkpoint {train_lam(args.data, args.out, cfg)}")
    return 0


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
                   help="'random' (uniform over the 15 actions) or a torch.export policy file (.pt2: "
                        "uint8 obs (N,64,64,3) -> logits (N,15) or actions (N,))")
    p.add_argument("--frames", type=int, required=True, help="frames to store (whole episodes)")
    p.add_argument("--out", required=True, help="dataset directory (resumes if it exists)")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-level", type=int, default=0, help="first level of this split")
    p.add_argument("--num-levels", type=int, default=0, help="levels in this split (0: unbounded)")
    p.add_argument("--distribution-mode", default="easy")
    p.add_argument("--codec", default="lz4", choices=["lz4", "zstd"])
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("data", help="inspect, verify, import and ingest frame datasets")
    data = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    q = data.add_parser("info", help="summarise a dataset")
    q.add_argument("dir")
    q = data.add_parser("verify", help="check every shard's checksums and that every chunk decodes")
    q.add_argument("dir")
    q = data.add_parser("import-lapo", help="convert the reference LAPO code's npz expert data")
    q.add_argument("dir", help="a game folder with train/ and test/ folders of .npz chunks")
    q.add_argument("--out", required=True)
    q.add_argument("--codec", default="lz4", choices=["lz4", "zstd"])
    q = data.add_parser("ingest", help="action-free videos or image folders -> dataset (episode = file)")
    q.add_argument("videos", nargs="+")
    q.add_argument("--out", required=True)
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--codec", default="lz4", choices=["lz4", "zstd"])
    q.add_argument("--decoder", default="auto", choices=["auto", "pyav", "dali"],
                   help="auto: DALI/NVDEC on a GPU when installed, else PyAV on the CPU")
    p.set_defaults(func=_cmd_data)

    from .config import PRESETS, LAMConfig, add_arguments

    p = sub.add_parser("lam", help="stage 1: latent IDM + FDM with the VQ bottleneck (resumable)")
    p.add_argument("--data", required=True, help="frame dataset directory")
    p.add_argument("--out", required=True, help="run directory (stage 1 writes RUN/lam/)")
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: paper on CUDA, else cpu")
    add_arguments(p, LAMConfig)
    p.set_defaults(func=_cmd_lam)

    p = sub.add_parser("train", help="run the whole method on one game (not built yet: says what exists)")
    p.add_argument("--env", required=True, help="Procgen game, e.g. starpilot")
    p.add_argument("--out", default=None, help="run directory")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .data.format import DatasetError

    try:
        return args.func(args)
    except (ValueError, DatasetError) as e:
        parser.exit(2, f"lapo-fast: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
