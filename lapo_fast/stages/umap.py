"""The latent action space of a trained IDM, projected to 2-D with UMAP and coloured by the true
action (NOOP omitted), as in the LAPO paper's Figure 5.

    lapo-fast umap --data DATASET --out RUN [--points 5000] [--loader auto|resident|cache|compressed]

Writes RUN/umap/umap.png and umap.npz (the 2-D points and their true actions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lapo_fast.config import UMAP_FEWEST, UmapConfig
from lapo_fast.data import FrameDataset, valid_starts
from lapo_fast.data.planner import frames_for
from lapo_fast.envs.games import ACTION_NAMES, NOOP, OBS_SHAPE
from lapo_fast.latent import idm_latents
from lapo_fast.eval.plots import pyplot, save_plot
from lapo_fast.registry import StageContext
from lapo_fast.rundir import RunDir
from lapo_fast.runtime import distributed
from lapo_fast.runtime.files import atomic_write


def run(ctx: StageContext, cfg: UmapConfig) -> str:
    """The registry's entry (lapo_fast.registry): the UMAP of ctx.data's windows (under `train`:
    once)."""
    if ctx.train and ctx.run.umap_plot.exists():
        return f"skipped: {ctx.run.umap_plot} exists"
    return f"wrote {project_latents(ctx.data, ctx.run, cfg)}"


def project_latents(data_dir, run_dir, cfg: UmapConfig | None = None) -> Path:
    cfg = cfg or UmapConfig()
    points, seed = cfg.points, cfg.seed
    ds = FrameDataset(data_dir, frame_shape=OBS_SHAPE)
    if "action" not in ds.manifest.meta_keys:
        raise ValueError(f"{data_dir} has no true actions to colour the latent space by")
    device = distributed.device(cfg.device)
    run = RunDir(run_dir)
    run.claim(game=ds.manifest.source.get("env"))
    lam_cfg = run.config("lam")
    context = lam_cfg.context
    idm = run.load_lam(lam_cfg).idm.to(device)
    starts = valid_starts(ds.episodes, context + 2)
    actions = np.asarray(ds.meta("action"))[starts + context]
    starts = starts[actions != NOOP]
    if len(starts) < UMAP_FEWEST:
        raise ValueError(f"{data_dir}: {len(starts)} windows with an action other than NOOP; the UMAP needs "
                         f"{UMAP_FEWEST} or more (record more frames)")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(starts), min(points, len(starts)), replace=False))
    starts = starts[pick]
    actions = np.asarray(ds.meta("action"))[starts + context]
    _, frames = frames_for("umap", ds, cfg.loader, device)
    latents = idm_latents(idm, frames, starts, context, device=device)

    import umap  # umap-learn

    xy = umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(latents)
    run.umap_points.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(run.umap_points, lambda tmp: np.savez(tmp, xy=xy, actions=actions, starts=starts))
    return plot_umap(xy, actions, run.umap_plot)


def plot_umap(xy: np.ndarray, actions: np.ndarray, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    cmap = plt.get_cmap("tab20")
    for a in np.unique(actions):
        m = actions == a
        ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(int(a) % 20), label=ACTION_NAMES[a], alpha=0.7)
    ax.set_title("IDM latent actions (UMAP), coloured by true action")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    save_plot(fig, path)
    return path
