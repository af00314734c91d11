"""What every stage writes beside its checkpoints: a metrics file (JSON lines, one object per log
line, the source of the report's curves) and TensorBoard events; where they go is the RunDir's
(RunDir.run_log, RunDir.read_metrics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .files import atomic_write


class RunLog:
    """Appends metrics to the JSON-lines file `path` and TensorBoard events to `events` (None: none).
    On resume, `truncate(step)` drops lines logged after the checkpoint being resumed, so curves
    never hold the same step twice."""

    def __init__(self, path: Path, events: Path | None, tag: str, *, enabled: bool = True):
        self.path = Path(path)
        self.tag = tag
        self.enabled = enabled
        self.writer = None
        if enabled and events is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard missing: metrics.jsonl still has everything
                pass
            else:
                self.writer = SummaryWriter(str(events))

    def truncate(self, step: int, key: str = "step") -> None:
        """Keeps the lines up to `step` (and drops a torn last line)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [row for row in _rows(self.path) if row.get(key, 0) <= step]
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(self, metrics: dict, step_key: str = "step") -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if k != step_key and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{self.tag}/{k}", v, metrics[step_key])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics file ([] when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    return _rows(path)


def _rows(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl. A torn last line is what a crash mid-write leaves: dropped,
    with a warning; a damaged line elsewhere is an error naming the file and line."""
    lines = path.read_text().split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if all(not rest for rest in lines[n:]):
                print(f"warning: {path}: dropped its torn last line {n} (a crash mid-write)")
                continue
            raise ValueError(f"{path}: line {n} is damaged ({e}); delete that line and rerun") from None
        rows.append(row)
    return rows

