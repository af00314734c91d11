"""Procgen environments: the game table and the batched C++ engine (ProcgenVecEnv, a gymnasium
VectorEnv: imported on first use, so the core -- ops, models -- needs neither gymnasium nor procgen)."""

from .games import ACTION_NAMES, DEFAULT_DISTRIBUTION_MODE, GAMES, NUM_ACTIONS, NOOP, OBS_SHAPE, modes_of

__all__ = ["ACTION_NAMES", "DEFAULT_DISTRIBUTION_MODE", "GAMES", "NOOP", "NUM_ACTIONS", "OBS_SHAPE", "ProcgenVecEnv",
           "modes_of"]


def __getattr__(name: str):
    if name == "ProcgenVecEnv":
        from .procgen_vec import ProcgenVecEnv

        return ProcgenVecEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
