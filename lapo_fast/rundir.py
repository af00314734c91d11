"""The run directory: the one owner of its layout. Stages and the CLI ask a RunDir where things
are and load what earlier stages made; no other module spells a run-directory file name.

    RUN/run.json                  what the run is of: its game and training dataset (RunDir.claim)
    RUN/config.<stage>.json       `train`'s resolved config of each stage, with the preset
    RUN/timings.json              wall time per stage (`train`)
    RUN/data/{train,test}         datasets `train` recorded
    RUN/<stage>/                  one folder per stage: demo, lam, bc, decode, finetune, ppo, eval, umap
        config.json               the stage's resolved config (typed: config.load), versions, data
        metrics.jsonl, tb/        run log (runtime/runlog.py)
        step-XXXXXXXX/            checkpoints (runtime/checkpoint.py)
    RUN/lam/probe.json            stage 1's final latent probe
    RUN/bc/labels.npz             the frozen IDM's latent of every window (stage 2's targets)
    RUN/decode/decoder-N.safetensors, results.json
    RUN/eval/results.json         RUN/umap/umap.{png,npz}
    RUN/report.{md,json}, RUN/<plot>.png
    RUN/sweep-job.json            a sweep launcher's record of the run's job (lapo_fast.sweep)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lapo_fast.config import FinetuneConfig, LAMConfig
from lapo_fast.config import from_saved
from lapo_fast.config import load as load_config
from lapo_fast.config import payload as config_payload
from lapo_fast.config import resumable, shape_settings
from lapo_fast.config import save as save_config
from lapo_fast.runtime.checkpoint import latest_checkpoint, load_latest
from lapo_fast.registry import command_of, folder_config
from lapo_fast.runtime.files import read_json, write_json
from lapo_fast.runtime.runlog import RunLog, read_metrics


class RunDir:
    """One run directory: the path of everything in it (the layout above) and the loaders of what
    its stages made. Accepted wherever a path is (os.PathLike)."""

    def __init__(self, path):
        self.path = Path(path)
        self.identity = self.path / "run.json"               # the run's game and training data
        self.timings = self.path / "timings.json"            # wall time per stage (`train`)
        self.probe = self.stage("lam") / "probe.json"        # stage 1's final latent probe
        self.labels = self.stage("bc") / "labels.npz"        # stage 2's cached IDM latents
        self.umap_points = self.stage("umap") / "umap.npz"
        self.umap_plot = self.stage("umap") / "umap.png"
        self.job = self.path / "sweep-job.json"              # a sweep launcher's record of the run's job

    def __fspath__(self) -> str:  # a RunDir goes wherever a path does
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- where things are ------------------------------------------------------------------------

    def stage(self, name: str) -> Path:
        """RUN/<name>: a stage's folder (config, run log, checkpoints, results)."""
        return self.path / name

    def data(self, split: str) -> Path:
        """RUN/data/<split>: a dataset `train` recorded ("train" or "test")."""
        return self.path / "data" / split

    def config_path(self, stage: str) -> Path:
        return self.stage(stage) / "config.json"

    def run_config_path(self, stage: str) -> Path:
        """`train`'s record of a stage's config (written before the stage runs)."""
        return self.path / f"config.{stage}.json"

    def saved_configs(self) -> dict[str, list[Path]]:
        """stage -> its saved configs: `train`'s record (config.<stage>.json), then its own."""
        out: dict[str, list[Path]] = {}
        for path in sorted(self.path.glob("config.*.json")):
            out.setdefault(path.name.split(".")[1], []).append(path)
        for path in sorted(self.path.glob("*/config.json")):
            out.setdefault(path.parent.name, []).append(path)
        return out

    def metrics(self, stage: str) -> Path:
        """A stage's metrics, one JSON object per log line (runtime/runlog.py)."""
        return self.stage(stage) / "metrics.jsonl"

    def run_log(self, stage: str, *, enabled: bool = True) -> RunLog:
        """The run log a stage writes: its metrics file and TensorBoard events (RUN/<stage>/tb)."""
        return RunLog(self.metrics(stage), self.stage(stage) / "tb", stage, enabled=enabled)

    def read_metrics(self, stage: str) -> list[dict]:
        return read_metrics(self.metrics(stage))

    def decoder(self, labelled: int) -> Path:
        return self.stage("decode") / f"decoder-{labelled}.safetensors"

    def results(self, stage: str) -> Path:
        """results.json of decode or eval."""
        return self.stage(stage) / "results.json"

    def plot(self, name: str) -> Path:
        return self.path / f"{name}.png"

    def report(self, suffix: str) -> Path:
        """report.md or report.json."""
        return self.path / f"report.{suffix}"

    # -- what earlier stages made ----------------------------------------------------------------

    def has(self, stage: str) -> bool:
        """Whether a stage has started here (its config is saved)."""
        return self.config_path(stage).exists()

    def claim(self, stage: str | None = None, cfg=None, *, game: str | None = None, data=None,
              write: bool = True) -> None:
        """Checks that this run is of `game` and trained on `data` (a FrameDataset), and that `cfg`
        gives `stage` the model shapes it was trained with; records what the run did not know yet
        (unless write=False: other ranks). Raises ValueError naming both sides and the way out."""
        known = read_json(self.identity, {})
        holds = None if data is None else data.manifest.source.get("env")  # collected datasets know their game
        if game is not None and holds is not None and holds != game:
            raise ValueError(f"{data.dir} holds {holds} episodes, not {game}: pass a {game} dataset, or --env {holds}")
        game = game or holds
        asked = {"game": game, "data": None if data is None else {"identity": data.identity(), "path": str(data.dir)}}
        for key, value in asked.items():
            if value is None or known.get(key) is None:
                continue
            had, new = (known[key]["identity"], value["identity"]) if key == "data" else (known[key], value)
            if had != new:
                what = (f"the dataset {known[key]['path']} (manifest {had})", f"{value['path']} (manifest {new})") \
                    if key == "data" else (had, new)
                raise ValueError(f"{self.path} is a run of {what[0]}, not {what[1]}: "
                                 "use a new --out for that (or pass this run's own "
                                 f"--{'env' if key == 'game' else 'data'})")
        if stage is not None and cfg is not None and (self.has(stage) or self.latest_checkpoint(stage) is not None):
            saved = self.config(stage) if self.has(stage) else self._checkpoint_config(stage, cfg)
            for name in shape_settings(type(cfg)):
                if getattr(saved, name) != getattr(cfg, name):
                    raise ValueError(f"{self.stage(stage)} was trained with {name}={getattr(saved, name)!r}, this "
                                     f"run asks for {getattr(cfg, name)!r}: use a new --out (or the same setting)")
            self._check_resume(stage, saved, cfg)
        new_facts = {k: v for k, v in asked.items() if v is not None and known.get(k) is None}
        if write and new_facts:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.identity, {**known, **new_facts})

    def _check_resume(self, stage: str, saved, cfg) -> None:
        """A stage that has made progress (a checkpoint, or decode's results) continues only with
        the settings it was trained with, except those a resume can honour (config.resumable); and never
        asks for fewer steps than it has done. So its config.json always says what was run."""
        step = self.checkpoint_step(stage)
        if step < 0 and not self.results(stage).exists():
            return  # nothing trained yet: any settings start afresh
        if type(saved) is not type(cfg):
            raise ValueError(f"{self.stage(stage)} holds a {type(saved).__name__} run, this run asks for a "
                             f"{type(cfg).__name__}: use a new --out")
        old, new = dataclasses.asdict(saved), dataclasses.asdict(cfg)
        may_change = resumable(type(cfg))
        changed = [k for k in new if k not in may_change and old.get(k) != new[k]]
        if changed:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in changed)
            asks = ", ".join(f"{k}={new[k]!r}" for k in changed)
            raise ValueError(f"{self.stage(stage)} was trained with {was}; this run asks for {asks}. A stage resumes "
                             f"only with its own settings (those that may change: {', '.join(sorted(may_change))}): "
                             "rerun with the same settings, or use a new --out")
        planned = cfg.planned_steps()
        if planned is not None and step > planned:
            raise ValueError(f"{self.stage(stage)} has already trained {step:,} steps, more than the {planned:,} "
                             "these settings ask for: ask for at least as many, or use a new --out")

    @staticmethod
    def checkpoint_record(cfg) -> dict:
        """What a stage's checkpoints carry of its settings (config.json's payload), so that a resume
        is checked against them even when config.json is gone."""
        return {"settings": config_payload(cfg)}

    def _checkpoint_config(self, stage: str, cfg):
        """The settings the latest checkpoint of a stage was trained with (config.json is missing)."""
        last = self.latest_checkpoint(stage)
        settings = read_json(last / "state.json", {}).get("settings")
        if not isinstance(settings, dict):
            raise ValueError(f"{self.stage(stage)} has checkpoints but no config.json recording their settings: "
                             "restore config.json, or delete the folder to start that stage again")
        return from_saved(type(cfg), settings, last)

    def training_data(self, stage: str, cfg, data_dir, *, rank: int = 0):
        """The dataset a stage trains on (64x64x3 frames), claimed for this run (see claim): under
        DDP rank 0 writes the claim; how its frames are read is data.planner's choice."""
        from lapo_fast.data import FrameDataset
        from lapo_fast.envs.games import OBS_SHAPE
        from lapo_fast.runtime.distributed import barrier

        ds = FrameDataset(data_dir, frame_shape=OBS_SHAPE)
        self.claim(stage, cfg, data=ds, write=rank == 0)
        barrier()
        return ds

    def save_config(self, stage: str, cfg, **extra) -> None:
        self.stage(stage).mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_path(stage), **extra)

    def config(self, stage: str):
        """The typed config a stage of this run was trained with."""
        path = self.config_path(stage)
        if not path.exists():
            raise FileNotFoundError(f"{path.parent}: no {stage} run here (run `lapo-fast {command_of(stage)}` first)")
        return load_config(folder_config(stage), path)

    def latest_checkpoint(self, stage: str) -> Path | None:
        return latest_checkpoint(self.stage(stage))

    def checkpoint_step(self, stage: str) -> int:
        """The step of a stage's latest checkpoint, -1 when it has none."""
        last = self.latest_checkpoint(stage)
        return int(last.name.split("-")[1]) if last is not None else -1

    def _load(self, stage: str, model):
        last, _ = load_latest(self.stage(stage), model)
        if last is None:
            raise FileNotFoundError(f"{self.stage(stage)}: no checkpoint yet")
        return model.eval()

    def load_lam(self, cfg: LAMConfig | None = None):
        """The trained stage-1 model (its saved config unless one is given), in eval mode."""
        from lapo_fast.models.lam import build_lam

        cfg = cfg or self.config("lam")
        if cfg.fdm_action != "latent":
            raise ValueError(f"{self.stage('lam')}: trained with fdm_action={cfg.fdm_action!r} (the ablation without "
                             "an IDM); stages 2-3 need a stage 1 trained with fdm_action='latent'")
        return self._load("lam", build_lam(cfg))

    def load_policy(self, stage: str):
        """The latest policy of RUN/<stage> (bc, ppo, demo: a LatentPolicy; finetune: a
        DecodedPolicy), on the CPU, in eval mode."""
        from lapo_fast.models import DecodedPolicy, LatentPolicy

        cfg = self.config(stage)
        policy = LatentPolicy(impala_scale=cfg.impala_scale)
        return self._load(stage, DecodedPolicy(policy) if isinstance(cfg, FinetuneConfig) else policy)
