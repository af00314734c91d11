"""`lapo-fast aggregate DIR`: a sweep's runs (DIR/<game>/seed<k>/) as the paper reports them.

Per game, each policy's normalised return, (R - R_random) / (R_expert - R_random) with the paper's
table, over seeds. Across games, the IQM, mean and median with 95% stratified-bootstrap confidence
intervals (rliable, Agarwal et al. 2021: runs resampled within each game). Curves: normalised
return of fine-tuning vs PPO from scratch over env steps (the paper's Figure 3: training returns,
the IQM over runs and games at each step), and of decoder(policy) over labelled transitions
(stage 3a). Runs that failed or lack a stage are listed, never silently dropped.

Writes OUT/aggregate.md, aggregate.json and plots (default OUT: DIR/aggregate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lapo_fast.envs.games import GAMES
from lapo_fast.eval.returns import normalized_return
from lapo_fast.runtime.files import atomic_write, read_json, write_json
from lapo_fast.rundir import RunDir
from lapo_fast.eval.plots import SCRATCH_RUNS, pyplot, save_plot, training_curve

from .launch import load_spec, run_state, train_setup

# The policies of a run's evaluation (eval/results.json), as the table names them.
POLICIES = {"decoded": "decoded latent policy (stage 3a)", "finetuned": "LAPO fine-tuned (stage 3b)",
            "scratch": "PPO from scratch", "demonstrator": "demonstrator"}
METRICS = ("IQM", "mean", "median")


def find_runs(directory: Path, ignored: list | None = None) -> list[dict]:
    """Every run directory DIR/<game>/seed<k>/ (k as the launcher writes it: `seed1`, never `seed01`,
    which would be a second seed 1); other seed folders go to `ignored`, with why."""
    runs = []
    for game_dir in sorted(p for p in Path(directory).iterdir() if p.is_dir() and p.name in GAMES):
        for run in sorted(p for p in game_dir.iterdir() if p.is_dir() and p.name.startswith("seed")):
            suffix = run.name[4:]
            if not suffix.isdigit() or str(int(suffix)) != suffix:
                if ignored is not None:
                    ignored.append({"game": game_dir.name, "folder": run.name,
                                    "why": "not a run folder name (seed<k>, k without leading zeros)"})
                continue
            runs.append({"game": game_dir.name, "seed": int(suffix), "dir": run})
    return runs


def run_setup(run_dir: Path) -> tuple[str | None, tuple[str, ...]]:
    """(preset, train flags) a run was made with: from its sweep job record, else `train`'s record
    of its stages' configs (the preset; flags unknown: ())."""
    run = RunDir(run_dir)
    argv = (read_json(run.job) or {}).get("argv")
    if isinstance(argv, list) and argv[:1] == ["train"]:
        return train_setup(argv)
    for paths in run.saved_configs().values():
        for path in paths:
            payload = read_json(path)
            if isinstance(payload, dict) and payload.get("preset"):
                return payload["preset"], ()
    return None, ()


def _check_one_setup(runs: list[dict]) -> tuple[str | None, tuple[str, ...]]:
    """The preset and train flags every run shares; runs made otherwise are refused, named."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run_setup(run["dir"]), []).append(f"{run['game']}/seed{run['seed']}")
    if len(groups) > 1:
        described = "; ".join(f"preset {p or '?'}{' with ' + ' '.join(f) if f else ''}: {', '.join(names)}"
                              for (p, f), names in groups.items())
        raise ValueError(f"aggregate: the runs were made with different settings ({described}); pooled, their IQM "
                         "would mean nothing: aggregate each setting's runs in a sweep directory of their own")
    return next(iter(groups)) if groups else (None, ())


def _eval_scores(run: dict) -> tuple[dict[str, float], dict[str, float], set[str]]:
    """policy -> return normalised by the paper's table, and by the run's own demonstrator (where
    it beats the random policy), from the run's evaluation; and the policies whose return is NaN/inf."""
    results = read_json(RunDir(run["dir"]).results("eval"))
    if not isinstance(results, dict) or not isinstance(results.get("policies"), dict):
        return {}, {}, set()
    scores, to_demo, nonfinite = {}, {}, set()
    for name, r in results["policies"].items():
        key = "decoded" if name.startswith("decoded") else name
        if key in POLICIES and r.get("mean_return") is not None and not np.isfinite(r["mean_return"]):
            nonfinite.add(key)
        elif key in POLICIES and r.get("mean_return") is not None:
            scores[key] = float(normalized_return(r["mean_return"], run["game"]))
            if r.get("normalized_to_demonstrator") is not None and key != "demonstrator":
                to_demo[key] = float(r["normalized_to_demonstrator"])
    return scores, to_demo, nonfinite


