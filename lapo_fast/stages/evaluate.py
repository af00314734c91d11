"""Evaluation of every policy a run has: the demonstrator, the decoded latent policy, the
fine-tuned policy and PPO from scratch, over many levels, normalised per game against the paper's
random/expert returns and against the run's own demonstrator.

    lapo-fast eval --out RUN [--env GAME]

Writes RUN/eval/results.json (a policy already evaluated with the same settings is skipped).
"""

from __future__ import annotations

import dataclasses

from lapo_fast.config import EvalConfig
from lapo_fast.envs.games import RANDOM_RETURN
from lapo_fast.eval import evaluate, normalized_return
from lapo_fast.latent import load_decoder
from lapo_fast.runtime.acting import decoded_actor, policy_actor
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime import distributed
from lapo_fast.runtime.files import read_json, write_json

# (name in the report, stage folder of the run) of the PPO-style policies a run may hold.
PPO_POLICIES = (("demonstrator", "demo"), ("finetuned", "finetune"), ("scratch", "ppo"))


def run(ctx: StageContext, cfg: EvalConfig) -> str:
    """The registry's entry (lapo_fast.registry): every policy of the run, in ctx.env."""
    evaluate_run(ctx.run, ctx.env, cfg, progress=ctx.progress)
    return f"results in {ctx.run.results('eval')}"


def evaluate_run(run_dir, game: str, cfg: EvalConfig, *, progress: bool = True) -> dict:
    run = RunDir(run_dir)
    run.claim(game=game)
    run.stage("eval").mkdir(parents=True, exist_ok=True)
    device = distributed.device(cfg.device)
    path = run.results("eval")
    results = read_json(path, {})
    settings = {**dataclasses.asdict(cfg), "game": game}
    if results.get("settings") != settings:
        results = {"settings": settings, "policies": {}}

    actors = {}
    for name, stage in PPO_POLICIES:
        if run.has(stage):
            actors[name] = lambda stage=stage: policy_actor(run.load_policy(stage), device=device, seed=cfg.seed,
                                                            greedy=cfg.greedy)
    if run.has("decode"):
        deploy = run.config("decode").deploy
        actors[f"decoded ({deploy} labels)"] = lambda: decoded_actor(
            run.load_policy("bc"), load_decoder(run.decoder(deploy)), device=device, seed=cfg.seed, greedy=cfg.greedy)
    if not actors:
        raise FileNotFoundError(f"{run}: no policy to evaluate yet: run stage 2 (`lapo-fast bc`) and stage 3a "
                                "(`lapo-fast decode`) for the decoded latent policy, or `lapo-fast ppo`")

    for name, make in actors.items():
        if name in results["policies"]:
            continue
        r = evaluate(make(), game, episodes=cfg.episodes, num_envs=cfg.num_envs, seed=cfg.seed,
                     distribution_mode=cfg.distribution_mode)
        results["policies"][name] = r
        write_json(path, results)
        if progress:
            print(f"eval: {name}: return {r['mean_return']:.2f} +- {r['stderr']:.2f} "
                  f"(normalised {r['normalized']:.3f}) over {r['episodes']} episodes")

    demo = results["policies"].get("demonstrator")
    for r in results["policies"].values():
        r["normalized_to_demonstrator"] = (
            float(normalized_return(r["mean_return"], game, high=demo["mean_return"]))
            if demo and demo["mean_return"] > RANDOM_RETURN[game] else None)
    write_json(path, results)
    return results
