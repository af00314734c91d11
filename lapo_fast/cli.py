"""The `lapo-fast` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__

# What `train` will chain once the stages land; listed so the stub says exactly what is missing.
_PLANNED_STAGES = ("collect", "lam", "bc", "decode", "finetune", "eval", "umap", "report")


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
        "  - benchmarks/env_step.py: engine vs gym3 vs envpool\n"
        f"Still to come: {', '.join(_PLANNED_STAGES)}.",
        file=sys.stderr,
    )
    return 3


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
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"lapo-fast: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
