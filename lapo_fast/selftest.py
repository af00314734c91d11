"""`lapo-fast selftest`: every path this device has, run once against an independent reference.

    lapo-fast selftest [--device cpu|cuda[:N]] [--json OUT] [--quick] [--compile]

One line per check: its name, what was compared, the largest error (or a ratio), the bound, and
ok / FAIL / skipped (with why); exit 1 on any FAIL. The checks call what training calls -- the VQ
op, the stages' step functions (stages/lam.py, bc.py, runtime/ppo.py), the loaders, the engine,
the process group -- and compare with what does not share their code: the PyTorch VQ reference,
the same steps on the CPU in fp32, the CPU decoder, procgen's own gym3 env. CUDA-only checks are
skipped on the CPU, each with its reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Check:
    name: str
    compared: str          # what was compared with what
    value: float | None = None   # the largest error, or a ratio
    bound: float | None = None   # the most `value` may be
    status: str = "ok"     # ok | FAIL | skipped
    note: str = ""         # why it was skipped, what failed, timings
    seconds: float = 0.0

    def line(self) -> str:
        value = "" if self.value is None else \
            f"{self.value:.3g}" + ("" if self.bound is None else f" <= {self.bound:.3g}")
        return f"{self.status:<7} {self.name:<40} {self.compared}" + (f": {value}" if value else "") + \
            (f" ({self.note})" if self.note else "")


def judged(name: str, compared: str, value: float, bound: float, note: str = "") -> Check:
    """A check that passes when value <= bound (a NaN fails)."""
    ok = value <= bound
    return Check(name, compared, float(value), float(bound), "ok" if ok else "FAIL", note)


def skipped(name: str, compared: str, why: str) -> Check:
    return Check(name, compared, status="skipped", note=why)


@dataclass
class Context:
    device: torch.device
    quick: bool
    compile: bool
    tmp: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn, reps: int) -> float:
        """Median seconds of fn() over reps calls (after one warm-up call)."""
        fn()
        times = []
        for _ in range(reps):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny), in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


# -- 1. the VQ op against the PyTorch reference ---------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VQ_RTOL = 1e-5   # loss, EMA state, gradients: fp32 accumulation in another order
TIE_RTOL = 1e-5  # a mismatched index is a near-tie when its distance is this close to the reference's


def _vq_run(x, state, case, training: bool, deterministic: bool, backend: str):
    from lapo_fast.ops import vq_ema

    _, layout, _, G, K, d, L = case
    state = [t.clone() for t in state]
    xi = x.clone().requires_grad_(training)
    out = vq_ema(xi, *state, layout=layout, num_latents=L, training=training, deterministic=deterministic,
                 backend=backend, decay=0.99)
    grad = None
    if training:
        weight = torch.linspace(-1, 1, xi.numel(), device=x.device).view_as(xi)  # a fixed upstream gradient
        ((out.quantized.float() * weight).sum() + out.loss).backward()
        grad = xi.grad
    return out, state, grad


def _near_ties(x, idx_ours, idx_ref, codebook, case) -> tuple[int, int]:
    """(indices that differ, of them near-ties): rows given another code whose squared distance is
    within TIE_RTOL of (|x|^2 + |c|^2) of the reference's code's (fp32 round-off in the expanded
    distance |x|^2 - 2 x.c + |c|^2 decides such a row either way)."""
    from lapo_fast.ops.vq_layout import Layout

    _, layout, _, G, K, d, L = case
    lay = Layout.for_shape(tuple(x.shape), G, d, layout, L)

    def groups(idx):  # (G, rows), in to_groups' row order
        return idx.reshape(-1, G).T if layout == "grouped" else idx.transpose(0, 1).reshape(G, -1)

    io, ir = groups(idx_ours).cpu(), groups(idx_ref).cpu()
    differ = io != ir
    if not differ.any():
        return 0, 0
    rows, cb = lay.to_groups(x.detach()).double().cpu(), codebook.double().cpu()
    co, cr = (torch.gather(cb, 1, i[..., None].expand(-1, -1, d)) for i in (io, ir))
    dist_o, dist_r = ((rows - co) ** 2).sum(-1), ((rows - cr) ** 2).sum(-1)
    scale = (rows ** 2).sum(-1) + torch.maximum((co ** 2).sum(-1), (cr ** 2).sum(-1))
    return int(differ.sum()), int((differ & ((dist_o - dist_r).abs() <= TIE_RTOL * scale)).sum())


def check_vq(ctx: Context):
    from lapo_fast.ops.vq_cases import SELFTEST_CASES

    from lapo_fast.ops import vq as vq_op

    cases = [c for c in SELFTEST_CASES if not (ctx.quick and c.B > 4096)]
    kernel, backend = ("Triton", "triton") if ctx.cuda else ("C++", "cpu")
    if not (vq_op._triton_available() if ctx.cuda else vq_op._cpu_kernel_available()):
        # "auto" would fall back to the reference and compare it with itself: the subject is missing.
        yield Check("vq kernels", f"the {kernel} VQ kernel", status="FAIL",
                    note=f"{'lapo_fast.kernels.vq (triton)' if ctx.cuda else 'lapo_fast._C'} does not import: "
                         "reinstall lapo-fast (the build of its extension failed, or triton is missing)")
        return
    for case in cases:
        name, layout, B, G, K, d, L = case
        gen = torch.Generator().manual_seed(B + K)
        x32 = torch.randn(B, G * d * L, generator=gen).to(ctx.device)
        codebook = torch.randn(G, K, d, generator=gen).to(ctx.device)
        state = (codebook, torch.rand(G, K, generator=gen).to(ctx.device), codebook.clone())
        modes = [("train", True, False), ("eval", False, False), ("train, deterministic", True, True)]
        for dname, dtype in DTYPES.items():
            x = x32.to(dtype)
            for mode, training, det in modes:
                if det and dname != "fp32":
                    continue
                t0 = time.perf_counter()
                ours, s_ours, g_ours = _vq_run(x, state, case, training, det, backend)
                ref, s_ref, g_ref = _vq_run(x, state, case, training, det, "reference")
                mismatched, ties = _near_ties(x, ours.indices, ref.indices, state[0], case)
                errs = {"loss": rel_err(ours.loss, ref.loss)}
                if not mismatched:  # with near-ties, q, the EMA state and gradients differ in those rows by design
                    errs["q"] = rel_err(ours.quantized, ref.quantized)
                    if training:
                        errs.update(codebook=rel_err(s_ours[0], s_ref[0]), ema_count=rel_err(s_ours[1], s_ref[1]),
                                    ema_weight=rel_err(s_ours[2], s_ref[2]), grad=rel_err(g_ours, g_ref))
                # q and the gradient come back in x's dtype: one rounding of it apart at most.
                bounds = {k: max(VQ_RTOL, torch.finfo(dtype).eps) if k in ("q", "grad") else VQ_RTOL for k in errs}
                worst = max(errs, key=lambda k: errs[k] / bounds[k])
                c = judged(f"vq {name} {dname} {mode}", f"{kernel} vs reference: indices, loss, q"
                           + (", EMA state, grad" if training else ""), errs[worst], bounds[worst], f"worst: {worst}"
                           + (f"; {ties} near-tie indices (state and grads not compared)" if ties else ""))
                if mismatched > ties:
                    c.status, c.note = "FAIL", f"{mismatched - ties} indices differ beyond near-ties; " + c.note
                c.seconds = time.perf_counter() - t0
                yield c
        yield _vq_timing(ctx, case, x32, state, backend)


def _vq_timing(ctx: Context, case, x, state, backend: str) -> Check:
    from lapo_fast.ops import vq_ema

    name, layout, B, G, K, d, L = case
    reps = 3 if ctx.quick else 10

    def run(backend):
        s = [t.clone() for t in state]
        return lambda: vq_ema(x, *s, layout=layout, num_latents=L, backend=backend)

    ours, ref = ctx.timed(run(backend), reps), ctx.timed(run("reference"), reps)
    note = f"ours {ours * 1e6:.0f} us, reference {ref * 1e6:.0f} us"
    if ctx.cuda:
        from lapo_fast.ops.gpus import gpu_named

        gpu = torch.cuda.get_device_name(ctx.device)
        bw = getattr(gpu_named(gpu), "bandwidth", None)
        moved = x.numel() * 4 * 2 + B * G * L * 8  # x read, q written, indices written
        note += (f", memory floor {moved / (0.9 * bw) * 1e6:.1f} us (90% of {bw / 1e12:.2f} TB/s)" if bw
                 else f", no bandwidth known for {gpu}")
    return Check(f"vq {name} timing", "training step, median: reference time / ours", ref / ours, None,
                 "ok", note)


# -- 2. CUDA graphs: the stages' step captured and replayed ---------------------------------------

def _lam_setup(preset: str, device, batch: int, overrides: dict | None = None):
    from lapo_fast.config import LAMConfig, resolve
    from lapo_fast.models import build_lam

    cfg = resolve(LAMConfig, preset, {"batch_size": batch, "device": str(device), **(overrides or {})})
    torch.manual_seed(0)
    model = build_lam(cfg).to(device)
    opt, schedule = cfg.optimizer(model.parameters())
    return cfg, model, opt, schedule


class StaticBuffers:
    """An eager TrainStep run through a CUDA graph's plumbing without the capture: its inputs copied
    into fixed buffers, its outputs copied out into fixed tensors (CPU stand-in for graph mode)."""

    def __init__(self, step):
        self.step, self.inputs, self.outputs = step, None, None

    def __call__(self, inputs: dict) -> dict:
        from lapo_fast.runtime.step import fill_static

        self.inputs = fill_static(self.inputs, inputs, self.step.name)
        out = {k: v.detach() for k, v in self.step(self.inputs).items()}
        if self.outputs is None:
            self.outputs = {k: v.clone() for k, v in out.items()}
        for k, v in out.items():
            self.outputs[k].copy_(v)
        return self.outputs


def _lam_losses(preset, device, batch, steps, mode="eager", overrides=None):
    """Stage 1's step (stages/lam.make_step) run `steps` times: (losses, model, seconds per step);
    mode "static": eager through StaticBuffers."""
    from lapo_fast.stages.lam import make_step

    cfg, model, opt, schedule = _lam_setup(preset, device, batch, overrides)
    model.train()
    step = make_step(model, model, opt, schedule, cfg, torch.device(device), "eager" if mode == "static" else mode)
    step = StaticBuffers(step) if mode == "static" else step
    gen = torch.Generator().manual_seed(0)
    windows = [{"obs": torch.randint(0, 256, (cfg.batch_size, cfg.context + 2, 64, 64, 3), dtype=torch.uint8,
                                     generator=gen)} for _ in range(steps)]
    losses, times = _timed_steps(step, windows, device)
    return losses, model, statistics.median(times[len(times) // 2:]), step


def _param_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(rel_err(sa[k].float(), sb[k].float()) for k in sa if sa[k].is_floating_point())


def check_graphs(ctx: Context):
    steps = 6
    if not ctx.cuda:
        # The graph mode's buffers without a capture: its inputs and outputs go through static
        # tensors as a replay's would; the numbers must be eager's.
        eager, m_eager, *_ = _lam_losses("smoke", "cpu", 8, steps)
        static, m_static, *_ = _lam_losses("smoke", "cpu", 8, steps, mode="static")
        yield judged("graphs static buffers", "stage-1 step through static buffers vs eager (CPU): losses, params",
                     max(rel_err(static, eager), _param_err(m_static, m_eager)), 1e-6)
        yield skipped("graphs capture", "stage-1 step captured and replayed vs eager", "CUDA graphs need a CUDA device")
        return
    eager, t_eager, _ = _vq_step_losses(ctx.device, steps + 14)
    again, *_ = _vq_step_losses(ctx.device, steps + 14)
    graph, t_graph, step = _vq_step_losses(ctx.device, steps + 14, mode="graph")
    yield _graph_row("graphs VQ step", "linear -> VQ (LAPO shape, B=128) -> loss, AdamW", eager, again, graph,
                     t_eager, t_graph, step)
    eager, _, t_eager, _ = _lam_losses("paper", ctx.device, 128, steps + 14)
    again, *_ = _lam_losses("paper", ctx.device, 128, steps + 14)
    graph, _, t_graph, step = _lam_losses("paper", ctx.device, 128, steps + 14, mode="graph")
    yield _graph_row("graphs stage-1 step", "paper LAM (IDM + FDM + VQ + AdamW), B=128", eager, again, graph, t_eager,
                     t_graph, step)


def _graph_row(name, what, eager, again, graph, t_eager, t_graph, step) -> Check:
    """Replayed losses vs eager ones, within 1e-4 or 10x what two eager runs differ by (the VQ's
    float atomics and cuDNN's backward sum in any order: round-off, not bits)."""
    if step.mode != "graph":
        return Check(name, f"{what}: captured vs eager", status="FAIL", note="capture failed (the line above says why)")
    noise = rel_err(again, eager)
    return judged(name, f"{what}, {len(eager)} steps, replayed vs eager: losses", rel_err(graph, eager),
                  max(1e-4, 10 * noise), f"eager vs eager {noise:.2g}; eager {t_eager * 1e3:.3f} ms/step, "
                  f"graph {t_graph * 1e3:.3f} ms/step ({t_eager / t_graph:.2f}x)")


def _vq_step_losses(device, steps: int, mode: str = "eager"):
    """A VQ training step (runtime.step.TrainStep around a linear layer and VectorQuantizerEMA):
    (losses, median seconds per step of the second half, the step)."""
    from lapo_fast.ops import VectorQuantizerEMA
    from lapo_fast.runtime.step import TrainStep

    torch.manual_seed(0)
    proj, vq = torch.nn.Linear(128, 128).to(device), VectorQuantizerEMA().to(device)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-3)

    def loss_fn(inputs):
        out = vq(proj(inputs["x"]))
        return {"loss": (out.quantized - inputs["x"]).pow(2).mean() + out.loss}

    step = TrainStep(loss_fn, proj.parameters(), opt, grad_clip=1.0, device=torch.device(device), mode=mode, name="vq")
    gen = torch.Generator().manual_seed(0)
    losses, times = _timed_steps(step, [{"x": torch.randn(128, 128, generator=gen)} for _ in range(steps)], device)
    return losses, statistics.median(times[steps // 2:]), step


def _timed_steps(step, batches: list[dict], device) -> tuple[torch.Tensor, list[float]]:
    """A training step run on each batch (moved to `device`): the losses, and each step's seconds
    with the device synchronised around it."""
    cuda = torch.device(device).type == "cuda"
    losses, times = [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        losses.append(step(batch)["loss"].detach().clone())
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return torch.stack(losses), times


# -- 3. the stages at paper sizes, on the device against the CPU in fp32 --------------------------

def _bc_losses(device, batch, steps, precision="fp32"):
    from lapo_fast.config import BCConfig, resolve
    from lapo_fast.models import LatentPolicy
    from lapo_fast.stages.bc import make_step

    cfg = resolve(BCConfig, "paper", {"batch_size": batch, "precision": precision})
    torch.manual_seed(0)
    policy = LatentPolicy(impala_scale=cfg.impala_scale).to(device).to(memory_format=torch.channels_last)
    opt, schedule = cfg.optimizer(policy.parameters())
    step = make_step(policy, policy, opt, schedule, cfg, torch.device(device))
    gen = torch.Generator().manual_seed(1)
    batches = [{"obs": torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8, generator=gen),
                "target": torch.randn(batch, 128, generator=gen)} for _ in range(steps)]
    losses, times = _timed_steps(step, batches, device)
    return losses, policy, statistics.median(times)


def _ppo_losses(device, batch, steps, precision="fp32"):
    """Stage 3b's minibatch update (runtime/ppo.make_ppo_step on a DecodedPolicy, the stored-features path)."""
    from lapo_fast.config import FinetuneConfig, resolve
    from lapo_fast.models import DecodedPolicy, LatentPolicy
    from lapo_fast.runtime.ppo import make_ppo_step

    cfg = resolve(FinetuneConfig, "paper", {"precision": precision, "reference_clip": False})
    torch.manual_seed(0)
    policy = DecodedPolicy(LatentPolicy(impala_scale=cfg.impala_scale)).to(device)
    with torch.no_grad():
        policy.action_head.weight.normal_(0, 0.1)  # non-zero, so every trained layer has a gradient
    groups = [policy.action_head, policy.value_head, policy.fc_rl]
    params = [p for m in groups for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.head_lr * 0.1, eps=cfg.adam_eps)
    step = make_ppo_step(policy, opt, params, cfg, torch.device(device), features=lambda f: f)
    gen = torch.Generator().manual_seed(2)
    batches = [{"obs": torch.randn(batch, policy.fc_rl.in_features, generator=gen).relu(),
                "actions": torch.randint(0, 15, (batch,), generator=gen),
                "old_logp": -torch.rand(batch, generator=gen) - 2, "adv": torch.randn(batch, generator=gen),
                "ret": torch.randn(batch, generator=gen), "old_value": torch.randn(batch, generator=gen)}
               for _ in range(steps)]
    losses, times = _timed_steps(step, batches, device)
    return losses, policy, statistics.median(times)


# Bounds after a few AdamW steps, device vs CPU fp32: cuDNN's TF32 convolutions (PyTorch's default,
# as the reference code ran) alone move a loss ~1e-3; bf16 autocast ~1e-2.
STAGE_BOUNDS = {"fp32": 5e-3, "bf16": 5e-2}


def check_stages(ctx: Context):
    steps = 3
    batch = 8 if ctx.quick or not ctx.cuda else 32
    runs = {"stage 1 (lam)": lambda dev, prec: _lam_losses("paper", dev, batch, steps,
                                                           overrides={"precision": prec})[:3],
            "stage 2 (bc)": lambda dev, prec: _bc_losses(dev, batch, steps, prec),
            "stage 3b update": lambda dev, prec: _ppo_losses(dev, 4 * batch, steps, prec)}
    for name, run in runs.items():
        t0 = time.perf_counter()
        cpu_loss, cpu_model, cpu_t = run("cpu", "fp32")
        samples = (4 if "3b" in name else 1) * batch / cpu_t
        for prec in ("fp32", "bf16"):
            if not ctx.cuda and prec == "fp32":
                yield skipped(f"{name} {prec}", f"paper size, {steps} steps on the device vs the CPU in fp32",
                              f"the device is the CPU; fp32 there runs at {samples:.0f} samples/s")
                continue
            loss, model, t = run(ctx.device, prec)
            err = max(rel_err(loss, cpu_loss), _param_err(model.cpu(), cpu_model)) if prec == "fp32" \
                else rel_err(loss, cpu_loss)
            c = judged(f"{name} {prec}", f"paper size, {steps} steps on {ctx.device} vs the CPU in fp32: losses"
                       + (", params" if prec == "fp32" else ""), err, STAGE_BOUNDS[prec],
                       f"{(4 if '3b' in name else 1) * batch / t:.0f} samples/s at batch {batch}")
            c.seconds = time.perf_counter() - t0
            yield c


def check_compile(ctx: Context):
    compared = "stage-1 step with lam.compile (IDM, VQ op and FDM torch.compile'd) vs eager: losses"
    if not ctx.cuda and not ctx.compile:
        yield skipped("compile stage-1 step", compared, "compiling takes ~80 s on 2 CPU cores: add --compile")
        return
    if ctx.quick and not ctx.compile:
        yield skipped("compile stage-1 step", compared, "--quick")
        return
    eager, *_ = _lam_losses("smoke", ctx.device, 32, 4)
    t = time.perf_counter()
    compiled, _, t_step, _ = _lam_losses("smoke", ctx.device, 32, 4, overrides={"compile": True})
    yield judged("compile stage-1 step", compared, rel_err(compiled, eager), 1e-3,
                 f"compiled in {time.perf_counter() - t:.0f} s")


# -- 4. data: the loaders and decoders against the CPU decoder ------------------------------------

def _dataset(root: Path, codec: str = "lz4"):
    from lapo_fast.data import DatasetWriter, FrameDataset

    rng = np.random.default_rng(0)
    with DatasetWriter(root, codec=codec, chunk_frames=16) as w:
        for e in range(6):
            n = int(rng.integers(10, 60))
            w.add_episode(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), action=rng.integers(0, 15, n))
    return FrameDataset(root)


def _dali_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("nvidia.dali") is None:
        return "nvidia-dali is not installed: pip install 'lapo-fast[dali]'"
    return None


def check_data(ctx: Context):
    from lapo_fast.data import CompressedFrames, WindowSampler
    from lapo_fast.data.loader import host_or_device_loader

    ds = _dataset(ctx.tmp / "lz4")
    cache = np.asarray(ds.cache())
    for codec in ("lz4", "zstd"):
        d = ds if codec == "lz4" else _dataset(ctx.tmp / codec, codec)
        sampler = WindowSampler(CompressedFrames(d), d.episodes, batch_size=32, seed=3)
        ref = WindowSampler(cache, ds.episodes, batch_size=32, seed=3)
        loader = host_or_device_loader(sampler, ctx.device)  # prefetching, into pinned memory on CUDA
        bad = _differing_bytes(loader, ref)
        yield judged(f"data {codec} prefetch loader", "windows decoded by CPU threads"
                     + (", pinned, copied to the GPU" if ctx.cuda else "") + " vs the decoded cache: differing bytes",
                     bad, 0)
    why = _dali_missing() if ctx.cuda else None
    if not ctx.cuda or why:
        yield skipped("data DALI inflate", "windows inflated by DALI (nvCOMP LZ4) vs the CPU decoder",
                      why or "DALI inflates on GPUs (its CPU backend runs in the tests)")
        yield skipped("data NVDEC ingest", "a generated VP9 video decoded by NVDEC vs PyAV",
                      why or "NVDEC is a GPU's")
        return
    from lapo_fast.data import DaliDecodeLoader

    index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
    loader = DaliDecodeLoader(WindowSampler(CompressedFrames(ds), ds.episodes, batch_size=32, seed=3),
                              CompressedFrames(ds), device_id=index)
    bad = _differing_bytes(loader, WindowSampler(cache, ds.episodes, batch_size=32, seed=3))
    yield judged("data DALI inflate", "windows inflated by DALI (nvCOMP LZ4) vs the CPU decoder: differing bytes",
                 bad, 0)
    yield _nvdec_check(ctx)


def _differing_bytes(loader, ref, batches: int = 4) -> int:
    """Bytes in which a loader's first batches differ from the reference sampler's (then closes it)."""
    bad = 0
    try:
        for _ in range(batches):
            bad += int((next(loader)["obs"].cpu().numpy() != ref.sample()["obs"]).sum())
    finally:
        loader.close()
    return bad


def write_bar_clip(path: Path, *, frames: int, step: int) -> Path:
    """A 128x96 VP9 clip (NVDEC's codec, and DALI's CPU backend's) of a white bar growing `step`
    pixels a frame: flat colours, which a codec keeps within a level or two."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9", rate=15)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i in range(frames):
            img = np.zeros((96, 128, 3), np.uint8)
            img[:, : step * (i + 1)] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _nvdec_check(ctx: Context) -> Check:
    from lapo_fast.data import FrameDataset, ingest_videos

    video = write_bar_clip(ctx.tmp / "clip.webm", frames=24, step=5)
    a = FrameDataset(ingest_videos([video], ctx.tmp / "nvdec", decoder="dali", progress=False))
    b = FrameDataset(ingest_videos([video], ctx.tmp / "pyav", decoder="pyav", progress=False))
    fa, fb = np.asarray(a.cache()).astype(int), np.asarray(b.cache()).astype(int)
    if fa.shape != fb.shape:
        return Check("data NVDEC ingest", "NVDEC vs PyAV frames", status="FAIL",
                     note=f"{fa.shape[0]} frames from NVDEC, {fb.shape[0]} from PyAV")
    return judged("data NVDEC ingest", "a generated VP9 video decoded by NVDEC vs PyAV: max level difference",
                  np.abs(fa - fb).max(), 2)


# -- 5. the engine against procgen's gym3 env -------------------------------------------------------

def check_engine(ctx: Context):
    from lapo_fast.envs import ProcgenVecEnv

    try:
        import procgen
    except ImportError as e:
        yield skipped("engine vs gym3", "ProcgenVecEnv vs procgen's ProcgenGym3Env", f"procgen not importable ({e})")
        return
    from lapo_fast.envs.games import DEFAULT_DISTRIBUTION_MODE as mode

    env = ProcgenVecEnv("starpilot", 8, seed=5, distribution_mode=mode, pin_memory=ctx.cuda)
    twins = [procgen.ProcgenGym3Env(num=n, env_name=g, rand_seed=s, distribution_mode=mode)
             for g, n, s in zip(env.instance_games, env.instance_sizes, env.instance_seeds)]
    env.reset()
    rng = np.random.default_rng(0)
    bad = 0
    try:
        for t in range(24):
            parts = [tw.observe() for tw in twins]
            obs = env.obs_to(ctx.device).cpu().numpy()
            theirs = np.concatenate([p[1]["rgb"] for p in parts])
            bad += int((obs != theirs).sum())
            actions = rng.integers(0, 15, env.num_envs)
            _, reward, *_ = env.step(actions)
            i = 0
            for tw in twins:
                tw.act(actions[i:i + tw.num])
                i += tw.num
            their_reward = np.concatenate([tw.observe()[0] for tw in twins])
            bad += int((np.asarray(reward) != their_reward).sum())
    finally:
        env.close()
    yield judged("engine vs gym3", "ProcgenVecEnv (starpilot, 8 envs, 24 steps" + (", pinned obs on the GPU" if ctx.cuda
                 else "") + ") vs procgen's gym3 env: differing bytes and rewards", bad, 0)


# -- 6. a process group: the VQ statistics all-reduced ---------------------------------------------

@contextlib.contextmanager
def _one_rank_group(ctx: Context):
    import torch.distributed as dist

    backend = "nccl" if ctx.cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{ctx.tmp / 'pg'}", rank=0, world_size=1,
                            **({"device_id": ctx.device} if ctx.cuda else {}))
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def check_distributed(ctx: Context):
    import torch.distributed as dist

    from lapo_fast.ops import VectorQuantizerEMA

    if dist.is_initialized():
        yield skipped("distributed VQ all-reduce", "one-rank group", "a process group already exists")
        return
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(sync="always").to(ctx.device)  # "auto" skips the reduction for one rank
    x = torch.randn(256, 128, device=ctx.device)
    alone = copy.deepcopy(vq)
    alone.sync = "never"
    want = alone(x)

    with _one_rank_group(ctx) as backend:
        got = vq(x)
    err = max(rel_err(got.quantized, want.quantized), rel_err(vq.codebook, alone.codebook),
              rel_err(vq.ema_count, alone.ema_count), rel_err(got.loss, want.loss))
    yield judged("distributed VQ all-reduce", f"VQ step with its statistics all-reduced over a one-rank {backend} "
                 "group vs alone: q, codebook, counts, loss", err, 1e-6)


CHECKS = (check_vq, check_graphs, check_stages, check_compile, check_data, check_engine, check_distributed)


# -- 7. what the machine is --------------------------------------------------------------------------

def facts(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
           "dali": next((version(p) for p in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
                         if version(p)), None),
           "lapo_fast": version("lapo-fast"), "cpu": platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   driver=_driver_version())
    return out


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def run(device: str = "", *, quick: bool = False, compile: bool = False, json_out: str | None = None,
        checks=None, echo=print) -> list[Check]:
    """Runs the checks, printing each line as it is known; writes the JSON if asked."""
    from lapo_fast.extras import extra_of
    from lapo_fast.runtime.distributed import device as pick_device

    dev = pick_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"selftest: --device {device}: it checks cpu or cuda (cuda:N) devices")
    if json_out and not os.access(Path(json_out).resolve().parent, os.W_OK):
        raise ValueError(f"selftest: --json {json_out}: its folder does not exist or is not writable (checked before "
                         "the checks run, so that their results are not lost)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    info = facts(dev)
    echo("selftest: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None))
    rows: list[Check] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lapo-fast-selftest-") as tmp:
        ctx = Context(dev, quick, compile, Path(tmp))
        for check in checks or CHECKS:
            t0 = time.perf_counter()
            try:
                for row in check(ctx):
                    row.seconds = row.seconds or time.perf_counter() - t0
                    rows.append(row)
                    echo(row.line())
                    t0 = time.perf_counter()
            except ModuleNotFoundError as e:
                if extra_of(e) is None:  # one of ours (the C++ extension) missing: the subject of the check
                    row = Check(check.__name__.removeprefix("check_"), "ran to the end", status="FAIL",
                                note=f"{e.name} does not import: reinstall lapo-fast (its extension failed to build)")
                    rows.append(row)
                    echo(row.line())
                    continue
                row = skipped(check.__name__.removeprefix("check_"), "the rest of this check",
                              f"{e.name} is not installed: pip install 'lapo-fast[{extra_of(e)}]'")
                rows.append(row)
                echo(row.line())
            except Exception as e:  # noqa: BLE001 -- a check that crashes is a FAIL, and the others still run
                row = Check(check.__name__.removeprefix("check_"), "ran to the end", status="FAIL",
                            note=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                rows.append(row)
                echo(row.line())
    failed = sum(r.status == "FAIL" for r in rows)
    total = time.perf_counter() - start
    echo(f"selftest: {sum(r.status == 'ok' for r in rows)} ok, {failed} FAIL, "
         f"{sum(r.status == 'skipped' for r in rows)} skipped in {total:.0f} s")
    if json_out:
        from lapo_fast.runtime.files import write_json

        write_json(Path(json_out), {"facts": info, "quick": quick, "seconds": total, "failed": failed,
                                    "checks": [_json_row(r) for r in rows]})
    return rows


def _json_row(row: Check) -> dict:
    """A row for JSON, where NaN/inf are not numbers: null."""
    out = dataclasses.asdict(row)
    for k in ("value", "bound"):
        if out[k] is not None and not math.isfinite(out[k]):
            out[k] = None
    return out
