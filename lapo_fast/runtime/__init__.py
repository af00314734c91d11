"""Infrastructure the stages share: atomic files (files), checkpoints (checkpoint), run logs
(runlog), one process per run folder (lock), torchrun/DDP and the device choice (distributed), the
optimiser schedule and clip (optim), the training step eager or as a CUDA graph (step), the
supervised stages' loop (loop), step metrics kept on the device (metrics), PPO's rollout, GAE and
update (ppo) and every actor (acting). Imports nothing of the stages; import from the submodules."""