def _curve(run: dict, stage: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A stage's training curve (the run report's), its returns normalised."""
    curve = training_curve(RunDir(run["dir"]), stage)
    return None if curve is None else (curve[0].astype(np.float64), normalized_return(curve[1], run["game"]))


def _decode_curve(run: dict) -> dict[int, float]:
    results = read_json(RunDir(run["dir"]).results("decode"))
    if not isinstance(results, dict):
        return {}
    return {int(e["labelled"]): float(normalized_return(e["mean_return"], run["game"]))
            for e in results.values() if isinstance(e, dict) and e.get("mean_return") is not None}


def _matrix(values: dict[tuple[str, int], float], games: list[str]) -> tuple[np.ndarray, list[int]]:
    """(seeds x games) of the seeds every game has a value for, and those seeds."""
    seeds = sorted({s for (_, s) in values})
    full = [s for s in seeds if all((g, s) in values for g in games)]
    return np.array([[values[(g, s)] for g in games] for s in full], np.float64).reshape(len(full), len(games)), full


def _intervals(score_dict: dict[str, np.ndarray], func, reps: int, seed: int):
    """rliable's point estimates and 95% stratified-bootstrap intervals."""
    from rliable import library as rly

    np.random.seed(seed)  # rliable's bootstrap draws from numpy's global stream
    return rly.get_interval_estimates(score_dict, func, reps=reps)


