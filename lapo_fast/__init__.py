"""lapo_fast: a fast, complete implementation of LAPO (learning to act from action-free video)."""

__version__ = "0.1.0"
