"""Fused EMA vector quantisation: one op, three backends.

    out = vq_ema(x, codebook, ema_count, ema_weight, layout="lapo", num_latents=4)
    out.quantized, out.indices, out.loss, out.perplexity

Backends (``backend=``): "triton" (CUDA tensors; also CPU tensors under TRITON_INTERPRET=1),
"cpu" (the C++ kernel in lapo_fast._C, AVX2 + threads), "reference" (pure PyTorch, the
specification: lapo_fast/ops/vq_reference.py). "auto" picks triton on CUDA, cpu on CPU.

Semantics are the reference LAPO code's (see vq_reference.py): argmin on the codebook before the
update, straight-through gradient, commitment loss, EMA counts with Laplace smoothing. All
accumulation is fp32 whatever the input dtype (bf16/fp16 accepted, e.g. under autocast; fp64 is
searched as fp32 and q returned in fp64); the codebook state is always fp32.

NaN policy: NaN or inf anywhere in x, or finite x so large that a row's squared distance to its
code overflows float32 (|x| from ~1e19), leaves the codebook state untouched, and a step never reads
the device back to find out. On CPU tensors (the C++ kernel, the reference, the Triton
interpreter) it is found for free and raises NonFiniteError at once (under DDP after the ranks
have agreed, so every rank raises at the same step). On CUDA the EMA update is skipped on the
device and the returned loss is NaN: the caller's next read of the loss (a training loop's log or
checkpoint step) sees it. ``raise_nonfinite=True`` reads the flag back and raises at once (one
host sync per call); ``check_finite=False`` turns the guard off on CUDA: non-finite values then
count as 0 and the update goes ahead (the CPU kernel finds them anyway and raises).

DDP: when torch.distributed is initialised with more than one rank (``sync="auto"``), the batch
counts and sums are all-reduced before the EMA update, so every rank ends with the codebook one
process would get on the joined batch. Dead-code refills and k-means init are broadcast from rank 0.

The Triton backend: triton_plan(shape, GPU) picks a plan (its `kind`: "resident", "gemm" or
"general", and tiles from the GPU's entry in TARGETS); _allocate makes the outputs and
accumulators; LAUNCHERS[plan.kind] launches the search with its arguments by name
(_Launch.search_args);
_finish reduces (DDP), finalizes and updates the EMA state.

Adding a kernel variant or a target (the places it touches):
- a target (a new GPU generation): its row in TARGETS (tiles per x dtype, TF32), chosen with
  `python benchmarks/vq_kernel.py --compile-only --arch N` (add its Gpu facts in
  benchmarks/vq_compile.py's GPUS); an unlisted GPU is an error naming backend='reference';
- a search variant: the @triton.jit kernel in lapo_fast/kernels/vq.py; its `kind` in triton_plan
  (when it is chosen) and its launcher in LAUNCHERS; its name in benchmarks/vq_compile.py's KERNELS
  (so the compile check covers it) and its cost in that file's model; tests/test_vq.py's shapes
  that reach it (fused vs reference under the interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from lapo_fast.machine import available_cpus

from .vq_layout import Layout
from .vq_reference import perplexity_of, vq_ema_reference


class VQOutput(NamedTuple):
    quantized: torch.Tensor   # like x, straight-through gradient
    indices: torch.Tensor     # int64, (..., G) grouped or (B, G, L) lapo
    loss: torch.Tensor        # commitment * mse(x, q), scalar
    perplexity: torch.Tensor  # summed over groups, scalar


class _Spec(NamedTuple):  # a NamedTuple: built on every call, and ~4x cheaper than a dataclass
    layout: Layout
    training: bool
    decay: float
    eps: float
    commitment: float
    deterministic: bool
    check_finite: bool
    raise_nonfinite: bool
    num_threads: int


BACKENDS = ("auto", "triton", "cpu", "reference")
_CORES = available_cpus()


def vq_ema(
    x: torch.Tensor,
    codebook: torch.Tensor,
    ema_count: torch.Tensor,
    ema_weight: torch.Tensor,
    *,
    layout: str = "grouped",
    num_latents: int = 1,
    training: bool = True,
    decay: float = 0.999,
    eps: float = 1e-5,
    commitment: float = 0.05,
    backend: str = "auto",
    deterministic: bool = False,
    check_finite: bool = True,
    raise_nonfinite: bool | None = None,
    num_threads: int | None = None,
    sync: str = "auto",
) -> VQOutput:
    """EMA vector quantisation of x against G codebooks (G, K, d); updates the state if training.
    sync: "auto" sums the batch statistics over torch.distributed's ranks when there are two or
    more, "always" in any initialised group (one rank too), "never": each rank its own codebook."""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        raise NotImplementedError("vq_ema: not supported under torch.func transforms (vmap, grad, jacrev): it updates "
                                  "its EMA state in place; call it on a whole batch, and torch.autograd for gradients")
    G, K, d = _check_state(codebook, ema_count, ema_weight)
    if not torch.is_floating_point(x):
        raise TypeError(f"vq_ema: x must be floating point, got {x.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"vq_ema: x is on {x.device} but the codebook is on {codebook.device}")
    _check_scalars(decay, eps, commitment)
    lay = Layout.for_shape(tuple(x.shape), G, d, layout, num_latents)
    if x.numel() == 0:
        raise ValueError(f"vq_ema: x of shape {tuple(x.shape)} holds no latents; pass at least one row")
    if x.dtype == torch.float64:  # searched and accumulated in fp32 like every input; q returned in fp64
        out = vq_ema(x.float(), codebook, ema_count, ema_weight, layout=layout, num_latents=num_latents,
                     training=training, decay=decay, eps=eps, commitment=commitment, backend=backend,
                     deterministic=deterministic, check_finite=check_finite, raise_nonfinite=raise_nonfinite,
                     num_threads=num_threads, sync=sync)
        return out._replace(quantized=out.quantized.double())
    backend = _resolve_backend(backend, x)
    reduce = _all_reduce_fn(sync) if training else None

    raise_nonfinite = (not x.is_cuda) if raise_nonfinite is None else raise_nonfinite
    if torch.compiler.is_compiling():  # one opaque op for the compiler (eager keeps the cheaper path below)
        options = _OpOptions(layout, num_latents, training, float(decay), float(eps), float(commitment), backend,
                             deterministic, check_finite, raise_nonfinite, num_threads or _CORES, sync)
        return VQOutput(*_CompiledVQ.apply(x, codebook, ema_count, ema_weight, options))
    if backend == "reference":
        return _reference_forward(x, (codebook, ema_count, ema_weight), lay, reduce, check_finite,
                                  raise_nonfinite, training=training, decay=decay, eps=eps,
                                  commitment=commitment)

    spec = _Spec(lay, training, float(decay), float(eps), float(commitment), deterministic,
                 check_finite, raise_nonfinite, num_threads or _CORES)
    state = (codebook, ema_count, ema_weight)
    if x.requires_grad and torch.is_grad_enabled():
        q, idx, loss, perp = _VQFunction.apply(x, spec, backend, reduce, *state)
    else:
        q, idx, loss, perp = _fused_forward(x, spec, backend, reduce, *state)
    return VQOutput(q, idx, loss, perp)


_NONFINITE = ("vq_ema: input latents contain NaN or inf (or values so large their distances overflow float32); "
              "the codebook was not updated")


class NonFiniteError(ValueError):
    """NaN or inf in the latents given to the VQ (the codebook is left untouched); a training loop
    catches it to say that its model diverged."""

    def __init__(self, message: str = _NONFINITE):
        super().__init__(message)


def _check_scalars(decay: float, eps: float, commitment: float) -> None:
    """The op's settings, once, by name: eps 0 on a fresh state divides a never-used code by 0, and a
    NaN setting turns every code NaN; neither would raise later."""
    if not 0.0 <= decay < 1.0:  # (a NaN fails every comparison)
        raise ValueError(f"vq_ema: decay must be in [0, 1), got {decay}")
    if not 0.0 < eps < float("inf"):
        raise ValueError(f"vq_ema: eps must be a positive finite number (Laplace smoothing of the counts), got {eps}")
    if not 0.0 <= commitment < float("inf"):
        raise ValueError(f"vq_ema: commitment must be a finite number >= 0, got {commitment}")


def _check_state(codebook, ema_count, ema_weight):
    if codebook.dim() != 3:
        raise ValueError(f"vq_ema: codebook must be (groups, codes, dim), got {tuple(codebook.shape)}")
    G, K, d = codebook.shape
    # One cheap combined test on the hot path; the per-tensor messages only when it fails.
    if (codebook.dtype == ema_count.dtype == ema_weight.dtype == torch.float32
            and ema_count.shape == (G, K) and ema_weight.shape == (G, K, d)
            and codebook.is_contiguous() and ema_count.is_contiguous() and ema_weight.is_contiguous()
            and codebook.device == ema_count.device == ema_weight.device
            and not (codebook.requires_grad or ema_count.requires_grad or ema_weight.requires_grad)):
        return G, K, d
    expected = (("codebook", codebook, (G, K, d)), ("ema_count", ema_count, (G, K)),
                ("ema_weight", ema_weight, (G, K, d)))
    for name, t, shape in expected:
        if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"vq_ema: {name} must be a contiguous float32 tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device != codebook.device:
            raise ValueError(f"vq_ema: {name} is on {t.device}, codebook on {codebook.device}")
        if t.requires_grad:
            raise ValueError(f"vq_ema: {name} requires grad, but the codebook learns by EMA, not by gradient: "
                             "pass a buffer (register_buffer) or a detached tensor")
    raise AssertionError("unreachable")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"vq_ema: unknown backend {backend!r}; choose from {BACKENDS}")
    if x.device.type == "meta":
        raise NotImplementedError("vq_ema: meta tensors are not supported (torch.compile traces the op with its "
                                  "fake implementation; call it on cpu or cuda tensors)")
    if backend == "auto":
        if x.is_cuda:
            return "triton" if _triton_available() else "reference"
        if x.device.type == "cpu":
            return "cpu" if _cpu_kernel_available() else "reference"
        return "reference"
    if backend == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("vq_ema: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"vq_ema: the cpu backend needs CPU tensors, got {x.device}")
    return backend


@functools.cache
def _triton_available() -> bool:
    try:
        import lapo_fast.kernels.vq  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _cpu_kernel_available() -> bool:
    try:
        from lapo_fast import _C  # noqa: F401
    except ImportError:
        return False
    return True


SYNCS = ("auto", "always", "never")


def _all_reduce_fn(sync: str = "auto"):
    """The function that sums the batch statistics over the ranks in place (sum_over_ranks), or None
    where they stay this rank's: see vq_ema's `sync`."""
    if sync not in SYNCS:
        raise ValueError(f"vq_ema: sync must be one of {SYNCS}, got {sync!r}")
    if sync == "never" or not (dist.is_available() and dist.is_initialized()):
        return None
    return sum_over_ranks if sync == "always" or dist.get_world_size() > 1 else None


def sum_over_ranks(*tensors):
    """Each tensor (None passes through) summed over the process group's ranks, in place."""
    for t in tensors:
        if t is not None:
            dist.all_reduce(t)
    return tensors


