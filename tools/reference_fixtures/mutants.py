#!/usr/bin/env python
"""How much check-reference proves: one-line mutants of what the paper preset computes, each applied
to a copy of the package and run through `lapo-fast check-reference` on the fixtures the unchanged
code passes. A mutant is killed when check-reference fails; the first failing row says what saw it.

    python tools/reference_fixtures/mutants.py                 # every mutant, tests/fixtures/lapo_reference
    python tools/reference_fixtures/mutants.py --only ppo-     # those whose name starts so
    python tools/reference_fixtures/mutants.py --list          # each mutant applies (its line is there once)

Exits 1 if a mutant survives or no longer applies (the code it changes moved: update its line here).
A mutant no fixture can kill is a reason to extend the fixtures (make_fixtures.py), not to drop it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "lapo_reference"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # under lapo_fast/
    old: str   # text that occurs exactly once in the file
    new: str


M = Mutant
MUTANTS = [
    # -- stage 1: the loss, the VQ bottleneck
    M("lam-vq-loss-sign", "models/lam.py", "return recon + out.vq_loss, recon", "return recon - out.vq_loss, recon"),
    M("lam-vq-loss-coef", "models/lam.py", "return recon + out.vq_loss, recon",
      "return recon + 2 * out.vq_loss, recon"),
    M("lam-fdm-loss-coef", "models/lam.py", "recon = F.mse_loss(pred, window[:, -1])",
      "recon = 0.5 * F.mse_loss(pred, window[:, -1])"),
    M("lam-fdm-target", "models/lam.py", "recon = F.mse_loss(pred, window[:, -1])",
      "recon = F.mse_loss(pred, window[:, -2])"),
    M("vq-commitment", "config.py", 'commitment: float = setting(0.05,', 'commitment: float = setting(0.25,'),
    M("vq-commitment-grad-coef", "ops/vq.py", "ctx.coef, ctx.backend = 2.0 * commitment",
      "ctx.coef, ctx.backend = 1.0 * commitment"),
    M("vq-commitment-grad-sign", "ops/vq.py", "(grad_q.float() + coef * (x.float() - q.float()))",
      "(grad_q.float() - coef * (x.float() - q.float()))"),
    M("vq-straight-through", "ops/vq.py", "(grad_q.float() + coef * (x.float() - q.float()))",
      "(0.5 * grad_q.float() + coef * (x.float() - q.float()))"),
    M("vq-decay", "config.py", 'vq_decay: float = setting(0.999,', 'vq_decay: float = setting(0.99,'),
    M("vq-laplace-eps", "ops/vq_module.py", "eps: float = 1e-5,", "eps: float = 1e-3,"),
    M("vq-dead-code-refill", "config.py", 'dead_code_threshold: float = setting(0.0,',
      'dead_code_threshold: float = setting(1.0,'),
    # -- stages 1-2: AdamW, its schedule, the clip
    M("lam-lr", "config.py", 'lr: float = setting(3e-4, "peak AdamW learning rate (the reference',
      'lr: float = setting(2e-4, "peak AdamW learning rate (the reference'),
    M("adamw-weight-decay", "config.py", 'weight_decay: float = setting(1e-2, "AdamW weight decay")',
      'weight_decay: float = setting(0.0, "AdamW weight decay")'),
    M("lam-grad-clip", "config.py", 'grad_clip: float = setting(2.0,', 'grad_clip: float = setting(1.0,'),
    M("lam-warmup-steps", "config.py", 'warmup_steps: int = setting(50,', 'warmup_steps: int = setting(100,'),
    M("lam-warmup-from", "config.py", 'warmup_from: float = setting(0.1,', 'warmup_from: float = setting(0.0,'),
    M("lam-final-lr", "config.py", 'final_lr: float = setting(0.01,', 'final_lr: float = setting(0.1,'),
    M("adamw-beta1", "runtime/optim.py", "torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)",
      "torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.8, 0.999))"),
    M("adamw-beta2", "runtime/optim.py", "torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)",
      "torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))"),
    M("adamw-eps", "runtime/optim.py", "torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)",
      "torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-5)"),
    M("schedule-end", "runtime/optim.py", "points, factors = [0, warmup_steps, steps + 1]",
      "points, factors = [0, warmup_steps, steps]"),
    M("clip-norm-type", "runtime/optim.py", "torch.nn.utils.clip_grad_norm_(params, grad_clip)",
      "torch.nn.utils.clip_grad_norm_(params, grad_clip, norm_type=1.0)"),
    # -- stage 2
    M("bc-lr", "config.py", 'lr: float = setting(2e-4, "peak AdamW learning rate")',
      'lr: float = setting(3e-4, "peak AdamW learning rate")'),
    M("bc-warmup-steps", "config.py", 'warmup_steps: int = setting(1_000,', 'warmup_steps: int = setting(500,'),
    M("bc-warmup-from", "config.py", 'warmup_from: float = setting(0.01,', 'warmup_from: float = setting(0.1,'),
    M("bc-final-lr", "config.py", 'final_lr: float = setting(0.0,', 'final_lr: float = setting(0.01,'),
    M("bc-grad-clip", "config.py", 'grad_clip: float = setting(0.0,', 'grad_clip: float = setting(1.0,'),
    M("bc-loss-coef", "stages/bc.py", 'return {"loss": F.mse_loss(', 'return {"loss": 0.5 * F.mse_loss('),
    M("bc-target-quantised", "latent/labels.py", "idm(window).latent.float()", "idm(window).quantized.float()"),
    # -- stage 3b: PPO's loss
    M("ppo-adv-norm", "runtime/ppo.py", "a = (adv - adv.mean()) / (adv.std() + 1e-8)", "a = adv"),
    M("ppo-pg-min", "runtime/ppo.py", "pg = -torch.min(ratio * a,", "pg = -torch.max(ratio * a,"),
    M("ppo-ratio-clip-high", "runtime/ppo.py", "ratio.clamp(1 - cfg.clip, 1 + cfg.clip)",
      "ratio.clamp(1 - cfg.clip, 1 + 2 * cfg.clip)"),
    M("ppo-clip", "config.py", 'clip: float = setting(0.2, "PPO ratio clip")',
      'clip: float = setting(0.1, "PPO ratio clip")'),
    M("ppo-value-err", "runtime/ppo.py", "v_err = (value.float() - ret).pow(2)", "v_err = (value.float() - ret).abs()"),
    M("ppo-value-clip-range", "runtime/ppo.py", "(value.float() - old_value).clamp(-cfg.clip, cfg.clip)",
      "(value.float() - old_value).clamp(-2 * cfg.clip, 2 * cfg.clip)"),
    M("ppo-value-clip-max", "runtime/ppo.py", "v_err = torch.max(v_err,", "v_err = torch.min(v_err,"),
    M("ppo-value-half", "runtime/ppo.py", "v_loss = 0.5 * v_err.mean()", "v_loss = 1.0 * v_err.mean()"),
    M("ppo-entropy-sign", "runtime/ppo.py", "- cfg.entropy * entropy", "+ cfg.entropy * entropy"),
    M("ppo-entropy-coef", "config.py", 'entropy: float = setting(0.0025,', 'entropy: float = setting(0.01,'),
    M("ppo-value-clip-off", "config.py", 'clip_value: bool = setting(True,', 'clip_value: bool = setting(False,'),
    M("ppo-value-coef", "config.py", 'value_coef: float = setting(0.5,', 'value_coef: float = setting(1.0,'),
    M("ppo-grad-clip", "config.py", 'grad_clip: float = setting(0.5,', 'grad_clip: float = setting(1.0,'),
    M("ppo-adam-eps", "config.py", 'adam_eps: float = setting(1e-8,', 'adam_eps: float = setting(1e-5,'),
    M("ppo-logits-average", "models/policy.py", "logits = (self.action_head(hidden) + self.decoder(latent)) / 2",
      "logits = self.action_head(hidden) + self.decoder(latent)"),
    # -- stage 3b: its optimiser's groups and ramps
    M("ppo-head-lr", "config.py", 'head_lr: float = setting(1e-2,', 'head_lr: float = setting(5e-3,'),
    M("ppo-action-ramp", "config.py", "action_head_ramp: tuple[int, int] = setting((35_000, 50_000)",
      "action_head_ramp: tuple[int, int] = setting((30_000, 50_000)"),
    M("ppo-value-ramp", "config.py", "value_head_ramp: tuple[int, int] = setting((25_000, 50_000)",
      "value_head_ramp: tuple[int, int] = setting((25_000, 40_000)"),
    M("ppo-fc-ramp", "config.py", "fc_ramp: tuple[int, int] = setting((50_000, 200_000)",
      "fc_ramp: tuple[int, int] = setting((50_000, 100_000)"),
    M("ppo-action-peak", "stages/finetune.py", "(policy.action_head, cfg.action_head_ramp, 0.25)",
      "(policy.action_head, cfg.action_head_ramp, 0.5)"),
    M("ppo-fc-peak", "stages/finetune.py", "(policy.fc_rl, cfg.fc_ramp, 0.1)", "(policy.fc_rl, cfg.fc_ramp, 0.2)"),
    M("ppo-updates-rounding", "config.py", "return max(1, self.env_steps // (self.num_envs * self.rollout))",
      "return -(-self.env_steps // (self.num_envs * self.rollout))"),
    # -- stage 3b: GAE, rewards
    M("gae-gamma", "config.py", 'gamma: float = setting(0.999, "discount")',
      'gamma: float = setting(0.99, "discount")'),
    M("gae-lambda", "config.py", 'gae_lambda: float = setting(0.95,', 'gae_lambda: float = setting(0.9,'),
    M("gae-trace", "runtime/ppo.py", "last = delta + gamma * lam * live * last", "last = delta + gamma * live * last"),
    M("gae-bootstrap-done", "runtime/ppo.py", "delta = rewards[t] + gamma * values[t + 1] * live - values[t]",
      "delta = rewards[t] + gamma * values[t + 1] - values[t]"),
    M("rewards-normalize-off", "config.py", 'normalize_rewards: bool = setting(True,',
      'normalize_rewards: bool = setting(False,'),
    M("rewards-clip", "envs/wrappers.py", "clip: float = 10.0", "clip: float = 5.0"),
    M("rewards-return-discount", "envs/wrappers.py", "self.ret = self.ret * self.gamma + reward",
      "self.ret = self.ret + reward"),
    # -- stage 3b: the online decoder
    M("decoder-smoothing", "config.py", 'label_smoothing: float = setting(0.05,',
      'label_smoothing: float = setting(0.0,'),
    M("decoder-lr", "config.py", 'decoder_lr: float = setting(1e-3,', 'decoder_lr: float = setting(1e-2,'),
    M("decoder-epochs", "config.py", 'decoder_epochs: int = setting(3,', 'decoder_epochs: int = setting(2,'),
    M("decoder-batch", "config.py", 'decoder_batch: int = setting(512,', 'decoder_batch: int = setting(256,'),
    M("decoder-step-smoothing", "latent/decoders.py",
      "F.cross_entropy(outputs, actions, label_smoothing=label_smoothing)",
      "F.cross_entropy(outputs, actions)"),
    M("decoder-first-transition", "latent/online.py", "if self._last is not None:", "if False:"),
]


def apply(mutant: Mutant, package: Path) -> None:
    """Changes `package` (a copy of lapo_fast) by the mutant's one line; refuses if it no longer applies."""
    path = package / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name}: {mutant.old!r} occurs {count} times in lapo_fast/{mutant.path} "
                         "(the code moved: update the mutant)")
    path.write_text(text.replace(mutant.old, mutant.new))


