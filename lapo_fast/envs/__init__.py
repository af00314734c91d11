"""Procgen environments: the game table and the batched C++ engine."""

from .games import ACTION_NAMES, DEFAULT_DISTRIBUTION_MODE, GAMES, NUM_ACTIONS, NOOP, OBS_SHAPE, modes_of
from .procgen_vec import ProcgenVecEnv

__all__ = ["ACTION_NAMES", "DEFAULT_DISTRIBUTION_MODE", "GAMES", "NOOP", "NUM_ACTIONS", "OBS_SHAPE", "ProcgenVecEnv",
           "modes_of"]