def _reference_forward(x, state, lay, reduce, check_finite, raise_nonfinite, **kw):
    """The PyTorch reference, with the op's NaN policy and in fp32 even under autocast."""
    bad = None
    if check_finite:
        bad = (~torch.isfinite(x)).sum().float().reshape(1)  # on x's device: no host read
        if reduce is not None:
            reduce(bad)
        if raise_nonfinite and bad.item() > 0:
            raise NonFiniteError()
    saved = [t.clone() for t in state] if bad is not None and kw["training"] else None
    with torch.autocast(x.device.type, enabled=False):
        q, idx, loss, perp = vq_ema_reference(x, *state, lay, all_reduce=reduce, **kw)
    if bad is not None:
        # Finite x so large that a row's squared distance to its code (or the loss's fp32 mean)
        # overflows: non-finite input too, as the kernels see it (every rank learns of it).
        row_err = lay.to_groups(x.detach().float() - q.detach().float()).pow(2).sum(-1)
        overflow = ((~torch.isfinite(row_err)).sum() + (~torch.isfinite(loss))).float().reshape(1)
        if reduce is not None:
            reduce(overflow)
        ok = (bad[0] == 0) & (overflow[0] == 0)
        if saved is not None:
            for t, old in zip(state, saved):
                t.copy_(torch.where(ok, t, old))
        loss = torch.where(ok, loss, torch.full_like(loss, float("nan")))
        if raise_nonfinite and overflow.item() > 0:
            raise NonFiniteError()
    return VQOutput(q, idx, loss, perp)


