"""check-reference: our models and the stages' own training steps against the numbers the
reference LAPO code produced (reference.py: forward outputs and single steps; training.py: the
training trajectories). It runs the stages' step functions, so it sits above them."""
