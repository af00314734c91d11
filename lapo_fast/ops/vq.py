"""Fused EMA vector quantisation: one op, three backends.

    out = vq_ema(x, codebook, ema_count, ema_weight, layout="lapo", num_latents=4)
    out.quantized, out.indices, out.loss, out.perplexity

Backends (``backend=``): "triton" (CUDA tensors; also CPU tensors under TRITON_INTERPRET=1),
"cpu" (the C++ kernel in lapo_fast._C, AVX2 + threads), "reference" (pure PyTorch, the
specification: lapo_fast/ops/vq_reference.py). "auto" picks triton on CUDA, cpu on CPU.

Semantics are the reference LAPO code's (see vq_reference.py): argmin on the codebook before the
update, straight-through gradient, commitment loss, EMA counts with Laplace smoothing. All
accumulation is fp32 whatever the input dtype (bf16/fp16 accepted, e.g. under autocast); the
codebook state is always fp32.

NaN policy: a NaN or inf anywhere in x raises ValueError and leaves the codebook untouched. On
CUDA the check costs one host sync per call; ``check_finite=False`` skips it there (and on the
reference path), and then non-finite values are treated as 0 by the Triton kernel. The CPU kernel
detects them for free and always raises.

DDP: when torch.distributed is initialised with more than one rank, the batch counts and sums are
all-reduced before the EMA update, so every rank ends with the codebook one process would get on
the joined batch. Dead-code refills and k-means init are broadcast from rank 0.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

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
    num_threads: int


BACKENDS = ("auto", "triton", "cpu", "reference")
_CORES = os.cpu_count() or 1


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
    num_threads: int | None = None,
) -> VQOutput:
    """EMA vector quantisation of x against G codebooks (G, K, d); updates the state if training."""
    G, K, d = _check_state(codebook, ema_count, ema_weight)
    if not torch.is_floating_point(x):
        raise TypeError(f"vq_ema: x must be floating point, got {x.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"vq_ema: x is on {x.device} but the codebook is on {codebook.device}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"vq_ema: decay must be in [0, 1), got {decay}")
    lay = Layout.for_shape(tuple(x.shape), G, d, layout, num_latents)
    if x.numel() == 0:
        raise ValueError(f"vq_ema: x of shape {tuple(x.shape)} holds no latents; pass at least one row")
    backend = _resolve_backend(backend, x)
    reduce = _all_reduce_fn() if training else None

    if backend == "reference":
        if check_finite and not torch.isfinite(x).all():
            raise NonFiniteError(_NONFINITE)
        return VQOutput(*vq_ema_reference(
            x, codebook, ema_count, ema_weight, lay, training=training, decay=decay, eps=eps,
            commitment=commitment, all_reduce=reduce))

    spec = _Spec(lay, training, float(decay), float(eps), float(commitment), deterministic,
                 check_finite, num_threads or _CORES)
    state = (codebook, ema_count, ema_weight)
    if x.requires_grad and torch.is_grad_enabled():
        q, idx, loss, perp = _VQFunction.apply(x, spec, backend, reduce, *state)
    else:
        q, idx, loss, perp = _fused_forward(x, spec, backend, reduce, *state)
    return VQOutput(q, idx, loss, perp)


_NONFINITE = "vq_ema: input latents contain NaN or inf; the codebook was not updated"


class NonFiniteError(ValueError):
    """NaN or inf in the latents given to the VQ (the codebook is left untouched); a training loop
    catches it to say that its model diverged."""


def _check_state(codebook, ema_count, ema_weight):
    if codebook.dim() != 3:
        raise ValueError(f"vq_ema: codebook must be (groups, codes, dim), got {tuple(codebook.shape)}")
    G, K, d = codebook.shape
    # One cheap combined test on the hot path; the per-tensor messages only when it fails.
    if (codebook.dtype == ema_count.dtype == ema_weight.dtype == torch.float32
            and ema_count.shape == (G, K) and ema_weight.shape == (G, K, d)
            and codebook.is_contiguous() and ema_count.is_contiguous() and ema_weight.is_contiguous()
            and codebook.device == ema_count.device == ema_weight.device):
        return G, K, d
    expected = (("codebook", codebook, (G, K, d)), ("ema_count", ema_count, (G, K)),
                ("ema_weight", ema_weight, (G, K, d)))
    for name, t, shape in expected:
        if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"vq_ema: {name} must be a contiguous float32 tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device != codebook.device:
            raise ValueError(f"vq_ema: {name} is on {t.device}, codebook on {codebook.device}")
    raise AssertionError("unreachable")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"vq_ema: unknown backend {backend!r}; choose from {BACKENDS}")
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


def _all_reduce_fn():
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def reduce(counts, sums):
        dist.all_reduce(counts)
        dist.all_reduce(sums)
        return counts, sums

    return reduce


class _VQFunction(torch.autograd.Function):
    """Straight-through output and commitment loss; the codebook learns by EMA, not by gradient."""

    @staticmethod
    def forward(ctx, x, spec, backend, reduce, codebook, ema_count, ema_weight):
        q, idx, loss, perp = _fused_forward(x, spec, backend, reduce, codebook, ema_count, ema_weight)
        ctx.save_for_backward(x, q)
        ctx.coef = 2.0 * spec.commitment / max(x.numel(), 1)
        ctx.backend = backend
        ctx.mark_non_differentiable(idx, perp)
        return q, idx, loss, perp

    @staticmethod
    def backward(ctx, grad_q, _grad_idx, grad_loss, _grad_perp):
        x, q = ctx.saved_tensors
        if grad_q is None:
            grad_q = torch.zeros_like(x)
        if grad_loss is None:
            return grad_q, None, None, None, None, None, None
        coef = grad_loss.float() * ctx.coef
        if ctx.backend == "triton":
            from lapo_fast.kernels.vq import vq_backward_kernel

            grad_q = grad_q.contiguous()
            grad_x = torch.empty_like(x)
            block = 1024
            grid = (_cdiv(x.numel(), block),)
            vq_backward_kernel[grid](grad_q, x, q, grad_x, coef.reshape(1), x.numel(), BLOCK=block)
        else:
            grad_x = (grad_q.float() + coef * (x.float() - q.float())).to(x.dtype)
        return grad_x, None, None, None, None, None, None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fused_forward(x, spec: _Spec, backend, reduce, codebook, ema_count, ema_weight):
    """Search, then (after the DDP all-reduce, if any) the EMA update; returns q, idx, loss, perplexity."""
    x = x.detach().contiguous()
    if backend == "triton":
        return _triton_forward(x, spec, reduce, codebook, ema_count, ema_weight)

    if reduce is None:  # counts, sums and the EMA update stay inside the one C++ call
        q, idx, loss, perplexity, _, _ = _cpu_forward(x, spec, codebook, (ema_count, ema_weight) if spec.training else None)
        return q, idx, loss, perplexity
    from lapo_fast import _C

    q, idx, loss, _, counts, sums = _cpu_forward(x, spec, codebook, keep_stats=True)
    counts, sums = reduce(counts, sums)
    perplexity = perplexity_of(counts)
    if spec.training:
        call = _C.VQCall()
        call.counts, call.sums, call.codebook = counts.data_ptr(), sums.data_ptr(), codebook.data_ptr()
        call.ema_count, call.ema_weight = ema_count.data_ptr(), ema_weight.data_ptr()
        call.G, call.K, call.d = codebook.shape
        call.decay, call.eps = spec.decay, spec.eps
        _C.vq_ema_update(call)
    return q, idx, loss, perplexity


def _cpu_forward(x, spec: _Spec, codebook, ema=None, keep_stats: bool = False):
    """The C++ kernel: search, outputs, and the EMA update of `ema` = (count, weight) if given.
    Returns q, idx, loss, perplexity, counts, sums; the batch counts and sums are tensors only with
    keep_stats (for a DDP all-reduce before the update), else None."""
    from lapo_fast import _C

    lay = spec.layout
    G, K, d = codebook.shape
    xf = x if x.dtype == torch.float32 else x.float()
    out = torch.empty_like(xf)
    idx = torch.empty(lay.indices_shape, dtype=torch.int64)
    counts = torch.empty(G, K) if keep_stats else None
    sums = torch.empty(G, K, d) if keep_stats and spec.training else None
    call = _C.VQCall()
    call.x, call.out, call.indices, call.codebook = xf.data_ptr(), out.data_ptr(), idx.data_ptr(), codebook.data_ptr()
    if counts is not None:
        call.counts = counts.data_ptr()
    if sums is not None:
        call.sums = sums.data_ptr()
    if ema is not None:
        call.ema_count, call.ema_weight = ema[0].data_ptr(), ema[1].data_ptr()
    call.batch, call.G, call.K, call.d, call.L = lay.batch, G, K, d, lay.L
    call.stride_b, call.stride_g, call.stride_k, call.stride_l = lay.strides()
    call.num_threads, call.decay, call.eps = spec.num_threads, spec.decay, spec.eps
    sq_err, nonfinite, perplexity = _C.vq_forward(call)
    if nonfinite:  # free to detect on the CPU, so always enforced there (check_finite is a CUDA knob)
        raise NonFiniteError(_NONFINITE)
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    # scalar_tensor is ~3x cheaper than torch.tensor for a Python float: it matters at B=128.
    loss = torch.scalar_tensor(sq_err * spec.commitment / max(x.numel(), 1))
    perplexity = torch.scalar_tensor(perplexity)
    return out, idx, loss, perplexity, counts, sums


def _search_blocks(K: int, d: int) -> tuple[int, int, int]:
    block_d = max(16, 1 << (d - 1).bit_length())
    block_k = max(16, min(64, 1 << (K - 1).bit_length()))
    block_n = 64 if block_d <= 64 else 32
    return block_n, block_k, block_d


def _triton_forward(x, spec: _Spec, reduce, codebook, ema_count, ema_weight):
    """Three launches: zero-fill, search (+ per-tile partials), finalize (loss, perplexity, EMA)."""
    from lapo_fast.kernels.vq import vq_ema_finalize_kernel, vq_search_kernel

    lay = spec.layout
    G, K, d = codebook.shape
    dev = x.device
    block_n, block_k, block_d = _search_blocks(K, d)
    tiles = max(1, _cdiv(lay.rows, block_n))
    out = torch.empty_like(x)
    idx = torch.empty(lay.indices_shape, dtype=torch.int64, device=dev)
    err = torch.empty(G, tiles, device=dev)
    bad = torch.empty(G, tiles, dtype=torch.int32, device=dev)
    sum_size = G * K * d if spec.training else 0
    if spec.deterministic:  # per-tile partials, fully overwritten, summed below in a fixed order
        stats = torch.zeros(3, device=dev)
        counts = torch.empty(tiles, G, K, device=dev)
        sums = torch.empty(tiles, G, K, d, device=dev) if spec.training else None
    else:  # one zero-filled buffer: [loss, perplexity, bad | counts | sums], atomics add into it
        flat = torch.zeros(3 + G * K + sum_size, device=dev)
        stats, counts = flat[:3], flat[3:3 + G * K].view(G, K)
        sums = flat[3 + G * K:].view(G, K, d) if spec.training else None
    vq_search_kernel[(tiles, G)](
        x, out, idx, codebook, counts, counts if sums is None else sums, err, bad,
        lay.rows, K, d, G, lay.L, *lay.strides(),
        ACCUMULATE_SUMS=spec.training, DETERMINISTIC=spec.deterministic,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    if spec.deterministic:
        counts = counts.sum(0)
        sums = sums.sum(0) if sums is not None else None
    if reduce is not None:
        counts, sums = reduce(counts, sums)
    update = spec.training
    unused = counts  # pointer arguments the kernel does not touch when not updating
    vq_ema_finalize_kernel[(G,)](
        counts, sums if update else unused, ema_count if update else unused,
        ema_weight if update else unused, codebook, err, bad, stats,
        K, d, G, tiles, max(x.numel(), 1), spec.decay, spec.eps, spec.commitment,
        UPDATE=update, GUARD=spec.check_finite,
        BLOCK_K=min(64, max(16, 1 << (K - 1).bit_length())),
        BLOCK_D=max(16, min(64, 1 << (d - 1).bit_length())), BLOCK_T=256,
    )
    if spec.check_finite and stats[2].item() > 0:
        raise NonFiniteError(_NONFINITE)
    return out, idx, stats[0], stats[1]
