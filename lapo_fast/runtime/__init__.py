"""Infrastructure the stages share: atomic files (files), checkpoints (checkpoint), run logs
(runlog), torchrun/DDP and the device choice (distributed), the optimiser schedule (optim) and
action sampling (acting). Imports nothing of the stages; import from the submodules."""
