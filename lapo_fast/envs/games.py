"""The 16 Procgen games and the options each accepts.

procgen's libenv aborts the whole process on an unknown game, an unknown option or a distribution
mode the game lacks, so everything is checked here first. The mode table was measured against
procgen-mirror 0.10.7 (one subprocess per game and mode).
"""

from __future__ import annotations

GAMES: tuple[str, ...] = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)

# libenv's integer code for each mode.
DISTRIBUTION_MODES: dict[str, int] = {"easy": 0, "hard": 1, "extreme": 2, "memory": 10}

_EXTREME = {"chaser", "dodgeball", "leaper", "starpilot"}
_MEMORY = {"caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"}

NUM_ACTIONS = 15
OBS_SHAPE = (64, 64, 3)


def modes_of(game: str) -> tuple[str, ...]:
    check_game(game)
    modes = ["easy", "hard"]
    if game in _EXTREME:
        modes.append("extreme")
    if game in _MEMORY:
        modes.append("memory")
    return tuple(modes)


def check_game(game: str) -> None:
    if game not in GAMES:
        raise ValueError(f"unknown Procgen game {game!r}; choose one of: {', '.join(GAMES)}")


def check_mode(game: str, mode: str) -> None:
    if mode not in DISTRIBUTION_MODES:
        raise ValueError(
            f"unknown distribution_mode {mode!r}; choose one of: {', '.join(DISTRIBUTION_MODES)}"
        )
    if mode not in modes_of(game):
        raise ValueError(
            f"{game} has no {mode!r} distribution mode; it supports: {', '.join(modes_of(game))}"
        )
