"""The latent action space of a trained IDM, projected to 2-D with UMAP and coloured by the true
action (NOOP omitted), as in the LAPO paper's Figure 5.

    lapo-fast umap --data DATASET --out RUN [--points 5000]

Writes RUN/umap/umap.png and umap.npz (the 2-D points and their true actions).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lapo_fast.data import FrameDataset, valid_starts
from lapo_fast.stages.lam import idm_latents, lam_config, load_lam

# procgen's 15 buttons, in action-index order.
ACTION_NAMES = ("LEFT-DOWN", "LEFT", "LEFT-UP", "DOWN", "NOOP", "UP", "RIGHT-DOWN", "RIGHT", "RIGHT-UP",
                "D", "A", "W", "S", "Q", "E")
NOOP = ACTION_NAMES.index("NOOP")


def project_latents(data_dir, run_dir, *, points: int = 5_000, seed: int = 0, device: str = "") -> Path:
    ds = FrameDataset(data_dir)
    if "action" not in ds.manifest.meta_keys:
        raise ValueError(f"{data_dir} has no true actions to colour the latent space by")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lam_cfg = lam_config(run_dir)
    context = lam_cfg.context
    idm = load_lam(run_dir, lam_cfg).idm.to(device)
    starts = valid_starts(ds.episodes, context + 2)
    actions = np.asarray(ds.meta("action"))[starts + context]
    starts = starts[actions != NOOP]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(starts), min(points, len(starts)), replace=False))
    starts = starts[pick]
    actions = np.asarray(ds.meta("action"))[starts + context]
    latents = idm_latents(idm, ds.cache(), starts, context, device=device)

    import umap  # umap-learn

    xy = umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(latents)
    out = Path(run_dir) / "umap"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "umap.tmp.npz"
    np.savez(tmp, xy=xy, actions=actions, starts=starts)
    os.replace(tmp, out / "umap.npz")
    return plot_umap(xy, actions, out / "umap.png")


def plot_umap(xy: np.ndarray, actions: np.ndarray, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    cmap = plt.get_cmap("tab20")
    for a in np.unique(actions):
        m = actions == a
        ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(int(a) % 20), label=ACTION_NAMES[a], alpha=0.7)
    ax.set_title("IDM latent actions (UMAP), coloured by true action")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
