"""A training step -- forward under the stage's precision, backward, gradient clip, optimiser step,
schedule step -- run eagerly or as a CUDA graph: captured once, then replayed in one launch.

    step = TrainStep(loss_fn, params, optimizer, schedule, grad_clip=2.0, device=device, mode="graph")
    out = step({"obs": batch_obs, ...})      # loss_fn(inputs) -> {"loss": ..., other tensors}

At LAPO's batch (128) the step is host-bound: Python and ~hundreds of launches cost more than the
GPU's work, so the GPU waits unless the step is a graph. Modes:
- eager: what every stage ran before; the default.
- graph (CUDA): the first `warmup` steps run eagerly on a side stream (real steps: they also make
  the optimiser's state and cuBLAS/cuDNN's workspaces), the next is captured and every later one
  replays it. Inputs are copied into static buffers; the outputs are the same tensors each step
  (read them before the next call). The optimiser runs with capturable=True and its lr as a device
  tensor the schedule fills, so nothing in the step reads the device back. If capture fails the
  step says so in one line and runs eagerly from then on. (The selftest's StaticBuffers runs an
  eager step through the same buffers on a CPU: the plumbing gives eager's numbers.)
"""

from __future__ import annotations

import torch

from .distributed import autocast
from .optim import optimizer_step

MODES = ("eager", "graph")


def graph_mode(cuda_graphs: bool, device: torch.device, name: str) -> str:
    """The mode a stage's --cuda-graphs asks for, or a one-line error where it cannot run."""
    if not cuda_graphs:
        return "eager"
    if torch.device(device).type != "cuda":
        raise ValueError(f"{name}: --cuda-graphs needs a CUDA device, and this stage runs on {device}; "
                         "drop --cuda-graphs (or set cuda_graphs=false)")
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        print(f"{name}: CUDA graphs are not captured under DDP ({dist.get_world_size()} ranks) yet; running eagerly")
        return "eager"
    return "graph"


class TrainStep:
    """One optimiser step of `loss_fn` over `params` (see the module's docstring)."""

    def __init__(self, loss_fn, params, optimizer, schedule=None, *, grad_clip: float, device,
                 precision: str = "fp32", mode: str = "eager", warmup: int = 3, name: str = "step"):
        if mode not in MODES:
            raise ValueError(f"TrainStep: mode must be one of {MODES}, got {mode!r}")
        if mode == "graph" and torch.device(device).type != "cuda":
            raise ValueError(f"{name}: a CUDA graph needs a CUDA device, got {device}")
        self.loss_fn, self.params, self.optimizer, self.schedule = loss_fn, list(params), optimizer, schedule
        self.grad_clip, self.device, self.precision = grad_clip, torch.device(device), precision
        self.mode, self.warmup, self.name = mode, warmup, name
        self.steps = 0          # calls so far
        self.graph = None       # the captured step (graph mode)
        self._inputs: dict[str, torch.Tensor] | None = None   # static input buffers
        self._outputs: dict[str, torch.Tensor] | None = None  # static outputs
        _optimizer_for(optimizer, capturable=mode == "graph", device=self.device)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.steps += 1
        if self.mode == "eager":
            out = self._step(inputs)
        elif self.graph is not None:
            self._fill(inputs)
            self.graph.replay()
            out = self._outputs
        elif self.steps <= self.warmup:
            out = self._side_stream(inputs)
        else:
            out = self._capture(inputs)
        if self.schedule is not None:
            self.schedule.step()
        return out

    def _step(self, inputs: dict) -> dict:
        with autocast(self.device, self.precision, cache=self.mode == "eager"):
            out = dict(self.loss_fn(inputs))
        norm = optimizer_step(out["loss"], self.params, self.optimizer, None, self.grad_clip)
        if norm is not None:
            out["grad_norm"] = norm
        return out

    def _fill(self, inputs: dict) -> None:
        self._inputs = fill_static(self._inputs, inputs, self.name)

    def _side_stream(self, inputs: dict) -> dict:
        """An eager step on a side stream, as capture needs its warm-up steps to run."""
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self._step(inputs)
        main.wait_stream(side)
        return out

    def _capture(self, inputs: dict) -> dict:
        self._fill(inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.device)
            # thread_local: the loaders' threads (prefetch copies, DALI) keep working during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self._step(self._inputs)
        except Exception as e:  # noqa: BLE001 -- any failure to capture falls back to the eager step
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"{self.name}: CUDA graph capture failed ({type(e).__name__}: {first}); running eagerly")
            self.mode = "eager"
            torch.cuda.synchronize(self.device)
            _optimizer_for(self.optimizer, capturable=False, device=self.device)
            return self._step(inputs)
        self.graph, self._outputs = graph, {k: v for k, v in outputs.items()}
        graph.replay()  # capture records the step; this runs it
        return self._outputs


def fill_static(buffers: dict | None, inputs: dict, name: str) -> dict:
    """Copies a step's inputs into fixed buffers (a CUDA graph's; made from the first inputs), refusing
    other keys, shapes or dtypes: a graph replays what it captured. Returns the buffers."""
    if buffers is None:
        return {k: v.detach().clone() for k, v in inputs.items()}
    if inputs.keys() != buffers.keys():
        raise ValueError(f"{name}: a step's inputs changed from {sorted(buffers)} to {sorted(inputs)}")
    for k, v in inputs.items():
        buf = buffers[k]
        if v.shape != buf.shape or v.dtype != buf.dtype:
            raise ValueError(f"{name}: input {k!r} changed from {tuple(buf.shape)} {buf.dtype} to "
                             f"{tuple(v.shape)} {v.dtype}; a CUDA graph replays fixed shapes")
        buf.copy_(v, non_blocking=True)
    return buffers


def _optimizer_for(optimizer, *, capturable: bool, device: torch.device) -> None:
    """Makes an Adam/AdamW fit to be captured (capturable, lr a device tensor the schedule fills in
    place, step counts on the device) or plain (lr a float, step counts on the CPU). A checkpoint
    made in either mode resumes in the other."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if capturable:
            raise ValueError(f"CUDA graphs support Adam and AdamW, not {type(optimizer).__name__}")
        return
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        lr = group["lr"]
        if capturable and not isinstance(lr, torch.Tensor):
            group["lr"] = torch.tensor(float(lr), device=device)
        elif not capturable and isinstance(lr, torch.Tensor):
            group["lr"] = float(lr)
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.to(device if capturable else "cpu", torch.float32)