def aggregate(directory, out=None, *, reps: int = 2000, seed: int = 0, points: int = 50) -> Path:
    """Reads every run of the sweep at `directory`; writes the report; returns aggregate.md's path.
    The report says what it is over: the sweep's plan (sweep.json), the preset and train flags the
    runs share (runs made otherwise are refused), and every planned run left out, with why."""
    from rliable import metrics

    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"aggregate: --reps (bootstrap resamples) must be an int >= 1, got {reps!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such sweep directory")
    out = Path(out) if out else directory / "aggregate"
    ignored: list[dict] = []
    runs = find_runs(directory, ignored)
    if not runs:
        raise ValueError(f"{directory}: no runs (<game>/seed<k>/ folders); launch them with `lapo-fast sweep`")
    preset, flags = _check_one_setup(runs)
    plan = load_spec(directory) if (directory / "sweep.json").exists() else None

    missing, curves, decoding = [], {"finetuned": {}, "scratch": {}}, {}
    found = {(r["game"], r["seed"]) for r in runs}
    for game, s in plan.runs() if plan else ():
        if (game, s) not in found:
            missing.append({"game": game, "seed": s, "state": "not started", "detail": "planned in sweep.json",
                            "lacks": ["every result"]})
    scores, to_demo = {p: {} for p in POLICIES}, {p: {} for p in POLICIES}
    for run in runs:
        state, detail = run_state(run["dir"])
        key, lacks = (run["game"], run["seed"]), []
        got, got_demo, nonfinite = _eval_scores(run)
        for policy, value in got_demo.items():
            to_demo[policy][key] = value
        for policy in POLICIES:
            if policy in got:
                scores[policy][key] = got[policy]
            elif policy != "scratch":  # a dedicated from-scratch run exists only with a given demonstrator
                lacks.append(f"eval of the {policy} policy" + (" (its mean return is NaN/inf)" if policy in nonfinite
                                                                 else ""))
        finetune = _curve(run, "finetune")
        scratch = next((c for c in (_curve(run, s) for s in SCRATCH_RUNS) if c is not None), None)
        if finetune is None:
            lacks.append("fine-tuning curve (no episode ended in RUN/finetune)")
        else:
            curves["finetuned"][key] = finetune
        if scratch is not None:
            curves["scratch"][key] = scratch
        dec = _decode_curve(run)
        if dec:
            decoding[key] = dec
        else:
            lacks.append("decoder sweep (RUN/decode)")
        if state != "done" or lacks:
            missing.append({"game": run["game"], "seed": run["seed"], "state": state, "detail": detail,
                            "lacks": lacks})

    games = sorted({r["game"] for r in runs})
    report: dict = {"sweep": str(directory), "games": games, "runs": len(runs), "reps": reps, "missing": missing,
                    "ignored": ignored, "preset": preset, "train_flags": list(flags),
                    "plan": None if plan is None else {"games": list(plan.envs), "seeds": plan.seeds},
                    "per_game": _per_game(scores, games), "per_game_vs_demonstrator": _per_game(to_demo, games),
                    "aggregate": {}, "curves": {}, "plots": {}}

    # Across games: IQM, mean, median, each with its 95% CI (rliable's stratified bootstrap).
    func = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_median(x)])  # noqa: E731
    matrices = {}
    for policy in POLICIES:
        m, seeds = _matrix(scores[policy], games)
        if len(seeds):
            matrices[policy] = m
            report["aggregate"][policy] = {"seeds": seeds, "games": games}
    if matrices:
        point, interval = _intervals(matrices, func, reps, seed)
        for policy in matrices:
            report["aggregate"][policy].update({
                name: {"estimate": float(point[policy][i]), "ci95": [float(interval[policy][0, i]),
                                                                     float(interval[policy][1, i])]}
                for i, name in enumerate(METRICS)})

    report["curves"]["online"] = _step_curves(curves, games, reps, seed, points)
    report["curves"]["decoding"] = _decoding_curve(decoding, games, reps, seed)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(report, out)
    write_json(out / "aggregate.json", report)
    return atomic_write(out / "aggregate.md", _markdown(report))


def _per_game(scores: dict, games: list[str]) -> dict:
    """game -> policy -> mean, min and max over seeds, and how many."""
    table = {}
    for game in games:
        row = {}
        for policy, values in scores.items():
            vals = [v for (g, _), v in sorted(values.items()) if g == game]
            if vals:
                row[policy] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                               "seeds": len(vals)}
        table[game] = row
    return table


def _iqm_by_column(x: np.ndarray) -> np.ndarray:
    """IQM of each last-axis column of (runs, games, columns) scores, NaNs (no value there) ignored."""
    from scipy.stats import trim_mean

    out = []
    for i in range(x.shape[-1]):
        col = x[..., i].reshape(-1)
        col = col[np.isfinite(col)]
        out.append(trim_mean(col, 0.25) if col.size else np.nan)
    return np.array(out)


def _ragged(values: dict[tuple[str, int], np.ndarray], games: list[str], width: int) -> np.ndarray:
    """(seeds, games, width) of per-run rows, NaN where a run has no value (the IQM skips NaNs)."""
    seeds = sorted({s for (_, s) in values})
    nan = np.full(width, np.nan)
    return np.array([[values.get((g, s), nan) for g in games] for s in seeds], np.float64)


