"""Evaluation of every policy a run has: the demonstrator, the decoded latent policy, the
fine-tuned policy and PPO from scratch, over many levels, normalised per game against the paper's
random/expert returns and against the run's own demonstrator.

    lapo-fast eval --out RUN [--env GAME]

Writes RUN/eval/results.json (a policy already evaluated with the same settings is skipped).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from lapo_fast.config import EvalConfig
from lapo_fast.eval import evaluate, normalized_return
from lapo_fast.eval.returns import RANDOM_RETURN
from lapo_fast.stages.ppo import load_policy, policy_actor
from lapo_fast.stages.runlog import write_json

# (name in the report, subdirectory of the run) of the PPO-style policies a run may hold.
PPO_POLICIES = (("demonstrator", "demo"), ("finetuned", "finetune"), ("scratch", "ppo"))


def evaluate_run(run_dir, game: str, cfg: EvalConfig, *, progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    settings = {**dataclasses.asdict(cfg), "game": game}
    if results.get("settings") != settings:
        results = {"settings": settings, "policies": {}}

    actors = {}
    for name, sub in PPO_POLICIES:
        if (run_dir / sub / "config.json").exists():
            actors[name] = lambda sub=sub: policy_actor(load_policy(run_dir, sub), device=device, seed=cfg.seed,
                                                        greedy=cfg.greedy)
    decode_cfg = run_dir / "decode" / "config.json"
    if decode_cfg.exists():
        from lapo_fast.stages.decode import decoded_actor, load_decoder

        deploy = json.loads(decode_cfg.read_text())["config"]["deploy"]
        actors[f"decoded ({deploy} labels)"] = lambda: decoded_actor(
            load_policy(run_dir, "bc"), load_decoder(run_dir, deploy), device=device, seed=cfg.seed, greedy=cfg.greedy)
    if not actors:
        raise FileNotFoundError(f"{run_dir}: no policies to evaluate (train a stage first)")

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