class _VQFunction(torch.autograd.Function):
    """Straight-through output and commitment loss; the codebook learns by EMA, not by gradient."""

    @staticmethod
    def forward(ctx, x, spec, backend, reduce, codebook, ema_count, ema_weight):
        x = x.detach().contiguous()  # the backward kernel reads x as flat memory, like q
        out = _fused_forward(x, spec, backend, reduce, codebook, ema_count, ema_weight)
        return _saved_for_backward(ctx, x, out, spec.commitment, backend)

    @staticmethod
    def backward(ctx, grad_q, _grad_idx, grad_loss, _grad_perp):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative, which the kernels lack
            raise RuntimeError(f"vq_ema: no second derivative through the {ctx.backend} backend (create_graph=True); "
                               "use backend='reference' for double backward")
        return _input_grad(ctx, grad_q, grad_loss, _grad_x), None, None, None, None, None, None


def _saved_for_backward(ctx, x, out, commitment: float, backend: str):
    """What a VQ forward keeps for its backward (x, q, the commitment loss's coefficient); returns `out`."""
    q, idx, _, perp = out
    ctx.save_for_backward(x, q)
    ctx.coef, ctx.backend = 2.0 * commitment / max(x.numel(), 1), backend
    ctx.mark_non_differentiable(idx, perp)
    return out


def _input_grad(ctx, grad_q, grad_loss, grad_x) -> torch.Tensor:
    """dL/dx by `grad_x` (_grad_x, or the custom op that wraps it), from what _saved_for_backward kept."""
    x, q = ctx.saved_tensors
    if grad_q is None:
        grad_q = torch.zeros_like(x)
    if grad_loss is None:  # the commitment loss was not used: the straight-through gradient alone
        return grad_q
    return grad_x(grad_q, x, q, grad_loss, ctx.coef, ctx.backend)


