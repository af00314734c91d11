"""Procgen environments: the game table and the batched C++ engine."""

from .games import GAMES, NUM_ACTIONS, OBS_SHAPE, modes_of
from .procgen_vec import ProcgenVecEnv

__all__ = ["GAMES", "NUM_ACTIONS", "OBS_SHAPE", "ProcgenVecEnv", "modes_of"]