def _step_curves(curves: dict, games: list[str], reps: int, seed: int, points: int) -> dict:
    """Normalised training return vs env steps, fine-tuning vs scratch at equal steps: each run's
    curve read at a common grid (up to the shortest fine-tuning, only between a run's own first and
    last points), IQM over runs and games with 95% CIs."""
    ends = [x[-1] for x, _ in curves["finetuned"].values()]
    if not ends:
        return {}
    grid = np.linspace(0, min(ends), points)
    score_dict = {}
    for policy, runs in curves.items():
        values = {key: np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan)
                  for key, (x, y) in runs.items()}
        if values:
            score_dict[policy] = _ragged(values, games, points)
    point, interval = _intervals(score_dict, _iqm_by_column, reps, seed)
    return {"env_steps": grid.tolist(),
            **{p: {"iqm": point[p].tolist(), "ci95_low": interval[p][0].tolist(), "ci95_high": interval[p][1].tolist(),
                   "runs": len(curves[p])} for p in score_dict}}


def _decoding_curve(decoding: dict, games: list[str], reps: int, seed: int) -> dict:
    """Normalised return of decoder(policy) vs labelled transitions (the sizes every run has)."""
    if not decoding:
        return {}
    sizes = sorted(set.intersection(*(set(d) for d in decoding.values())))
    if not sizes:
        return {}
    scores = _ragged({k: np.array([d[n] for n in sizes]) for k, d in decoding.items()}, games, len(sizes))
    point, interval = _intervals({"decoded": scores}, _iqm_by_column, reps, seed)
    return {"labelled": sizes, "iqm": point["decoded"].tolist(), "ci95_low": interval["decoded"][0].tolist(),
            "ci95_high": interval["decoded"][1].tolist(), "runs": len(decoding)}


