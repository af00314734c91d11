"""Many runs as one experiment: `lapo-fast sweep` launches a `train` run per (game, seed) with
submitit (SLURM job arrays, or locally), `lapo-fast aggregate` reads them into the paper's table
with the field's statistics (rliable). Above the pipeline: a run here is a whole `train`."""
