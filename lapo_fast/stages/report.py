"""The run's report: what each stage measured, in report.md (for people), report.json (for
scripts) and plots: stage-1 losses, fine-tuning vs PPO from scratch, the decoder sweep, the UMAP.

    lapo-fast report --out RUN

One section per stage that measures something (SECTIONS, in the report's order): each reads that
stage's files through the RunDir and returns its part of report.json, its markdown and its plots;
a stage that has not run yet has no section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from lapo_fast.envs.games import NUM_ACTIONS
from lapo_fast.eval.plots import SCRATCH_RUNS, pyplot, save_plot, smooth, training_curve
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.files import atomic_write, read_json, write_json


class Section(NamedTuple):
    data: dict              # its keys of report.json
    markdown: list[str]     # its lines of report.md
    plots: dict[str, str]   # name -> file, relative to the run


def run(ctx: StageContext, cfg=None) -> str:
    """The registry's entry (lapo_fast.registry): the report of what the run has so far."""
    return f"wrote {write_report(ctx.run)}"


def write_report(run_dir) -> Path:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    report: dict = {"run": str(run), "timings_s": read_json(run.timings, {}), "seeds": _seeds(run)}
    lines, plots = [f"# LAPO run report: {run}", ""] + _header(report), {}
    for section in SECTIONS:
        part = section(run)
        if part is not None:
            report.update(part.data)
            lines += part.markdown
            plots.update(part.plots)
    if run.umap_plot.exists():
        plots["umap"] = str(run.umap_plot.relative_to(run.path))
    report["plots"] = plots
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    write_json(run.report("json"), report)
    return atomic_write(run.report("md"), "\n".join(lines))


def _header(report: dict) -> list[str]:
    lines = []
    if report["seeds"]:
        lines += ["Seeds: " + ", ".join(f"{k} {v}" for k, v in report["seeds"].items()) + ".", ""]
    if report["timings_s"]:
        lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in report["timings_s"].items()] + [""]
    return lines


def _seeds(run: RunDir) -> dict:
    """Each stage's seed, as it ran (the stage's own config.json) or as `train` resolved it."""
    seeds = {}
    for stage, paths in run.saved_configs().items():
        for path in paths:  # the stage's own last: it wins
            payload = read_json(path)
            config = payload.get("config") if isinstance(payload, dict) else None
            if isinstance(config, dict) and "seed" in config:
                seeds[stage] = config["seed"]
    return seeds


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


# -- the sections -------------------------------------------------------------------------------------

def stage1(run: RunDir) -> Section | None:
    log = run.read_metrics("lam")
    rows = [r for r in log if "fdm_loss" in r]
    if not rows:
        return None
    s = {k: rows[-1].get(k) for k in ("step", "fdm_loss", "test_fdm_loss", "test_fdm_loss_shuffled", "perplexity",
                                      "codebook0_codes_used", "steps_per_s")}
    s["probe"] = read_json(run.probe)
    s["quantize"] = run.config("lam").quantize if run.has("lam") else True
    codes = (f"perplexity {_fmt(s['perplexity'], 1)}, codebook-0 codes used per batch {s['codebook0_codes_used']}"
             if s["quantize"] else "no vector quantisation (the ablation: a continuous latent)")
    md = ["## Stage 1: latent action model", "",
          f"step {s['step']}: FDM loss {_fmt(s['fdm_loss'], 5)} (held-out {_fmt(s['test_fdm_loss'], 5)}), {codes}.", ""]
    if s.get("test_fdm_loss_shuffled") is not None:
        md += [f"Held-out FDM loss with each window given another window's action: "
               f"{_fmt(s['test_fdm_loss_shuffled'], 5)} (vs {_fmt(s['test_fdm_loss'], 5)} with its own): "
               "the gap is what the action tells the world model.", ""]
    p = s["probe"]
    if p is None:
        md += ["Latent probe: missing (rerun `lapo-fast lam` on this run to make it).", ""]
    elif "skipped" in p:
        md += [f"Latent probe: not run ({p['skipped']}).", ""]
    else:
        linear = f", linear {p['linear_accuracy']:.3f}" if "linear_accuracy" in p else ""
        md += [f"Latent probe: decoders from {p['labelled']} labelled transitions predict the true action of "
               f"{p['held_out']} held-out ones with accuracy **{p['accuracy']:.3f}** (MLP{linear}; "
               f"chance {p['chance']:.3f}, majority class {p['majority']:.3f}).", ""]
    return Section({"stage1": s}, md, {"stage1": _stage1_plot(run, rows, [r for r in log if "probe_accuracy" in r])})


def _stage1_plot(run: RunDir, rows: list[dict], probes: list[dict]) -> str:
    fig, ax = pyplot().subplots(figsize=(5, 3.5), dpi=110)
    ax.plot([r["step"] for r in rows], [r["fdm_loss"] for r in rows], label="train")
    test = [r for r in rows if r.get("test_fdm_loss") is not None]
    if test:
        ax.plot([r["step"] for r in test], [r["test_fdm_loss"] for r in test], label="held-out")
    ax.set(xlabel="step", ylabel="FDM loss (MSE)", yscale="log", title="Stage 1")
    ax.legend(loc="upper left")
    if probes:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in probes], [r["probe_accuracy"] for r in probes], "o-", c="C2",
                 label="probe accuracy")
        ax2.axhline(probes[-1]["probe_chance"], ls=":", c="C2")
        ax2.set(ylabel="latent probe accuracy (dotted: chance)", ylim=(0, 1))
    return save_plot(fig, run.plot("stage1"))


