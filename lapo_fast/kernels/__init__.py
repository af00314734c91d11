"""Triton kernels of lapo_fast (installed as lapo_fast.kernels)."""
