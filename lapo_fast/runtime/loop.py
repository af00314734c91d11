"""The supervised stages' loop (1 and 2): a batch, a training step, its scalars kept on the device;
a log line every log_every steps, a checkpoint every checkpoint_every (never of weights a NaN step
has touched). The progress bar and the loader are closed however the loop ends (done, an error,
Ctrl-C): nothing is left to an exit hook."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable

from . import distributed
from .metrics import StepMeans
from .optim import divergence_error


def supervised_loop(stage: str, cfg, *, step: int, train_step: Callable[[dict], dict], loader, names: tuple[str, ...],
                    schedule, log, save: Callable[[int], object], out, batch_size: int, world: int = 1,
                    rank: int = 0, progress: bool = True, log_first: bool = False,
                    extra: Callable[[int, dict], dict] | None = None,
                    checkpointed: Callable[[int, object], None] | None = None) -> int:
    """Runs `train_step` from `step` to cfg.steps; returns the step reached. `names`: the step's
    outputs averaged into each log line (the first is the loss whose NaN stops the run);
    `extra(step, outputs)`: more metrics for a log line; `save(step)`: a checkpoint (called on every
    rank), then `checkpointed(step, saved)`."""
    from tqdm import tqdm

    means = StepMeans(*names)
    t0, start = time.perf_counter(), step
    with contextlib.ExitStack() as cleanup:
        interrupted = cleanup.enter_context(_ctrl_c())
        cleanup.callback(loader.close)
        bar = tqdm(total=cfg.steps, initial=step, disable=not progress or rank > 0, desc=stage.split()[-1].strip("()"),
                   unit="step")
        cleanup.callback(bar.close)
        while step < cfg.steps:
            if interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt was swallowed (raised inside a finalizer)
                raise KeyboardInterrupt
            outputs = train_step(next(loader))
            means.add(*(outputs[k] for k in names))  # on the device: no host read per step
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps or (log_first and step == 1):
                metrics = means.read()  # the means since the last log: the one host read of the losses
                if not math.isfinite(metrics[names[0]]):
                    raise divergence_error(stage, step, cfg, out)
                rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
                metrics = {"step": step, **metrics, "lr": float(schedule.get_last_lr()[0]), "steps_per_s": rate,
                           "samples_per_s": rate * batch_size * world}
                if extra is not None:
                    metrics.update(extra(step, outputs))
                log.log(metrics)
                bar.set_postfix({k: f"{metrics[k]:.4f}" for k in names[:2]})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                if not means.finite():  # never save weights a NaN step has touched (a NaN VQ input on CUDA)
                    raise divergence_error(stage, step, cfg, out)
                saved = save(step)
                if checkpointed is not None:
                    checkpointed(step, saved)
                distributed.barrier()
    return step


@contextlib.contextmanager
def _ctrl_c():
    """Within the block, Ctrl-C is also remembered: Python raises its KeyboardInterrupt wherever
    the main thread happens to be, and one raised inside a finalizer (a __del__) is printed and
    dropped; the loop then raises it at its next step. Only in the main thread (where signals land)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    if previous == signal.SIG_IGN:  # Ctrl-C is ignored here (a background job): leave it so
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
