"""The 16 Procgen games and the options each accepts.

procgen's libenv aborts the whole process on an unknown game, an unknown option or a distribution
mode the game lacks, so everything is checked here first. The mode table was measured against
procgen-mirror 0.10.7 (one subprocess per game and mode).
"""

from __future__ import annotations

from lapo_fast.choices import DistributionMode, values

GAMES: tuple[str, ...] = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)

# libenv's integer code for each mode.
DISTRIBUTION_MODES: dict[str, int] = dict(zip(values(DistributionMode), (0, 1, 2, 10)))

_EXTREME = {"chaser", "dodgeball", "leaper", "starpilot"}
_MEMORY = {"caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"}

# The mode every command uses unless told otherwise: the LAPO paper's (and its data's).
DEFAULT_DISTRIBUTION_MODE = "easy"

OBS_SHAPE = (64, 64, 3)  # every game renders 64x64 RGB uint8
# procgen's 15 buttons, in action-index order (the same for every game).
ACTION_NAMES: tuple[str, ...] = ("LEFT-DOWN", "LEFT", "LEFT-UP", "DOWN", "NOOP", "UP", "RIGHT-DOWN", "RIGHT",
                                 "RIGHT-UP", "D", "A", "W", "S", "Q", "E")
NUM_ACTIONS = len(ACTION_NAMES)
NOOP = ACTION_NAMES.index("NOOP")

# The LAPO paper's per-game normalisation (Procgen, easy mode): the uniform-random policy's mean
# return (normalised 0) and the mean return in its expert data (normalised 1).
RANDOM_RETURN: dict[str, float] = {
    "bigfish": 0.874, "bossfight": 0.046, "caveflyer": 2.597, "chaser": 0.663, "climber": 2.224,
    "coinrun": 2.705, "dodgeball": 0.613, "fruitbot": -2.533, "heist": 3.076, "jumper": 3.411,
    "leaper": 2.511, "maze": 4.273, "miner": 1.251, "ninja": 2.560, "plunder": 4.321, "starpilot": 1.525,
}
EXPERT_RETURN: dict[str, float] = {
    "bigfish": 36.34, "bossfight": 11.63, "caveflyer": 9.18, "chaser": 9.96, "climber": 10.23,
    "coinrun": 9.93, "dodgeball": 13.49, "fruitbot": 29.93, "heist": 9.69, "jumper": 8.46,
    "leaper": 7.41, "maze": 9.97, "miner": 11.89, "ninja": 9.47, "plunder": 11.46, "starpilot": 66.99,
}
assert set(RANDOM_RETURN) == set(EXPERT_RETURN) == set(GAMES)


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