def _grad_x(grad_q, x, q, grad_loss, coef: float, backend: str) -> torch.Tensor:
    """dL/dx: the straight-through gradient plus the commitment loss's, 2 c (x - q) / numel."""
    coef = grad_loss.float() * coef
    if backend != "triton":
        return (grad_q.float() + coef * (x.float() - q.float())).to(x.dtype)
    from lapo_fast.kernels.vq import vq_backward_kernel

    grad_q, x, q = grad_q.contiguous(), x.contiguous(), q.contiguous()
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    block = 1024
    with _device_guard(x.device):
        vq_backward_kernel[(_cdiv(x.numel(), block),)](grad_q, x, q, grad_x, coef.reshape(1), x.numel(), BLOCK=block)
    return grad_x


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fused_forward(x, spec: _Spec, backend, reduce, codebook, ema_count, ema_weight):
    """Search, then (after the DDP all-reduce, if any) the EMA update; returns q, idx, loss, perplexity."""
    x = x.detach().contiguous()
    if backend == "triton":
        return _triton_forward(x, spec, reduce, codebook, ema_count, ema_weight)

    if reduce is None:  # counts, sums and the EMA update stay inside the one C++ call
        ema = (ema_count, ema_weight) if spec.training else None
        q, idx, loss, perplexity, _, _ = _cpu_forward(x, spec, codebook, ema)
        return q, idx, loss, perplexity
    from lapo_fast import _C

    q, idx, loss, _, counts, sums = _cpu_forward(x, spec, codebook, keep_stats=True)
    bad = torch.tensor([float(loss is None)])
    counts, sums, bad = reduce(counts, sums, bad)  # every rank learns of NaN/inf on any rank
    if bad.item() > 0:
        raise NonFiniteError()
    perplexity = perplexity_of(counts)
    if spec.training:
        _C.vq_ema_update(counts.numpy(), sums.numpy(), ema_count.numpy(), ema_weight.numpy(), codebook.numpy(),
                         spec.decay, 1.0 - spec.decay, spec.eps)
    return q, idx, loss, perplexity


def _cpu_forward(x, spec: _Spec, codebook, ema=None, keep_stats: bool = False):
    """The C++ kernel: search, outputs, and the EMA update of `ema` = (count, weight) if given.
    Returns q, idx, loss, perplexity, counts, sums; the batch counts and sums are tensors only with
    keep_stats (for a DDP all-reduce before the update), else None. NaN/inf in x raise, except with
    keep_stats, where loss comes back None for the caller to raise after the ranks agree."""
    from lapo_fast import _C

    lay = spec.layout
    G, K, d = codebook.shape
    xf = x if x.dtype == torch.float32 else x.float()
    out = torch.empty_like(xf)
    idx = torch.empty(lay.indices_shape, dtype=torch.int64)
    counts = torch.empty(G, K) if keep_stats else None
    sums = torch.empty(G, K, d) if keep_stats and spec.training else None
    # numpy views of the tensors (no copy): the C++ checks each one's dtype, contiguity and size.
    # 1 - decay in double, rounded once to fp32: the reference's (torch's) numbers; in fp32 it is
    # 0.0009999871 for decay 0.999, 1.3e-5 relative off in every EMA update.
    sq_err, nonfinite, perplexity = _C.vq_forward(
        xf.detach().numpy(), out.numpy(), idx.numpy(), codebook.numpy(), None if counts is None else counts.numpy(),
        None if sums is None else sums.numpy(), None if ema is None else ema[0].numpy(),
        None if ema is None else ema[1].numpy(), lay.batch, lay.L, lay.strides(), spec.num_threads, spec.decay,
        1.0 - spec.decay, spec.eps)
    if nonfinite:  # free to detect on the CPU, so always enforced there (check_finite is a CUDA knob)
        if keep_stats:
            return out, idx, None, None, counts, sums
        raise NonFiniteError()
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    # scalar_tensor is ~3x cheaper than torch.tensor for a Python float: it matters at B=128.
    loss = torch.scalar_tensor(sq_err * spec.commitment / max(x.numel(), 1))
    perplexity = torch.scalar_tensor(perplexity)
    return out, idx, loss, perplexity, counts, sums


class Target(NamedTuple):
    """A GPU generation's choices for the searches: per x dtype, (rows per tile, warps per program,
    vector row loads), the fastest by the compile-time model at the LAPO shape without spills under
    MAX_REGISTERS (benchmarks/vq_compile.py; docs/experiments.md); and whether tl.dot has TF32."""

    tiles: dict
    tf32: bool


# A warp owns whole rows: a row's codes are never split across warps.
_SM90 = {"float32": (32, 4, True), "bfloat16": (32, 4, True), "float16": (16, 4, True)}
_SM80 = {"float32": (16, 4, False), "bfloat16": (32, 4, True), "float16": (16, 4, True)}
# Compute capability -> its target; None: CPU tensors under the Triton interpreter. sm_86/89
# (~99 KB shared memory per program) take sm_80's tiles, which need far less; sm_100/120 take
# sm_90's, not yet measured there; before sm_80 tl.dot runs in fp32 FMAs.
TARGETS: dict[int | None, Target] = {
    None: Target(_SM90, True), 70: Target(_SM80, False), 75: Target(_SM80, False), 80: Target(_SM80, True),
    86: Target(_SM80, True), 87: Target(_SM80, True), 89: Target(_SM80, True), 90: Target(_SM90, True),
    100: Target(_SM90, True), 120: Target(_SM90, True),
}


