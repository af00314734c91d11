"""Evaluation: returns over many levels, normalised per game."""

from .returns import EXPERT_RETURN, RANDOM_RETURN, evaluate, normalized_return

__all__ = ["EXPERT_RETURN", "RANDOM_RETURN", "evaluate", "normalized_return"]
