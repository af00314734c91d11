"""`train`'s datasets: observation-only episodes recorded from the demonstrator (given, shipped
with the package, or trained in RUN/demo) when no --data is given.

    RUN/data/train      RecordConfig.frames frames, levels from the seed
    RUN/data/test       RecordConfig.test_frames frames of other levels (the held-out FDM loss)

Recording resumes: a rerun completes the datasets and keeps what was written.
"""

from __future__ import annotations

from lapo_fast.config import RecordConfig
from lapo_fast.data import collect
from lapo_fast.registry import StageContext
from lapo_fast.runtime.acting import checkpoint_policy, policy_actor

TEST_SEED_OFFSET = 10_000  # the held-out episodes' levels: another seed's


def run(ctx: StageContext, cfg: RecordConfig) -> str:
    """The registry's `record` (`train` only)."""
    if not ctx.record:
        return "skipped: the dataset is given"
    run_dir = ctx.run
    if ctx.demonstrator is not None:
        act, policy_name = checkpoint_policy(ctx.demonstrator, seed=cfg.seed), str(ctx.demonstrator)
    else:
        act, policy_name = policy_actor(run_dir.load_policy("demo"), seed=cfg.seed), "ppo demonstrator (RUN/demo)"
    splits = (("train", cfg.frames, cfg.seed), ("test", cfg.test_frames, cfg.seed + TEST_SEED_OFFSET))
    for split, frames, seed in splits:
        collect(run_dir.data(split), ctx.env, act, frames=frames, num_envs=cfg.num_envs, seed=seed,
                distribution_mode=cfg.distribution_mode, policy_name=policy_name, progress=ctx.progress)
    return f"datasets in {run_dir.data('train')} and {run_dir.data('test')}"
