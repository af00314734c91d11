"""Evaluation: returns over many levels, normalised per game."""

from lapo_fast.envs.games import EXPERT_RETURN, RANDOM_RETURN

from .returns import evaluate, normalized_return

__all__ = ["EXPERT_RETURN", "RANDOM_RETURN", "evaluate", "normalized_return"]
