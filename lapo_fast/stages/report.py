"""The run's report: what each stage measured, in report.md (for people), report.json (for
scripts) and plots: stage-1 losses, fine-tuning vs PPO from scratch, the decoder sweep, the UMAP.

    lapo-fast report --out RUN
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lapo_fast.envs.games import NUM_ACTIONS
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.files import atomic_write, read_json, write_json
from lapo_fast.runtime.runlog import read_metrics

SCRATCH_RUNS = ("ppo", "demo")  # a PPO-from-scratch curve: a dedicated run, else the demonstrator's own


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, path: Path) -> str:
    """Writes a figure atomically and closes it; returns its file name (what reports link)."""
    fig.tight_layout()
    atomic_write(path, fig.savefig)
    pyplot().close(fig)
    return path.name


def _smooth(y: np.ndarray, k: int = 5) -> np.ndarray:
    if len(y) < k:
        return y
    return np.convolve(np.pad(y, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, mode="valid")


def training_curve(run: RunDir, stage: str):
    """(env steps, mean return of the episodes that ended) of a PPO-style stage, None without any."""
    rows = [r for r in read_metrics(run.stage(stage)) if r.get("episode_return") is not None]
    return (np.array([r["env_steps"] for r in rows]), np.array([r["episode_return"] for r in rows])) if rows else None


def run(ctx: StageContext, cfg=None) -> str:
    """The registry's entry (lapo_fast.registry): the report of what the run has so far."""
    return f"wrote {write_report(ctx.run)}"


def write_report(run_dir) -> Path:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    plt = pyplot()
    report: dict = {"run": str(run), "timings_s": read_json(run.timings, {})}
    plots: dict[str, str] = {}

    lam_log = read_metrics(run.stage("lam"))
    lam = [r for r in lam_log if "fdm_loss" in r]
    if lam:
        last = lam[-1]
        report["stage1"] = {k: last.get(k) for k in ("step", "fdm_loss", "test_fdm_loss", "test_fdm_loss_shuffled",
                                                     "perplexity", "codebook0_codes_used", "steps_per_s")}
        report["stage1"]["probe"] = read_json(run.probe)
        report["stage1"]["quantize"] = run.config("lam").quantize if run.has("lam") else True
        rows = lam
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
        ax.plot([r["step"] for r in rows], [r["fdm_loss"] for r in rows], label="train")
        test = [r for r in rows if r.get("test_fdm_loss") is not None]
        if test:
            ax.plot([r["step"] for r in test], [r["test_fdm_loss"] for r in test], label="held-out")
        ax.set(xlabel="step", ylabel="FDM loss (MSE)", yscale="log", title="Stage 1")
        ax.legend(loc="upper left")
        probes = [r for r in lam_log if "probe_accuracy" in r]
        if probes:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in probes], [r["probe_accuracy"] for r in probes], "o-", c="C2",
                     label="probe accuracy")
            ax2.axhline(probes[-1]["probe_chance"], ls=":", c="C2")
            ax2.set(ylabel="latent probe accuracy (dotted: chance)", ylim=(0, 1))
        plots["stage1"] = save_plot(fig, run.plot("stage1"))

    bc = read_metrics(run.stage("bc"))
    if bc:
        report["stage2"] = {"step": bc[-1]["step"], "loss": bc[-1]["loss"],
                            "samples_per_s": bc[-1].get("samples_per_s")}

    decode = read_json(run.results("decode"))
    if decode:
        report["decode"] = list(decode.values())
        sizes = [e["labelled"] for e in decode.values()]
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
        ax.plot(sizes, [e["accuracy"] for e in decode.values()], "o-", label="accuracy (held-out)")
        ax.axhline(1 / NUM_ACTIONS, ls=":", c="gray", label="chance")
        ax.set(xscale="log", xlabel="labelled transitions", ylabel="decoder accuracy", title="Offline decoding")
        if all("normalized" in e for e in decode.values()):
            ax2 = ax.twinx()
            ax2.plot(sizes, [e["mean_return"] for e in decode.values()], "s--", c="C1", label="return")
            ax2.set_ylabel("mean return of decoder(policy)")
        ax.legend(loc="upper left")
        plots["decode"] = save_plot(fig, run.plot("decoder_sweep"))

    curves = {}
    finetune = training_curve(run, "finetune")
    if finetune is not None:
        curves["LAPO fine-tuned (frozen trunk)"] = finetune
    for sub in SCRATCH_RUNS:
        scratch = training_curve(run, sub)
        if scratch is not None:
            curves[f"PPO from scratch ({sub})"] = scratch
            break
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
        for label, (x, y) in curves.items():
            ax.plot(x, _smooth(y), label=label)
        ax.set(xlabel="env steps", ylabel="episode return", title="Online: fine-tuning vs scratch")
        ax.legend(fontsize=8)
        plots["online"] = save_plot(fig, run.plot("online"))
        report["online"] = {label: {"env_steps": int(x[-1]), "final_return": float(np.mean(y[-5:]))}
                            for label, (x, y) in curves.items()}
        shortest = min(x[-1] for x, _ in curves.values())  # equal env steps: read each curve there
        for label, (x, y) in curves.items():
            k = int(np.searchsorted(x, shortest, "right"))
            report["online"][label]["return_at_equal_steps"] = float(np.mean(y[max(0, k - 5):k]))

    ev = read_json(run.results("eval"))
    if ev:
        report["eval"] = {k: {m: v.get(m) for m in ("mean_return", "stderr", "episodes", "normalized",
                                                     "normalized_to_demonstrator")}
                          for k, v in ev["policies"].items()}
        report["eval_settings"] = ev["settings"]
    if run.umap_plot.exists():
        plots["umap"] = str(run.umap_plot.relative_to(run.path))
    report["plots"] = plots
    report["seeds"] = _seeds(run)

    write_json(run.report("json"), report)
    return atomic_write(run.report("md"), _markdown(report))


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _seeds(run: RunDir) -> dict:
    """Each stage's seed, as it ran (the stage's own config.json) or as `train` resolved it."""
    seeds = {}
    for path in sorted(run.path.glob("config.*.json")) + sorted(run.path.glob("*/config.json")):
        stage = path.parent.name if path.name == "config.json" else path.name.split(".")[1]
        payload = read_json(path)
        config = payload.get("config") if isinstance(payload, dict) else None
        if isinstance(config, dict) and "seed" in config:
            seeds[stage] = config["seed"]
    return seeds