def stage2(run: RunDir) -> Section | None:
    bc = run.read_metrics("bc")
    if not bc:
        return None
    s = {"step": bc[-1]["step"], "loss": bc[-1]["loss"], "samples_per_s": bc[-1].get("samples_per_s")}
    return Section({"stage2": s}, ["## Stage 2: latent behaviour cloning", "",
                                   f"step {s['step']}: MSE to the IDM's latents {s['loss']:.3g}.", ""], {})


def decode(run: RunDir) -> Section | None:
    results = read_json(run.results("decode"))
    if not results:
        return None
    entries = list(results.values())
    md = ["## Stage 3a: offline decoder sweep", "", "| labelled | accuracy | chance | majority | return | normalised |",
          "|---|---|---|---|---|---|"]
    md += [f"| {e['labelled']} | {_fmt(e['accuracy'])} | {_fmt(e['chance'])} | {_fmt(e['majority'])} | "
           f"{_fmt(e.get('mean_return'), 2)} | {_fmt(e.get('normalized'))} |" for e in entries] + [""]
    sizes = [e["labelled"] for e in entries]
    fig, ax = pyplot().subplots(figsize=(5, 3.5), dpi=110)
    ax.plot(sizes, [e["accuracy"] for e in entries], "o-", label="accuracy (held-out)")
    ax.axhline(1 / NUM_ACTIONS, ls=":", c="gray", label="chance")
    ax.set(xscale="log", xlabel="labelled transitions", ylabel="decoder accuracy", title="Offline decoding")
    if all("normalized" in e for e in entries):
        ax2 = ax.twinx()
        ax2.plot(sizes, [e["mean_return"] for e in entries], "s--", c="C1", label="return")
        ax2.set_ylabel("mean return of decoder(policy)")
    ax.legend(loc="upper left")
    return Section({"decode": entries}, md, {"decode": save_plot(fig, run.plot("decoder_sweep"))})


def online(run: RunDir) -> Section | None:
    """Fine-tuning's training curve beside PPO from scratch's, each read at equal env steps too."""
    curves = {}
    finetune = training_curve(run, "finetune")
    if finetune is not None:
        curves["LAPO fine-tuned (frozen trunk)"] = finetune
    scratch = next(((sub, c) for sub in SCRATCH_RUNS if (c := training_curve(run, sub)) is not None), None)
    if scratch is not None:
        curves[f"PPO from scratch ({scratch[0]})"] = scratch[1]
    if not curves:
        return None
    fig, ax = pyplot().subplots(figsize=(5.5, 3.5), dpi=110)
    for label, (x, y) in curves.items():
        ax.plot(x, smooth(y), label=label)
    ax.set(xlabel="env steps", ylabel="episode return", title="Online: fine-tuning vs scratch")
    ax.legend(fontsize=8)
    plot = save_plot(fig, run.plot("online"))
    shortest = min(x[-1] for x, _ in curves.values())  # equal env steps: read each curve there
    data = {}
    for label, (x, y) in curves.items():
        k = int(np.searchsorted(x, shortest, "right"))
        data[label] = {"env_steps": int(x[-1]), "final_return": float(np.mean(y[-5:])),
                       "return_at_equal_steps": float(np.mean(y[max(0, k - 5):k]))}
    md = ["## Stage 3b: online fine-tuning vs PPO from scratch", "",
          "| run | env steps | return (last 5 updates) | return at equal env steps |", "|---|---|---|---|"]
    md += [f"| {k} | {v['env_steps']:,} | {v['final_return']:.2f} | {v['return_at_equal_steps']:.2f} |"
           for k, v in data.items()] + [""]
    return Section({"online": data}, md, {"online": plot})


def evaluation(run: RunDir) -> Section | None:
    ev = read_json(run.results("eval"))
    if not ev:
        return None
    policies = {k: {m: v.get(m) for m in ("mean_return", "stderr", "episodes", "normalized",
                                           "normalized_to_demonstrator")} for k, v in ev["policies"].items()}
    s = ev["settings"]
    md = [f"## Evaluation ({s['game']}, {s['distribution_mode']}, {s['episodes']} episodes on unseen levels)", "",
          "| policy | mean return | stderr | normalised (paper: random 0, expert 1) | normalised to demonstrator |",
          "|---|---|---|---|---|"]
    md += [f"| {k} | {_fmt(v['mean_return'], 2)} | {_fmt(v['stderr'], 2)} | {_fmt(v['normalized'])} | "
           f"{_fmt(v['normalized_to_demonstrator'])} |" for k, v in policies.items()] + [""]
    return Section({"eval": policies, "eval_settings": s}, md, {})


# The report's sections, in its order: a new stage that measures something adds one here.
SECTIONS: tuple[Callable[[RunDir], Section | None], ...] = (stage1, stage2, decode, online, evaluation)
