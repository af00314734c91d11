"""Which optional extra brings which module: `pip install lapo-fast` is the core (lapo_fast.ops,
lapo_fast.models: torch, numpy, triton); the commands say which extra to add when one is missing."""

from __future__ import annotations

import importlib.util

# Top-level module -> the extra that installs it. pyproject.toml's optional-dependencies are the
# lists of packages; tests/test_packaging.py checks that each module's package is in its extra there.
EXTRA_OF = {"procgen": "procgen", "gym": "procgen", "gym3": "procgen", "gymnasium": "procgen",
            "av": "video", "PIL": "video", "matplotlib": "report", "umap": "report",
            "safetensors": "train", "lz4": "train", "zstandard": "train", "tqdm": "train", "tensorboard": "train",
            "tyro": "train", "submitit": "sweep", "rliable": "sweep", "nvidia.dali": "dali"}


def missing_message(modules, what: str) -> str | None:
    """One line naming the modules `what` needs that are not installed and the extras that bring
    them, or None when all are there."""
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    if not gone:
        return None
    extras = sorted({EXTRA_OF.get(m, "train") for m in gone})
    return (f"{what} needs {', '.join(gone)}, not installed: pip install 'lapo-fast[{','.join(extras)}]'"
            + (" (or [train] for every command)" if extras != ["train"] and "sweep" not in extras else ""))


def extra_of(error: ModuleNotFoundError) -> str | None:
    """The extra that would have brought the module an ImportError names, or None if it is not ours."""
    name = error.name or ""
    return EXTRA_OF.get(name.split(".")[0]) or EXTRA_OF.get(".".join(name.split(".")[:2]))