def _markdown(r: dict) -> str:
    lines = [f"# LAPO run report: {r['run']}", ""]
    if r.get("seeds"):
        lines += ["Seeds: " + ", ".join(f"{k} {v}" for k, v in r["seeds"].items()) + ".", ""]
    if r.get("timings_s"):
        lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in r["timings_s"].items()]
        lines.append("")
    if "stage1" in r:
        s = r["stage1"]
        codes = (f"perplexity {_fmt(s['perplexity'], 1)}, codebook-0 codes used per batch {s['codebook0_codes_used']}"
                 if s.get("quantize", True) else "no vector quantisation (the ablation: a continuous latent)")
        lines += ["## Stage 1: latent action model", "",
                  f"step {s['step']}: FDM loss {_fmt(s['fdm_loss'], 5)} (held-out {_fmt(s['test_fdm_loss'], 5)}), "
                  f"{codes}.", ""]
        if s.get("test_fdm_loss_shuffled") is not None:
            lines += [f"Held-out FDM loss with each window given another window's action: "
                      f"{_fmt(s['test_fdm_loss_shuffled'], 5)} (vs {_fmt(s['test_fdm_loss'], 5)} with its own): "
                      "the gap is what the action tells the world model.", ""]
        if s.get("probe") is None:
            lines += ["Latent probe: missing (rerun `lapo-fast lam` on this run to make it).", ""]
        elif "skipped" in s["probe"]:
            lines += [f"Latent probe: not run ({s['probe']['skipped']}).", ""]
        else:
            p = s["probe"]
            linear = f", linear {p['linear_accuracy']:.3f}" if "linear_accuracy" in p else ""
            lines += [f"Latent probe: decoders from {p['labelled']} labelled transitions predict the true action of "
                      f"{p['held_out']} held-out ones with accuracy **{p['accuracy']:.3f}** (MLP{linear}; "
                      f"chance {p['chance']:.3f}, majority class {p['majority']:.3f}).", ""]
    if "stage2" in r:
        lines += ["## Stage 2: latent behaviour cloning", "",
                  f"step {r['stage2']['step']}: MSE to the IDM's latents {r['stage2']['loss']:.3g}.", ""]
    if "decode" in r:
        lines += ["## Stage 3a: offline decoder sweep", "",
                  "| labelled | accuracy | chance | majority | return | normalised |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {e['labelled']} | {_fmt(e['accuracy'])} | {_fmt(e['chance'])} | {_fmt(e['majority'])} | "
                  f"{_fmt(e.get('mean_return'), 2)} | {_fmt(e.get('normalized'))} |" for e in r["decode"]]
        lines.append("")
    if "online" in r:
        lines += ["## Stage 3b: online fine-tuning vs PPO from scratch", "",
                  "| run | env steps | return (last 5 updates) | return at equal env steps |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['env_steps']:,} | {v['final_return']:.2f} | {v['return_at_equal_steps']:.2f} |"
                  for k, v in r["online"].items()]
        lines.append("")
    if "eval" in r:
        s = r["eval_settings"]
        lines += [f"## Evaluation ({s['game']}, {s['distribution_mode']}, {s['episodes']} episodes on unseen "
                  "levels)", "",
                  "| policy | mean return | stderr | normalised (paper: random 0, expert 1) "
                  "| normalised to demonstrator |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['mean_return'], 2)} | {_fmt(v['stderr'], 2)} | {_fmt(v['normalized'])} | "
                  f"{_fmt(v['normalized_to_demonstrator'])} |" for k, v in r["eval"].items()]
        lines.append("")
    if r["plots"]:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in r["plots"].items()] + [""]
    return "\n".join(lines)