def target_of(capability: int | None) -> Target:
    """The target of a compute capability (e.g. 90), or an error naming the way out."""
    if capability not in TARGETS:
        known = ", ".join(f"sm_{c}" for c in TARGETS if c is not None)
        raise ValueError(f"vq_ema: no Triton tiles for sm_{capability} (known: {known}); pass backend='reference', "
                         "or add the target to lapo_fast/ops/vq.py's TARGETS (see 'Adding a kernel variant or a "
                         "target' there)")
    return TARGETS[capability]


class TritonPlan(NamedTuple):
    """What the dispatcher launches for one shape: the search kernel (kind), tile sizes, programs."""
    kind: str          # "resident": codebook and statistics in registers (vq_search_resident_kernel);
    #                    "gemm": large codebooks, atomic mode (vq_code_norms_kernel + vq_search_gemm_kernel);
    #                    "general": any K and d (vq_search_kernel)
    contiguous: bool   # rows loaded as contiguous d*L runs (vector accesses)
    block_n: int
    block_k: int
    block_d: int
    tiles: int         # row tiles per group
    programs: int      # persistent programs per group
    precision: str     # tl.dot input precision: "tf32x3" (fp32-accurate on tensor cores) or "ieee"
    num_warps: int
    finalize_block_k: int
    finalize_block_d: int
    finalize_blocks: int  # finalize programs per group
    code_splits: int = 1       # GEMM search with few row tiles: programs per row tile, each over a share of the codes
    codes_per_split: int = 0   # (a multiple of block_k)

    @property
    def resident(self) -> bool:
        return self.kind == "resident"

    @property
    def gemm(self) -> bool:
        return self.kind == "gemm"