def _plots(report: dict, out: Path) -> dict:
    plt = pyplot()
    plots = {}
    online = report["curves"].get("online")
    if online:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
        x = np.array(online["env_steps"])
        for i, policy in enumerate(p for p in ("finetuned", "scratch") if p in online):
            c = online[policy]
            ax.plot(x, c["iqm"], ".-", c=f"C{i}", label=POLICIES[policy])  # (a lone point shows too)
            ax.fill_between(x, c["ci95_low"], c["ci95_high"], color=f"C{i}", alpha=0.2)
        ax.axhline(1.0, ls=":", c="gray", label="expert")
        ax.set(xlabel="env steps", ylabel="normalised return (IQM, 95% CI)",
               title=f"Fine-tuning vs scratch, {len(report['games'])} game(s)")
        ax.legend(fontsize=8)
        plots["online"] = save_plot(fig, out / "online.png")
    dec = report["curves"].get("decoding")
    if dec:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
        ax.plot(dec["labelled"], dec["iqm"], "o-", label=POLICIES["decoded"])
        ax.fill_between(dec["labelled"], dec["ci95_low"], dec["ci95_high"], alpha=0.2)
        ax.set(xscale="log", xlabel="labelled transitions", ylabel="normalised return (IQM, 95% CI)",
               title="Offline decoding")
        ax.set_xticks(dec["labelled"], [str(n) for n in dec["labelled"]])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        plots["decoding"] = save_plot(fig, out / "decoding.png")
    if report["aggregate"]:
        fig, axes = plt.subplots(1, len(METRICS), figsize=(9, 2.2 + 0.35 * len(report["aggregate"])), dpi=110,
                                 sharey=True)
        names = list(report["aggregate"])
        for ax, metric in zip(axes, METRICS):
            for j, policy in enumerate(names):
                m = report["aggregate"][policy][metric]
                ax.plot(m["ci95"], [j, j], c=f"C{j}", lw=6, alpha=0.5, solid_capstyle="butt")
                ax.plot([m["estimate"]], [j], "|", c="k", ms=14)
            ax.set(title=metric, xlabel="normalised return")
        axes[0].set_yticks(range(len(names)), [POLICIES[p] for p in names], fontsize=8)
        plots["aggregate"] = save_plot(fig, out / "aggregate.png")
    return plots


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _markdown(r: dict) -> str:
    plan = r.get("plan")
    over = (f"the plan: {', '.join(plan['games'])} x seeds 0..{plan['seeds'] - 1}" if plan
            else "no sweep.json: the run folders found")
    lines = [f"# LAPO sweep: {r['sweep']}", "",
             f"Over {over}; preset {r.get('preset') or 'unknown'}, train flags "
             f"{' '.join(r.get('train_flags') or []) or 'none'}. {len(r['missing'])} planned run(s) lack results "
             f"and {len(r.get('ignored', []))} folder(s) were ignored (both listed at the end).", "",
             f"{r['runs']} run(s) over {len(r['games'])} game(s). Normalised return: (R - R_random) / "
             "(R_expert - R_random), the paper's table. Aggregates: rliable's IQM, mean and median with 95% "
             f"stratified-bootstrap confidence intervals ({r['reps']} resamples).", ""]
    for key, title in (("per_game", "Per game (mean over seeds [min, max] (seeds))"),
                       ("per_game_vs_demonstrator", "Per game, normalised to each run's own demonstrator "
                                                    "(R - R_random) / (R_demo - R_random)")):
        names = [p for p in POLICIES if key == "per_game" or p != "demonstrator"]
        lines += [f"## {title}", "", "| game | " + " | ".join(POLICIES[p] for p in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for game, row in r[key].items():
            cells = [f"{_fmt(row[p]['mean'])} [{_fmt(row[p]['min'])}, {_fmt(row[p]['max'])}] ({row[p]['seeds']})"
                     if p in row else "-" for p in names]
            lines.append(f"| {game} | " + " | ".join(cells) + " |")
        lines.append("")
    if r["aggregate"]:
        lines += ["## Across games", "", "| policy | seeds | " + " | ".join(f"{m} [95% CI]" for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 2) + "|"]
        for policy, a in r["aggregate"].items():
            cells = [f"{_fmt(a[m]['estimate'])} [{_fmt(a[m]['ci95'][0])}, {_fmt(a[m]['ci95'][1])}]" for m in METRICS]
            lines.append(f"| {POLICIES[policy]} | {', '.join(map(str, a['seeds']))} | " + " | ".join(cells) + " |")
        lines.append("")
    online = r["curves"].get("online")
    if online:
        lines += ["## Fine-tuning vs PPO from scratch (training returns, IQM over runs and games)", "",
                  "| env steps | " + " | ".join(POLICIES[p] for p in ("finetuned", "scratch") if p in online) + " |",
                  "|---" * (1 + sum(p in online for p in ("finetuned", "scratch"))) + "|"]
        for i in np.unique(np.linspace(0, len(online["env_steps"]) - 1, 5).astype(int)):
            cells = [f"{_fmt(c['iqm'][i])} [{_fmt(c['ci95_low'][i])}, {_fmt(c['ci95_high'][i])}]"
                     for c in (online[p] for p in ("finetuned", "scratch") if p in online)]
            lines.append(f"| {online['env_steps'][i]:,.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    dec = r["curves"].get("decoding")
    if dec:
        lines += ["## Offline decoding vs labelled transitions (IQM [95% CI])", "", "| labelled | decoder(policy) |",
                  "|---|---|"]
        lines += [f"| {n} | {_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}] |"
                  for n, v, lo, hi in zip(dec["labelled"], dec["iqm"], dec["ci95_low"], dec["ci95_high"])]
        lines.append("")
    if r["missing"]:
        lines += ["## Runs missing results (not in the aggregates where they lack a value)", "",
                  "| game | seed | state | detail | lacks |", "|---|---|---|---|---|"]
        lines += [f"| {m['game']} | {m['seed']} | {m['state']} | {m['detail']} | {'; '.join(m['lacks']) or '-'} |"
                  for m in r["missing"]]
        lines.append("")
    if r.get("ignored"):
        lines += ["## Folders ignored", "", "| game | folder | why |", "|---|---|---|"]
        lines += [f"| {i['game']} | {i['folder']} | {i['why']} |" for i in r["ignored"]] + [""]
    if r["plots"]:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in r["plots"].items()] + [""]
    return "\n".join(lines)
