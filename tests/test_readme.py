"""The README's Python examples run as written, so they cannot go stale."""

import re
from pathlib import Path

import numpy as np
import pytest

from lapo_fast.data import DatasetWriter

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[b.splitlines()[-1][:40] for b in BLOCKS])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    # The dataset the data example reads (the README records it with `lapo-fast collect`).
    rng = np.random.default_rng(0)
    with DatasetWriter(tmp_path / "data" / "starpilot-train") as w:
        for _ in range(3):
            w.add_episode(rng.integers(0, 255, (20, 64, 64, 3), dtype=np.uint8), action=rng.integers(0, 15, 20))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
