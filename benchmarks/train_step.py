"""Training throughput of the method's stages, ours vs the reference code's way, same run:

- stage 1 step (IDM + FDM + VQ): fused VQ op vs the pure-PyTorch reference VQ in the same model;
- stage 2 step: cached IDM labels (ours) vs recomputing them with the frozen IDM every batch (the
  reference code);
- PPO env steps/s end to end (rollout + update): full PPO, and fine-tuning with the frozen trunk
  (features computed once per env step and reused); plus the update phase alone of a frozen trunk
  with reused features vs recomputing the features in every epoch.

At the cpu and paper model sizes. On a CPU the paper sizes use small batches (noted in the table).

    python benchmarks/train_step.py [--sizes cpu,paper] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import warnings

import torch
from torch.nn import functional as F

if __package__ in (None, ""):  # `python benchmarks/train_step.py`: the repository root on the path, not benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import dump_json, median_time, print_table

warnings.filterwarnings("ignore")


def shapes(size: str, cuda: bool) -> dict:
    """Model sizes from the presets; batch shapes cut down for the paper model on a CPU."""
    from lapo_fast.config import BCConfig, LAMConfig, PPOConfig, resolve

    lam, bc, ppo = (resolve(c, size) for c in (LAMConfig, BCConfig, PPOConfig))
    s = {"lam": lam, "bc": bc, "ppo": ppo, "lam_batch": lam.batch_size, "bc_batch": bc.batch_size,
         "envs": ppo.num_envs, "rollout": ppo.rollout}
    if size == "paper" and not cuda:
        s.update(lam_batch=16, bc_batch=32, envs=16, rollout=16)
    return s


def bench_stage1(s, device, repeats) -> list[dict]:
    from lapo_fast.models import build_lam

    rows = []
    B, T = s["lam_batch"], s["lam"].context + 2
    window = torch.rand(B, T, 3, 64, 64, device=device) - 0.5
    times = {}
    for backend in ("auto", "reference"):
        model = build_lam(s["lam"]).to(device)
        model.idm.vq.backend = backend
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model(window)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()

        times[backend] = median_time(step, repeats, sync=_sync(device))
    rows.append({"what": "stage 1 step (IDM+FDM+VQ)", "batch": B, "ours": B / times["auto"],
                 "anchor": B / times["reference"], "anchor_name": "reference VQ"})
    return rows


def bench_stage2(s, device, repeats) -> list[dict]:
    from lapo_fast.models import LatentPolicy
    from lapo_fast.models import build_lam

    B, T = s["bc_batch"], s["lam"].context + 2
    idm = build_lam(s["lam"]).idm.to(device).eval()
    window = torch.rand(B, T, 3, 64, 64, device=device) - 0.5
    obs = window[:, -2].contiguous(memory_format=torch.channels_last)
    target = torch.randn(B, 128, device=device)
    policy = LatentPolicy(impala_scale=s["bc"].impala_scale).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def cached():
        loss = F.mse_loss(policy(obs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def recomputed():
        with torch.no_grad():
            labels = idm(window).latent
        loss = F.mse_loss(policy(obs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_ours = median_time(cached, repeats, sync=_sync(device))
    t_ref = median_time(recomputed, repeats, sync=_sync(device))
    return [{"what": "stage 2 step (latent BC)", "batch": B, "ours": B / t_ours, "anchor": B / t_ref,
             "anchor_name": "labels recomputed per batch"}]


def bench_ppo(s, device, repeats) -> list[dict]:
    from lapo_fast.config import FinetuneConfig
    from lapo_fast.data import prepare_obs
    from lapo_fast.models import DecodedPolicy, LatentIDM, LatentPolicy
    from lapo_fast.runtime.ppo import make_ppo_step, ppo_epochs
    from lapo_fast.stages.finetune import train_finetune
    from lapo_fast.stages.ppo import train_ppo

    cfg = dataclasses.replace(s["ppo"], num_envs=s["envs"], rollout=s["rollout"], device=str(device),
                       minibatches=min(s["ppo"].minibatches, s["envs"] * s["rollout"]))
    cfg = dataclasses.replace(cfg, env_steps=2 * cfg.num_envs * cfg.rollout, checkpoint_every=100)
    fps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, frozen in (("full", False), ("frozen", True)):
            policy = LatentPolicy(impala_scale=cfg.impala_scale)
            if frozen:  # stage 3b as LAPO's, its online decoder and IDM labels included
                ft = FinetuneConfig(**{**dataclasses.asdict(cfg), "decoder_from": 0})
                train_finetune(tmp, "starpilot", ft, DecodedPolicy(policy), LatentIDM(impala_scale=cfg.impala_scale),
                               name=name, progress=False)
            else:
                train_ppo(tmp, "starpilot", cfg, name=name, progress=False, init=policy)
            with open(os.path.join(tmp, name, "metrics.jsonl")) as f:
                fps[name] = json.loads(f.read().splitlines()[-1])["fps"]  # the second update: warm
    batch = cfg.num_envs * cfg.rollout
    rows = [{"what": "PPO env steps/s, LAPO fine-tune (stage 3b) vs full PPO", "batch": batch,
             "ours": fps["frozen"], "anchor": fps["full"], "anchor_name": "full PPO"}]

    # The update phase alone: reused conv features vs the reference's way, running (and backpropagating
    # through) the frozen conv trunk in every epoch.
    policy = DecodedPolicy(LatentPolicy(impala_scale=cfg.impala_scale)).to(device).to(memory_format=torch.channels_last)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    obs = torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8, device=device)
    with torch.no_grad():
        feats = policy.features(prepare_obs(obs))
    a, old = torch.randint(0, 15, (batch,), device=device), -torch.rand(batch, device=device) - 2
    adv, ret = torch.randn(batch, device=device), torch.randn(batch, device=device)
    gen = torch.Generator(device=device)
    features = {True: lambda x: x, False: lambda frames: policy.features(prepare_obs(frames))}
    steps = {reuse: make_ppo_step(policy, opt, params, cfg, device, features[reuse]) for reuse in (True, False)}
    inputs = {reuse: {"obs": feats if reuse else obs, "actions": a, "old_logp": old, "adv": adv, "ret": ret,
                      "old_value": ret} for reuse in (True, False)}
    t = {reuse: median_time(lambda reuse=reuse: ppo_epochs(steps[reuse], cfg, inputs[reuse], gen, device), repeats,
                            sync=_sync(device))
         for reuse in (True, False)}
    rows.append({"what": "stage-3b update: reused conv features vs the trunk run every epoch", "batch": batch,
                 "ours": batch / t[True], "anchor": batch / t[False], "anchor_name": "trunk rerun (reference)"})
    return rows


def _sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="cpu,paper")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for size in args.sizes.split(","):
        s = shapes(size, device.type == "cuda")
        for bench in (bench_stage1, bench_stage2, bench_ppo):
            for r in bench(s, device, args.repeats):
                r.update(size=size, device=device.type, ratio=r["ours"] / r["anchor"])
                rows.append(r)
                print(f"  {size} {r['what']}: {r['ours']:,.0f} vs {r['anchor']:,.0f} ({r['ratio']:.2f}x)", flush=True)
    print(f"\ntraining throughput on {device.type}, {torch.get_num_threads()} threads (samples or env steps per s)")
    print_table(rows, [("size", "size", ""), ("what", "what", ""), ("batch", "batch", "d"), ("ours", "ours", ",.0f"),
                       ("anchor_name", "anchor", ""), ("anchor", "anchor/s", ",.0f"), ("ratio", "ours/anchor", ".2f")])
    if args.json:
        dump_json(args.json, {"device": device.type, "rows": rows})


if __name__ == "__main__":
    main()