def run(mutant: Mutant, fixtures: Path, source: Path) -> tuple[str, str, float]:
    """(verdict, the row that killed it or why not, seconds): check-reference on a mutated copy of
    the package `source`."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        package = Path(tmp) / "lapo_fast"
        shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__"))
        try:
            apply(mutant, package)
        except ValueError:
            return "n/a", "its line is not in this package", 0.0
        env = dict(os.environ, PYTHONPATH=tmp, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        code = "import sys; from lapo_fast.cli import main; sys.exit(main(['check-reference', sys.argv[1]]))"
        proc = subprocess.run([sys.executable, "-c", code, str(fixtures)], env=env, cwd=tmp, capture_output=True,
                              text=True, timeout=900)
    seconds = time.perf_counter() - t0
    fails = [line for line in proc.stdout.splitlines() if line.rstrip().endswith("FAIL")]
    if proc.returncode == 0:
        return "SURVIVED", "check-reference passed", seconds
    if fails:
        return "killed", f"{' '.join(fails[0].split()[:2])}  ({len(fails)} rows)", seconds
    last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"])[-1]
    return "killed", f"error: {last[:100]}", seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=FIXTURES, help="fixture folder (default: the shipped small ones)")
    ap.add_argument("--only", default="", help="run the mutants whose name starts with this")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="mutants run at once")
    ap.add_argument("--list", action="store_true", help="only check that every mutant applies, and list them")
    ap.add_argument("--package", type=Path, default=ROOT / "lapo_fast",
                    help="the lapo_fast folder to mutate (another checkout's, to score it: mutants whose line it "
                         "lacks are n/a)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if m.name.startswith(args.only)]
    if not chosen:
        print(f"mutants: none named {args.only!r}*", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:  # every mutant applies to this checkout's code as it is
        package = Path(tmp) / "lapo_fast"
        shutil.copytree(ROOT / "lapo_fast", package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        for m in chosen:
            apply(m, package)
            shutil.copy(ROOT / "lapo_fast" / m.path, package / m.path)
    if args.list:
        for m in chosen:
            print(f"{m.name:<28} lapo_fast/{m.path}: {m.old!r} -> {m.new!r}")
        print(f"{len(chosen)} mutants, each applies")
        return 0
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda m: run(m, args.fixtures, args.package), chosen))
    width = max(len(m.name) for m in chosen)
    for m, (verdict, why, seconds) in zip(chosen, results):
        print(f"{m.name:<{width}}  {verdict:<8}  {why}  [{seconds:.0f} s]")
    killed = sum(v == "killed" for v, _, _ in results)
    applied = sum(v != "n/a" for v, _, _ in results)
    missing = f" ({len(chosen) - applied} n/a)" if applied < len(chosen) else ""
    print(f"mutation score: {killed} of {applied} killed{missing}")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