RESIDENT_MAX = 2048        # padded K x d held in registers per program (LAPO: 64 x 16 = 1,024)
MAX_REGISTERS = 128        # per thread, so 16 warps fit an SM's 64K registers (ptxas would take ~220)
PARTIAL_BYTES = 256 << 20  # cap on the deterministic mode's per-program partial sums
# The GEMM search's tile (rows, codes, dims per chunk when d is too wide for one, warps): the
# fastest without spills by the compile-time model over the tokenizer shapes (docs/experiments.md).
GEMM_TILE = (128, 64, 16, 8)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=256)  # once per shape: host time per call matters at small batches
def triton_plan(lay: Layout, K: int, d: int, deterministic: bool, sms: int | None,
                capability: int | None, x_dtype: torch.dtype = torch.float32) -> TritonPlan:
    """sms, capability (e.g. 90): the GPU's; None for CPU tensors (the interpreter), where a few
    programs each walk several tiles (so tests exercise the persistent loop) with sm_90's tiles.
    x_dtype: x's (the searches' tiles differ by it)."""
    target = target_of(capability)
    block_n, warps, vector_rows = target.tiles[str(x_dtype).removeprefix("torch.")]
    pk, pd = max(16, _pow2(K)), max(16, _pow2(d))
    kind = ("resident" if pk * pd <= RESIDENT_MAX and pk <= 128 and pd <= 64
            else "general" if deterministic else "gemm")
    if kind == "resident":
        block_k, block_d = pk, pd
        block_n = block_n if pk * pd <= 1024 else min(block_n, 16)  # wider codebooks: 32 rows would spill
        contiguous = vector_rows and d == pd and _pow2(lay.L) == lay.L and lay.L <= block_n
    elif kind == "gemm":  # a GEMM tile with an argmin epilogue (the deterministic mode keeps vq_search_kernel's)
        block_n, block_k, warps = GEMM_TILE[0], min(pk, GEMM_TILE[1]), GEMM_TILE[3]
        # small d: x loaded (and split) once per row tile (fp32 x: two halves, so up to 16 dims)
        block_d = pd if pd <= (16 if x_dtype == torch.float32 else 32) else GEMM_TILE[2]
        contiguous = False
    else:
        block_k, block_d = min(pk, 64), min(pd, 32)
        contiguous = False
    tiles = max(1, _cdiv(lay.rows, block_n))
    full = 3 if sms is None else sms * (16 // warps)  # programs that fill the GPU: 16 resident warps per SM
    programs = min(tiles, full)
    if deterministic and kind != "resident":
        programs = max(1, min(programs, PARTIAL_BYTES // (4 * lay.G * K * (d + 1))))
    fk = min(64, pk)
    splits, per = 1, _cdiv(K, block_k)  # code tiles per split
    if kind == "gemm" and tiles < full:  # idle SMs: split the codes too
        per = _cdiv(per, min(per, full // tiles))
        splits = _cdiv(_cdiv(K, block_k), per)
    return TritonPlan(kind, contiguous, block_n, block_k, block_d, tiles, programs,
                      "tf32x3" if target.tf32 else "ieee", warps, fk, min(32, pd), _cdiv(K, fk), splits,
                      per * block_k)


def _launch_facts(device: torch.device) -> tuple[int | None, int | None]:
    """(multiprocessors, compute capability) of x's GPU; (None, None) for CPU tensors."""
    if device.type != "cuda":
        return None, None
    return _gpu_facts(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _gpu_facts(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major * 10 + props.minor


def _device_guard(device: torch.device):
    """Launch on x's GPU and its current stream, whatever the current device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Launch(NamedTuple):
    """One call's tensors and sizes, for the launchers: what each kernel takes, by its parameters' names."""
    x: torch.Tensor
    out: torch.Tensor
    idx: torch.Tensor
    codebook: torch.Tensor
    ema_count: torch.Tensor
    counts: torch.Tensor         # (G, K), or (P, G, K) partials in the deterministic mode
    sums: torch.Tensor | None    # (G, K, d) or partials; None unless training
    stats: torch.Tensor          # [loss, perplexity, bad rows, (per-group loss, perplexity: deterministic)]
    err: torch.Tensor            # (G, P) squared error per program
    old_total: torch.Tensor      # (G,) the old EMA counts' sum
    flat: torch.Tensor | None    # the atomic mode's one buffer (what DDP all-reduces: flat[2:stat_end])
    stat_end: int
    operands: torch.Tensor | None  # the GEMM search's padded operands (the tail of flat), else None
    plan: TritonPlan
    spec: _Spec

    def search_args(self) -> dict:
        """The arguments every search kernel takes, by name."""
        G, K, d = self.codebook.shape
        lay = self.spec.layout
        strides = dict(zip(("stride_b", "stride_g", "stride_k", "stride_l"), lay.strides()))
        return dict(x_ptr=self.x, out_ptr=self.out, idx_ptr=self.idx, codebook_ptr=self.codebook,
                    counts_ptr=self.counts, sums_ptr=self.counts if self.sums is None else self.sums,
                    stats_ptr=self.stats, err_ptr=self.err, n_batch=lay.batch, K=K, d=d, G=G, L=lay.L,
                    num_tiles=self.plan.tiles, **strides,
                    ACCUMULATE_SUMS=self.spec.training, BLOCK_N=self.plan.block_n, BLOCK_D=self.plan.block_d)


def _gemm_pads(plan: TritonPlan, K: int, d: int) -> tuple[int, int]:
    """(K, d) padded to the GEMM search's tiles: its operands load without masks."""
    return _cdiv(K, plan.block_k) * plan.block_k, _cdiv(d, plan.block_d) * plan.block_d


def _allocate(x, spec: _Spec, plan: TritonPlan, codebook, ema_count) -> _Launch:
    """The outputs and accumulators: per-program partials (deterministic), or one zero-filled buffer
    [loss, perplexity, bad rows | counts | sums | err | old totals] (+ the GEMM search's operands,
    which vq_code_norms_kernel zeroes) -- one allocation: host time counts at B=128."""
    lay, dev, P = spec.layout, x.device, plan.programs
    G, K, d = codebook.shape
    out, idx = torch.empty_like(x), torch.empty(lay.indices_shape, dtype=torch.int64, device=dev)
    if spec.deterministic:  # summed by the finisher in a fixed order
        fill = torch.zeros if not plan.resident else torch.empty  # resident programs overwrite theirs
        return _Launch(x, out, idx, codebook, ema_count, fill(P, G, K, device=dev),
                       fill(P, G, K, d, device=dev) if spec.training else None, torch.zeros(3 + 2 * G, device=dev),
                       torch.empty(G, P, device=dev), torch.empty(G, device=dev), None, 0, None, plan, spec)
    stat_end = 3 + G * K + (G * K * d if spec.training else 0)
    k_pad, d_pad = _gemm_pads(plan, K, d) if plan.gemm else (0, 0)
    flat = (torch.empty if plan.gemm else torch.zeros)(stat_end + G * P + G + G * k_pad * (1 + 2 * d_pad), device=dev)
    sums = flat[3 + G * K:stat_end].view(G, K, d) if spec.training else None
    return _Launch(x, out, idx, codebook, ema_count, flat[3:3 + G * K].view(G, K), sums, flat[:3],
                   flat[stat_end:stat_end + G * P].view(G, P), flat[stat_end + G * P:stat_end + G * P + G], flat,
                   stat_end, flat[stat_end + G * P + G:] if plan.gemm else None, plan, spec)


def _launch_resident(s: _Launch) -> None:
    plan, spec = s.plan, s.spec
    _kernels().vq_search_resident_kernel[(plan.programs, spec.layout.G)](
        **s.search_args(), ema_count_ptr=s.ema_count, old_total_ptr=s.old_total, DETERMINISTIC=spec.deterministic,
        # (the deterministic mode's partials leave no registers for the constant divisor on sm_80)
        CONTIGUOUS=plan.contiguous, L_C=spec.layout.L if plan.contiguous or not spec.deterministic else 1,
        BLOCK_K=plan.block_k, PRECISION=plan.precision, CHECK_FINITE=spec.check_finite,
        NARROW=not spec.deterministic and plan.block_k * plan.block_d <= 1024,
        num_warps=plan.num_warps, maxnreg=MAX_REGISTERS)


def _launch_general(s: _Launch) -> None:
    plan = s.plan
    _kernels().vq_search_kernel[(plan.programs, s.spec.layout.G)](
        **s.search_args(), ema_count_ptr=s.ema_count, old_total_ptr=s.old_total, DETERMINISTIC=s.spec.deterministic,
        BLOCK_K=plan.block_k, PRECISION=plan.precision,
        num_warps=plan.num_warps)  # any K and d: not register-capped (it would spill)


def _launch_gemm(s: _Launch) -> None:
    """The codes' norms and TF32 halves into padded operands (so the search's tiles load without
    masks), the GEMM search, and with code splits the rows kernel that combines them."""
    kernels, plan, spec = _kernels(), s.plan, s.spec
    G, K, d = s.codebook.shape
    k_pad, d_pad = _gemm_pads(plan, K, d)
    cnorm, c_split = s.operands[:G * k_pad].view(G, k_pad), s.operands[G * k_pad:].view(2, G, d_pad, k_pad)
    rows = s.search_args()
    kernels.vq_code_norms_kernel[(G, k_pad // plan.block_k)](
        codebook_ptr=s.codebook, ema_count_ptr=s.ema_count, cnorm_ptr=cnorm, c_split_ptr=c_split,
        old_total_ptr=s.old_total, counts_ptr=s.counts, sums_ptr=rows["sums_ptr"], stats_ptr=s.stats, K=K, d=d, G=G,
        K_PAD=k_pad, D_PAD=d_pad, ZERO_SUMS=s.sums is not None, BLOCK_K=plan.block_k, BLOCK_D=plan.block_d)
    splits, rows_pad = plan.code_splits, plan.tiles * plan.block_n
    part_val = part_idx = cnorm  # (untouched without a split)
    if splits > 1:  # each split's nearest code and distance per row, for vq_gemm_rows_kernel
        parts = torch.empty(2, splits, G, rows_pad, device=s.x.device)
        part_val, part_idx = parts[0], parts[1].view(torch.int32)
    kernels.vq_search_gemm_kernel[(plan.programs, G, splits)](
        **rows, cnorm_ptr=cnorm, c_split_ptr=c_split, part_val_ptr=part_val, part_idx_ptr=part_idx, K_PAD=k_pad,
        D_PAD=d_pad, codes_per_split=plan.codes_per_split, rows_pad=rows_pad,
        SPLIT_X=s.x.dtype == torch.float32 and plan.precision == "tf32x3", ONE_CHUNK=d <= plan.block_d,
        SPLIT_CODES=splits > 1, BLOCK_K=plan.block_k, PRECISION="ieee" if plan.precision == "ieee" else "tf32",
        CHECK_FINITE=spec.check_finite, num_warps=plan.num_warps)
    if splits > 1:
        kernels.vq_gemm_rows_kernel[(plan.programs, G)](
            **rows, part_val_ptr=part_val, part_idx_ptr=part_idx, rows_pad=rows_pad, SPLITS=splits,
            CHECK_FINITE=spec.check_finite, num_warps=4)


# One launcher per plan kind (TritonPlan.kind).
LAUNCHERS = {"resident": _launch_resident, "gemm": _launch_gemm, "general": _launch_general}


def _finish(s: _Launch, reduce, ema_weight) -> None:
    """The deterministic partials summed in a fixed order, the DDP all-reduce (counts, sums and the
    NaN count), then the finalize: loss, perplexity and, training, the EMA update."""
    spec, plan = s.spec, s.plan
    G, K, d = s.codebook.shape
    counts, sums = s.counts, s.sums
    if spec.deterministic:
        counts = counts.sum(0)
        sums = sums.sum(0) if sums is not None else None
    if reduce is not None:
        if spec.deterministic:
            reduce(s.stats[2:3], counts, sums)
        else:
            reduce(s.flat[2:s.stat_end])
    update = spec.training
    unused = counts  # a pointer the kernel does not touch without the update
    _kernels().vq_finalize_kernel[(G, plan.finalize_blocks if update else 1)](
        counts, sums if update else unused, s.ema_count if update else unused,
        ema_weight if update else unused, s.codebook, s.stats, s.err, s.old_total,
        K, d, G, plan.programs, max(s.x.numel(), 1), spec.decay, 1.0 - spec.decay, spec.eps, spec.commitment,
        UPDATE=update, GUARD=spec.check_finite, PER_GROUP=spec.deterministic,
        BLOCK_K=plan.finalize_block_k, BLOCK_D=plan.finalize_block_d, BLOCK_T=1024)


def _kernels():
    """lapo_fast.kernels.vq, imported on first use (triton is imported only by the Triton backend)."""
    from lapo_fast.kernels import vq

    return vq


def _triton_forward(x, spec: _Spec, reduce, codebook, ema_count, ema_weight):
    """Plan, allocate, search (the plan's launcher), finish; no host read unless spec.raise_nonfinite."""
    G, K, d = codebook.shape
    plan = triton_plan(spec.layout, K, d, spec.deterministic, *_launch_facts(x.device), x.dtype)
    s = _allocate(x, spec, plan, codebook, ema_count)
    with _device_guard(x.device):
        LAUNCHERS[plan.kind](s)
        _finish(s, reduce, ema_weight)
    if spec.raise_nonfinite and spec.check_finite and s.stats[2].item() > 0:
        raise NonFiniteError()
    if spec.deterministic:
        return s.out, s.idx, s.stats[3:3 + G].sum(), s.stats[3 + G:].sum()
    return s.out, s.idx, s.stats[0], s.stats[1]


# -- the op as torch.compile sees it: custom ops with fake (shape-only) implementations --------------

@torch.library.custom_op("lapo_fast::vq_ema_forward", mutates_args=("codebook", "ema_count", "ema_weight"))
def _vq_ema_forward_op(x: torch.Tensor, codebook: torch.Tensor, ema_count: torch.Tensor, ema_weight: torch.Tensor,
                       layout: str, num_latents: int, training: bool, decay: float, eps: float, commitment: float,
                       backend: str, deterministic: bool, check_finite: bool, raise_nonfinite: bool,
                       num_threads: int, sync: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vq_ema's forward (search, EMA update of the state in place) as one op; the same code as eager."""
    G, K, d = codebook.shape
    lay = Layout.for_shape(tuple(x.shape), G, d, layout, num_latents)
    reduce = _all_reduce_fn(sync) if training else None
    if backend == "reference":
        q, idx, loss, perp = _reference_forward(x.detach(), (codebook, ema_count, ema_weight), lay, reduce,
                                                check_finite, raise_nonfinite, training=training, decay=decay,
                                                eps=eps, commitment=commitment)
    else:
        spec = _Spec(lay, training, decay, eps, commitment, deterministic, check_finite, raise_nonfinite, num_threads)
        q, idx, loss, perp = _fused_forward(x, spec, backend, reduce, codebook, ema_count, ema_weight)
    return q.contiguous(), idx, loss.reshape(()).float().clone(), perp.reshape(()).float().clone()


@_vq_ema_forward_op.register_fake
def _(x, codebook, ema_count, ema_weight, layout, num_latents, training, decay, eps, commitment, backend,
      deterministic, check_finite, raise_nonfinite, num_threads, sync):
    G, K, d = codebook.shape
    lay = Layout.for_shape(tuple(x.shape), G, d, layout, num_latents)
    scalar = x.new_empty((), dtype=torch.float32)
    return (x.new_empty(x.shape), x.new_empty(lay.indices_shape, dtype=torch.int64), scalar, scalar.clone())


@torch.library.custom_op("lapo_fast::vq_ema_backward", mutates_args=())
def _vq_ema_backward_op(grad_q: torch.Tensor, x: torch.Tensor, q: torch.Tensor, grad_loss: torch.Tensor, coef: float,
                        backend: str) -> torch.Tensor:
    return _grad_x(grad_q, x, q, grad_loss, coef, backend)


@_vq_ema_backward_op.register_fake
def _(grad_q, x, q, grad_loss, coef, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class _OpOptions(NamedTuple):
    """vq_ema's settings as the custom ops take them, in their order after the four tensors."""
    layout: str
    num_latents: int
    training: bool
    decay: float
    eps: float
    commitment: float
    backend: str
    deterministic: bool
    check_finite: bool
    raise_nonfinite: bool
    num_threads: int
    sync: str


class _CompiledVQ(torch.autograd.Function):
    """The op under torch.compile: the forward op (it mutates the state, so autograd is attached
    here rather than to it) and the backward op, both opaque to the compiler."""

    @staticmethod
    def forward(ctx, x, codebook, ema_count, ema_weight, options: _OpOptions):
        out = torch.ops.lapo_fast.vq_ema_forward(x, codebook, ema_count, ema_weight, *options)
        return _saved_for_backward(ctx, x, out, options.commitment, options.backend)

    @staticmethod
    def backward(ctx, grad_q, _grad_idx, grad_loss, _grad_perp):
        grad_x = _input_grad(ctx, grad_q, grad_loss, torch.ops.lapo_fast.vq_ema_backward)
        return grad_x, None, None, None, None  # the state learns by EMA; the options are not tensors
