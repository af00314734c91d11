"""The fused VQ-EMA op (C++ on CPU, Triton interpreted on CPU) against the PyTorch reference."""

import os

import numpy as np
import pytest
import torch

from lapo_fast.ops import NonFiniteError, VectorQuantizerEMA, vq_ema
from lapo_fast.ops.vq_layout import Layout

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_state(G, K, d, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cb = (torch.rand(G, K, d, generator=g) * 2 - 1) * (5.0 / K)
    return [t.to(device) for t in (cb, torch.zeros(G, K), cb.clone())]


def make_x(layout, B, G, d, L, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    D = G * d * L
    # Clustered latents, so codes see real use rather than one code taking everything.
    centres = torch.randn(8, D, generator=g)
    x = centres[torch.randint(8, (B,), generator=g)] + 0.3 * torch.randn(B, D, generator=g)
    return (0.1 * x).to(device=device, dtype=dtype)


def assert_indices_equivalent(x, layout, codebook, idx_a, idx_b):
    """Indices may differ only where two codes are (numerically) equally near: compare distances."""
    rows = layout.to_groups(x.detach()).double()                        # (G, N, d)
    cb = codebook.double()
    dist = torch.cdist(rows, cb) ** 2                                    # (G, N, K)
    flat = lambda idx: (idx.reshape(-1, layout.G).T if layout.kind == "grouped"  # noqa: E731
                        else idx.permute(1, 0, 2).reshape(layout.G, -1))
    da = dist.gather(-1, flat(idx_a).unsqueeze(-1)).squeeze(-1)
    db = dist.gather(-1, flat(idx_b).unsqueeze(-1)).squeeze(-1)
    best = dist.min(-1).values
    tol = 1e-5 * (1 + rows.pow(2).sum(-1) + cb.pow(2).sum(-1).max())
    assert ((da - best).abs() <= tol).all() and ((db - best).abs() <= tol).all()
    assert (flat(idx_a) != flat(idx_b)).float().mean() < 0.01


def run_pair(backend, layout, B, G, K, d, L, steps=3, dtype=torch.float32, training=True,
             device="cpu", **kw):
    ref_state = make_state(G, K, d)
    fused_state = [t.clone().to(device) for t in ref_state]
    compared_steps = 0
    for step in range(steps):
        x = make_x(layout, B, G, d, L, seed=step, dtype=dtype)
        lay = Layout.of(x, G, d, layout, L)
        cb_before = ref_state[0].clone()
        xr = x.clone().requires_grad_()
        xf = x.clone().to(device).requires_grad_()
        r = vq_ema(xr, *ref_state, layout=layout, num_latents=L, backend="reference", training=training)
        f = vq_ema(xf, *fused_state, layout=layout, num_latents=L, backend=backend, training=training, **kw)
        assert f.quantized.dtype == x.dtype and f.quantized.shape == x.shape
        assert f.indices.shape == r.indices.shape and f.indices.dtype == torch.int64
        assert_indices_equivalent(x.float(), lay, cb_before, r.indices, f.indices.cpu())
        same = (r.indices == f.indices.cpu())
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(f.loss.cpu(), r.loss.detach(), rtol=1e-3, atol=1e-6)
        if same.all():
            compared_steps += 1
            torch.testing.assert_close(f.quantized.cpu(), r.quantized.detach(), **tol)
            torch.testing.assert_close(f.perplexity.cpu(), r.perplexity, rtol=1e-4, atol=1e-4)
            for name, a, b in zip(("codebook", "ema_count", "ema_weight"), fused_state, ref_state):
                scale = b.abs().max().item() + 1e-6
                torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4 * scale, msg=name)
        else:
            # A near-tie went the other way (checked above): one row moves between two codes, which
            # legitimately changes the EMA state; continue both from the reference's state.
            for a, b in zip(fused_state, ref_state):
                a.copy_(b.to(a.device))
        if training:
            upstream = torch.randn_like(r.quantized.float()).to(dtype)
            (r.quantized * upstream).sum().add(r.loss * 3).backward()
            (f.quantized * upstream.to(device)).sum().add(f.loss * 3).backward()
            if same.all():
                torch.testing.assert_close(xf.grad.cpu(), xr.grad, **tol)
    assert compared_steps >= 1, "every step hit a near-tie: the test data is degenerate"
    return ref_state, fused_state


CPU_SHAPES = [
    # layout, B, G, K, d, L
    ("lapo", 128, 2, 64, 16, 4),
    ("lapo", 1, 2, 64, 16, 4),
    ("lapo", 16385, 2, 64, 16, 4),  # many row chunks of the block gather/scatter, a ragged last one
    ("lapo", 5, 2, 64, 32, 4),      # LAPO's view with d=32: the generic strided path
    ("grouped", 1, 1, 8, 4, 1),
    ("grouped", 1000, 3, 100, 33, 1),
    ("grouped", 65536, 1, 64, 16, 1),
    ("grouped", 300, 1, 4096, 8, 1),
    ("grouped", 200, 1, 16, 256, 1),
]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_cpu_kernel_matches_reference(shape):
    run_pair("cpu", *shape)


def test_the_cpu_kernel_checks_every_array_it_is_given():
    """The C++ op takes numpy views of the tensors and checks each against the codebook's shape:
    a wrong dtype, size, layout or stride is an exception naming the argument, never a write out
    of bounds or into a silent copy."""
    _C = pytest.importorskip("lapo_fast._C")
    G, K, d, L, B = 2, 64, 16, 4, 8
    x = np.random.default_rng(0).standard_normal((B, G * d * L)).astype(np.float32)
    out, idx = np.empty_like(x), np.empty((B, G, L), np.int64)
    cb = np.random.default_rng(1).standard_normal((G, K, d)).astype(np.float32)

    def call(**change):
        a = dict(x=x, out=out, indices=idx, codebook=cb, counts=None, sums=None, ema_count=None, ema_weight=None,
                 batch=B, L=L, strides=(G * d * L, d * L, L, 1), num_threads=1, decay=0.99, rate=0.01, eps=1e-5)
        return _C.vq_forward(**{**a, **change})

    sq_err, nonfinite, _ = call()
    ref = vq_ema(torch.from_numpy(x), torch.from_numpy(cb), torch.ones(G, K), torch.from_numpy(cb.copy()),
                 layout="lapo", num_latents=L, backend="reference", training=False)
    assert nonfinite == 0 and np.array_equal(idx, ref.indices.numpy())
    for change, error in ((dict(x=x.astype(np.float64)), "x: expected dtype float32"),
                          (dict(out=out[:4]), "out: expected 1024 elements, got 512"),
                          (dict(indices=idx.astype(np.int32)), "indices: expected dtype int64"),
                          (dict(codebook=cb[0]), r"codebook must be \(G, K, d\)"),
                          (dict(counts=np.zeros((G, K + 1), np.float32)), "counts: expected 128 elements"),
                          (dict(ema_count=np.zeros((G, K), np.float32)), "both ema_count and ema_weight"),
                          (dict(strides=(G * d * L + 1, d * L, L, 1)), "strides reach outside x"),
                          (dict(x=np.asfortranarray(x)), "x: array must be C-contiguous"),
                          (dict(out=list(out.ravel())), "incompatible function arguments")):
        with pytest.raises((TypeError, ValueError), match=error):
            call(**change)


TRITON_SHAPES = [
    ("lapo", 6, 2, 64, 16, 4),
    ("lapo", 100, 2, 64, 16, 4),     # resident codebook, vector rows: 25 tiles over 3 persistent programs
    ("lapo", 5, 2, 64, 32, 4),       # resident, d=32
    ("grouped", 300, 1, 64, 16, 1),  # resident, contiguous rows of one group
    ("grouped", 1, 1, 8, 4, 1),      # resident, padded codes and dims: the strided path
    ("grouped", 70, 2, 100, 33, 1),  # general kernel: several code tiles, masked dims, a partial row tile
    ("grouped", 130, 1, 16, 100, 1), # general kernel: d in 4 chunks of 32 (GEMM search: 2 chunks of 64)
    ("grouped", 150, 1, 300, 8, 1),  # GEMM search: 5 code tiles, the last one ragged; 2 row tiles
    ("grouped", 100, 2, 300, 8, 1),  # GEMM search, 1 row tile: the codes split over 3 programs, then the rows
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_triton_kernel_matches_reference(shape, deterministic):
    run_pair("triton", *shape, steps=2, device=TRITON_DEVICE, deterministic=deterministic)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter stands in for an sm_80 GPU")
@pytest.mark.parametrize("shape", TRITON_SHAPES[:3], ids=lambda s: "-".join(map(str, s)))
def test_triton_kernel_with_sm80_tiles_matches_reference(shape, monkeypatch):
    from lapo_fast.ops import vq as vq_mod

    monkeypatch.setattr(vq_mod, "_launch_facts", lambda device: (None, 80))  # 16-row tiles, strided rows
    run_pair("triton", *shape, steps=2, device=TRITON_DEVICE)


def test_triton_plans_cover_both_kernels():
    from lapo_fast.ops.vq import triton_plan

    lapo = Layout.for_shape((65536, 128), 2, 16, "lapo", 4)
    h100 = triton_plan(lapo, 64, 16, False, sms=132, capability=90)
    assert h100.resident and h100.contiguous and h100.programs == 132 * 4 and h100.precision == "tf32x3"
    a100 = triton_plan(lapo, 64, 16, False, sms=108, capability=80)
    assert a100.resident and not a100.contiguous and a100.programs == 108 * 4
    a100_bf16 = triton_plan(lapo, 64, 16, False, sms=108, capability=80, x_dtype=torch.bfloat16)
    assert a100_bf16.contiguous and a100_bf16.block_n == 32 and h100.block_n == 32  # tiles by x's type
    assert triton_plan(lapo, 64, 16, False, sms=80, capability=70).precision == "ieee"  # no TF32 before sm_80
    big = triton_plan(Layout.for_shape((10, 512), 1, 512, "grouped", 1), 8192, 512, True, sms=132, capability=90)
    assert not big.resident and big.block_d == 32 and big.programs == 1  # 1 row tile
    tok = Layout.for_shape((65536, 64), 1, 64, "grouped", 1)  # a VQ-VAE tokenizer's codebook: the GEMM search
    gemm = triton_plan(tok, 8192, 64, False, sms=132, capability=90)
    assert gemm.gemm and not gemm.resident and (gemm.block_n, gemm.block_k, gemm.block_d) == (128, 64, 16)
    assert gemm.programs == 132 * 2 and triton_plan(tok, 8192, 32, False, 132, 90, torch.bfloat16).block_d == 32
    assert not triton_plan(tok, 8192, 64, True, sms=132, capability=90).gemm  # deterministic: per-program partials
    small = triton_plan(Layout.for_shape((4, 128), 2, 16, "lapo", 4), 64, 16, False, sms=None, capability=None)
    assert small.programs == 1 and small.tiles == 1


def test_every_target_is_in_the_table_and_an_unknown_gpu_is_an_error():
    from lapo_fast.ops.vq import TARGETS, LAUNCHERS, triton_plan

    lapo = Layout.for_shape((65536, 128), 2, 16, "lapo", 4)
    for capability, target in TARGETS.items():  # every listed target plans every kind it can meet
        plan = triton_plan(lapo, 64, 16, False, 100, capability)
        assert plan.kind in LAUNCHERS and plan.block_n == target.tiles["float32"][0]
        assert plan.precision == ("tf32x3" if target.tf32 else "ieee")
    assert triton_plan(lapo, 64, 16, False, 84, 86).block_n == 16  # sm_86: sm_80's tiles, not sm_90's
    with pytest.raises(ValueError, match=r"no Triton tiles for sm_61 .*backend='reference'"):
        triton_plan(lapo, 64, 16, False, 28, 61)


def test_sync_never_keeps_a_ranks_own_statistics_and_a_bad_value_is_refused():
    state = make_state(2, 64, 16)
    x = make_x("lapo", 8, 2, 16, 4, seed=1)
    with pytest.raises(ValueError, match="sync must be one of"):
        vq_ema(x, *state, layout="lapo", num_latents=4, sync="sometimes")
    a, b = [t.clone() for t in state], [t.clone() for t in state]
    vq_ema(x, *a, layout="lapo", num_latents=4, sync="never")
    vq_ema(x, *b, layout="lapo", num_latents=4)  # no process group: "auto" is "never"
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_sync_always_reduces_in_a_one_rank_group_and_auto_does_not(monkeypatch):
    """In a group of one rank a sum over ranks changes no number, so the reduction is watched: sync
    "always" all-reduces the batch statistics (the selftest's check of the reduction path), "auto"
    leaves a lone rank alone."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t.shape) or real(t, *a, **k))
        x = make_x("lapo", 8, 2, 16, 4, seed=1)
        for sync, reduced in (("auto", False), ("always", True)):
            calls.clear()
            vq_ema(x, *make_state(2, 64, 16), layout="lapo", num_latents=4, sync=sync)
            assert bool(calls) == reduced, (sync, calls)
    finally:
        dist.destroy_process_group()


def test_triton_backward_of_a_non_contiguous_input():
    """The saved x is read as flat memory by the backward kernel: a transposed x must still give
    the reference's gradient."""
    state = make_state(1, 16, 16)
    base = make_x("grouped", 16, 1, 16, 1, seed=5)  # (16, 16)
    grads = {}
    for backend in ("reference", "triton"):
        x = base.t().contiguous().t().clone().requires_grad_()  # column-major storage
        assert not x.is_contiguous()
        out = vq_ema(x, *[t.clone() for t in state], backend=backend, training=True)
        upstream = torch.linspace(-1, 1, 256).reshape(16, 16)
        ((out.quantized * upstream).sum() + 10 * out.loss).backward()
        grads[backend] = x.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-5, atol=1e-6)


def test_reference_under_autocast_stays_fp32():
    state, x = make_state(2, 64, 16), make_x("lapo", 256, 2, 16, 4, seed=9)
    plain = [t.clone() for t in state]
    a = vq_ema(x, *plain, layout="lapo", num_latents=4, backend="reference")
    auto = [t.clone() for t in state]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = vq_ema(x, *auto, layout="lapo", num_latents=4, backend="reference")
    assert torch.equal(a.indices, b.indices)
    for s, t in zip(plain, auto):
        assert torch.equal(s, t)


def test_launches_are_guarded_to_the_tensors_device(monkeypatch):
    from lapo_fast.ops import vq as vq_mod

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or __import__("contextlib").nullcontext())
    with vq_mod._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with vq_mod._device_guard(torch.device("cpu")):
        pass
    assert len(entered) == 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nonfinite_without_a_host_read_skips_the_update_and_poisons_the_loss(backend):
    """The CUDA policy (raise_nonfinite=False is its default there): no raise, state unchanged,
    the loss NaN for the caller's next read to see."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    state = make_state(2, 64, 16, device=device)
    before = [t.clone() for t in state]
    x = make_x("lapo", 40, 2, 16, 4, seed=0, device=device)
    x[31, 5] = float("nan")
    out = vq_ema(x, *state, layout="lapo", num_latents=4, backend=backend, raise_nonfinite=False)
    assert torch.isnan(out.loss)
    for a, b in zip(state, before):
        assert torch.equal(a, b)
    clean = vq_ema(torch.nan_to_num(x), *state, layout="lapo", num_latents=4, backend=backend,
                   raise_nonfinite=False)
    assert torch.isfinite(clean.loss) and not torch.equal(state[0], before[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(dtype):
    run_pair("cpu", "lapo", 64, 2, 64, 16, 4, steps=2, dtype=dtype)


def test_triton_half_inputs():
    run_pair("triton", "grouped", 20, 1, 16, 16, 1, steps=1, dtype=torch.float16, device=TRITON_DEVICE)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_eval_mode_leaves_state_alone(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    ref, fused = run_pair(backend, "lapo", 16, 2, 64, 16, 4, steps=1, training=False, device=device)
    init = make_state(2, 64, 16)
    for a, b in zip(fused, init):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("rows, K, d", [(20000, 64, 16), (300, 4096, 64)])  # many rows; few rows, much work each
def test_cpu_kernel_is_deterministic_across_thread_counts(rows, K, d):
    x = make_x("grouped", rows, 2, d, 1, seed=3)
    results = []
    for threads in (1, 2, 3):
        state = make_state(2, K, d)
        out = vq_ema(x, *state, backend="cpu", num_threads=threads)
        results.append((out, state))
    for out, state in results[1:]:
        assert torch.equal(out.indices, results[0][0].indices)
        for a, b in zip(state, results[0][1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ties_go_to_the_lowest_index(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    cb = torch.zeros(1, 20, 4)
    cb[0, 3] = cb[0, 11] = cb[0, 17] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    state = [cb.to(device), torch.ones(1, 20, device=device), cb.clone().to(device)]
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0]], device=device)
    out = vq_ema(x, *state, backend=backend, training=False)
    assert out.indices.flatten().tolist() == [3, 3]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises_and_keeps_state(backend, bad):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    state = make_state(2, 64, 16, device=device)
    before = [t.clone() for t in state]
    x = make_x("lapo", 8, 2, 16, 4, seed=0, device=device)
    x[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        vq_ema(x, *state, layout="lapo", num_latents=4, backend=backend)
    for a, b in zip(state, before):
        assert torch.equal(a, b)
    if backend == "cpu":  # never silent on the CPU, even when asked not to check
        with pytest.raises(ValueError, match="NaN or inf"):
            vq_ema(x, *state, layout="lapo", num_latents=4, backend=backend, check_finite=False)


def test_bad_arguments_raise():
    state = make_state(2, 64, 16)
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match="lapo layout"):
        vq_ema(torch.randn(4, 100), *state, layout="lapo", num_latents=4)
    with pytest.raises(ValueError, match="grouped layout"):
        vq_ema(torch.randn(4, 31), *state)
    with pytest.raises(TypeError, match="floating"):
        vq_ema(torch.ones(4, 32, dtype=torch.int64), *state)
    with pytest.raises(ValueError, match="float32"):
        vq_ema(x, state[0].double(), state[1], state[2], layout="lapo", num_latents=4)
    with pytest.raises(ValueError, match="unknown backend"):
        vq_ema(x, *state, layout="lapo", num_latents=4, backend="magic")
    with pytest.raises(ValueError, match="unknown layout"):
        vq_ema(x, *state, layout="sideways")
    with pytest.raises(ValueError, match="decay"):
        vq_ema(x, *state, layout="lapo", num_latents=4, decay=1.5)
    m = VectorQuantizerEMA()
    with pytest.raises(ValueError, match="indices"):
        m.lookup(torch.full((2, 2, 4), 64))


def test_module_matches_functional_and_lookup_inverts():
    torch.manual_seed(0)
    m = VectorQuantizerEMA(backend="cpu").eval()
    ref_state = [m.codebook.clone(), m.ema_count.clone(), m.ema_weight.clone()]
    x = make_x("lapo", 32, 2, 16, 4, seed=1)
    out = m(x)
    ref = vq_ema(x, *ref_state, layout="lapo", num_latents=4, backend="reference", training=False)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(m.lookup(out.indices), out.quantized)


def test_dead_codes_are_refilled_from_the_batch():
    m = VectorQuantizerEMA(1, 32, 8, 1, layout="grouped", dead_code_threshold=1.0, backend="cpu", decay=0.5)
    x = torch.randn(64, 8) * 0.01 + 3.0  # far from every initial code: one code takes all
    out = m(x)
    assert (m.ema_count >= 1.0 - 1e-6).all()
    rows = x.double()
    refilled = (m.ema_count[0] == 1.0).nonzero().squeeze(1)
    assert refilled.numel() >= 30
    for k in refilled.tolist():  # every refilled code is one of the batch's rows
        assert (rows - m.codebook[0, k].double()).abs().sum(-1).min() < 1e-6
    torch.testing.assert_close(m.ema_weight[0, refilled], m.codebook[0, refilled] * 1.0)
    assert out.perplexity.item() == pytest.approx(1.0)
    # The refill spreads the next batch over many codes.
    assert m(x).perplexity.item() > 10


def test_kmeans_init_fits_the_first_batch():
    x = make_x("grouped", 2000, 1, 16, 1, seed=5)
    plain = VectorQuantizerEMA(1, 8, 16, 1, layout="grouped", backend="cpu")
    km = VectorQuantizerEMA(1, 8, 16, 1, layout="grouped", backend="cpu", kmeans_init=True)
    err_plain = plain.eval()(x).loss.item()
    km.train()(x)
    assert bool(km.initialized)
    assert km.eval()(x).loss.item() < 0.2 * err_plain


def _ddp_worker(rank, world, init_file, backend, x, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    state = make_state(2, 64, 16)
    half = x.shape[0] // world
    for _ in range(2):
        vq_ema(x[rank * half:(rank + 1) * half], *state, layout="lapo", num_latents=4, backend=backend)
    torch.save(state, os.path.join(out_dir, f"state{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_ddp_two_ranks_equal_one_process_on_the_joined_batch(tmp_path, backend):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("gloo ranks share CPU tensors here; on GPUs the triton path runs under nccl")
    import torch.multiprocessing as mp

    x = make_x("lapo", 64, 2, 16, 4, seed=7)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), backend, x, str(tmp_path)), nprocs=2)
    single = make_state(2, 64, 16)
    for _ in range(2):
        vq_ema(x, *single, layout="lapo", num_latents=4, backend="reference")
    for rank in range(2):
        got = torch.load(tmp_path / f"state{rank}.pt")
        for a, b in zip(got, single):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_cpu_kernel_works_in_a_forked_child():
    import multiprocessing as mp

    x = make_x("grouped", 20000, 2, 16, 1, seed=4)
    state = make_state(2, 64, 16)
    parent = vq_ema(x, *[t.clone() for t in state], backend="cpu", num_threads=2)  # parent's pool exists
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as workers:
        child = workers.apply_async(_vq_in_child, (x.numpy(), [t.numpy() for t in state])).get(timeout=60)
    assert np.array_equal(child, parent.indices.numpy())


def _vq_in_child(x, state):
    # numpy in and out: torch's own intra-op threads are not fork-safe, and that is not under test.
    out = vq_ema(torch.from_numpy(x), *map(torch.from_numpy, state), backend="cpu", num_threads=2)
    return out.indices.numpy()


def _tf32(a: np.ndarray) -> np.ndarray:
    """What a TF32 tensor-core product sees of an fp32 operand: 10 mantissa bits (truncated)."""
    return (a.astype(np.float32).view(np.int32) & np.int32(-8192)).view(np.float32)


def _bf16(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 -> fp32, rounded to nearest even (Triton's conversion)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().float().numpy()


@pytest.mark.parametrize("x_dtype", [np.float32, "bf16", "bf16x3"])
def test_tensor_core_splits_keep_the_nearest_code(x_dtype):
    """The kernels' distance and sum products on tensor cores, emulated: TF32 operands, fp32 sums.
    tf32x3 for fp32 x; for 16-bit x (exact in TF32) two products with c's TF32 halves (the GEMM
    search), or, for bf16 x, three exact bf16 products with c in three bf16 pieces (the resident
    search); the one-hot sums with x's two halves. Each must pick a nearest code (within fp32
    rounding) and sum x to fp32 accuracy; a single TF32 product would not."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4096, 16)) * 0.1).astype(np.float32)
    if x_dtype != np.float32:
        x = _bf16(x)
    c = (x[rng.integers(0, 4096, 64)] + rng.standard_normal((64, 16)).astype(np.float32) * 1e-3).astype(np.float32)
    c_hi = _tf32(c)
    c_lo = c - c_hi
    if x_dtype == "bf16x3":
        c1 = _bf16(c)
        c2 = _bf16(c - c1)
        c3 = _bf16(c - c1 - c2)
        assert np.array_equal((c1 + c2) + c3, c)  # the three pieces hold all of c's bits
        assert not np.array_equal(c1 + c2, c)  # (two would not)
        dots = x @ c1.T + x @ c2.T + x @ c3.T  # bf16 x bf16 products are exact in fp32
    elif x_dtype == "bf16":
        dots = _tf32(x) @ _tf32(c_hi).T + _tf32(x) @ _tf32(c_lo).T
    else:
        x_hi = _tf32(x)
        x_lo = x - x_hi
        dots = x_hi @ _tf32(c_hi).T + x_hi @ _tf32(c_lo).T + _tf32(x_lo) @ _tf32(c_hi).T
    dist = (c.astype(np.float64) ** 2).sum(1)[None] - 2.0 * dots
    exact = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    picked = exact[np.arange(len(x)), dist.argmin(1)]
    tol = 1e-5 * (1 + (x.astype(np.float64) ** 2).sum(1) + (c.astype(np.float64) ** 2).sum(1).max())
    assert (picked - exact.min(1) <= tol).all()
    single = (c.astype(np.float64) ** 2).sum(1)[None] - 2.0 * (_tf32(x) @ _tf32(c).T)
    assert (exact[np.arange(len(x)), single.argmin(1)] - exact.min(1) > tol).any()  # the test can fail

    onehot = np.eye(64, dtype=np.float32)[exact.argmin(1)]
    x_hi = _tf32(x)
    sums = onehot.T @ x_hi + onehot.T @ _tf32(x - x_hi)
    truth = onehot.T.astype(np.float64) @ x.astype(np.float64)
    scale = onehot.T.astype(np.float64) @ np.abs(x.astype(np.float64))  # fp32 summation's own error scale
    assert (np.abs(sums - truth) <= 1e-6 * scale + 1e-12).all()
    one_product_error = np.abs(onehot.T @ x_hi - truth) > 1e-6 * scale
    assert one_product_error.any() if x_dtype == np.float32 else not one_product_error.any()  # 16-bit: exact


def _ddp_nan_worker(rank, world, init_file, backend, out_dir):
    import datetime

    import torch.distributed as dist

    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails the test, not CI
    torch.set_num_threads(1)
    state = make_state(2, 64, 16)
    before = [t.clone() for t in state]
    x = make_x("lapo", 8, 2, 16, 4, seed=rank)
    if rank == 1:
        x[2, 7] = float("nan")  # one rank's batch only
    outcome = "no error"
    try:
        vq_ema(x, *state, layout="lapo", num_latents=4, backend=backend)
    except ValueError as e:
        outcome = str(e)
    dist.barrier()  # both ranks get here: neither hangs in a collective the other skipped
    unchanged = all(torch.equal(a, b) for a, b in zip(state, before))
    with open(os.path.join(out_dir, f"nan{rank}.txt"), "w") as f:
        f.write(f"{outcome}|{unchanged}")
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_ddp_nan_on_one_rank_raises_on_every_rank(tmp_path, backend):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("gloo ranks share CPU tensors here; on GPUs the triton path runs under nccl")
    import torch.multiprocessing as mp

    mp.spawn(_ddp_nan_worker, args=(2, str(tmp_path / "init"), backend, str(tmp_path)), nprocs=2)
    for rank in range(2):
        outcome, unchanged = (tmp_path / f"nan{rank}.txt").read_text().split("|")
        assert "NaN or inf" in outcome, f"rank {rank}: {outcome}"
        assert unchanged == "True"  # no rank updated its codebook


def test_module_reads_its_initialised_flag_once(monkeypatch):
    m = VectorQuantizerEMA(kmeans_init=True, kmeans_iters=2).train()
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__",
                        lambda t: reads.append(t is m.initialized) or real_bool(t))
    for seed in range(3):
        m(make_x("lapo", 64, 2, 16, 4, seed=seed))
    assert reads.count(True) == 1 and bool(m.initialized.item())
    m.load_state_dict(m.state_dict())  # a loaded state is read once again
    m(make_x("lapo", 64, 2, 16, 4, seed=9))
    assert reads.count(True) == 2


def test_general_kernel_finds_nonfinite_rows_in_any_d_chunk():
    """The any-K/any-d kernel sees NaN in a later d chunk: raises on CPU tensors, else skips the update."""
    state = make_state(2, 100, 33, device=TRITON_DEVICE)
    before = [t.clone() for t in state]
    x = make_x("grouped", 70, 2, 33, 1, seed=1, device=TRITON_DEVICE)
    x[13, 65] = float("nan")  # group 1, dim 32 of its 33: the second chunk of 32
    out = vq_ema(x, *state, backend="triton", raise_nonfinite=False)
    assert torch.isnan(out.loss) and all(torch.equal(a, b) for a, b in zip(state, before))
    with pytest.raises(ValueError, match="NaN or inf"):
        vq_ema(x, *state, backend="triton", raise_nonfinite=True)


def test_a_skipped_nan_batch_refills_no_code_under_the_cuda_policy(monkeypatch):
    """On CUDA a NaN batch does not raise: the update is skipped, the loss is NaN. The dead-code
    refill after it must leave the codebook as it was (it used to copy NaN rows into every code)."""
    import functools

    import lapo_fast.ops.vq_module as vq_module

    monkeypatch.setattr(vq_module, "vq_ema", functools.partial(vq_module.vq_ema, raise_nonfinite=False))
    vq = VectorQuantizerEMA(2, 64, 16, 4, dead_code_threshold=0.01, backend="reference")
    vq(torch.randn(32, 128))  # a normal step first: every code then has a finite state
    before = [t.clone() for t in (vq.codebook, vq.ema_count, vq.ema_weight)]
    for bad in (torch.full((32, 128), float("nan")), torch.full((32, 128), 1e25)):
        out = vq(bad)
        assert torch.isnan(out.loss)
        for t, old in zip((vq.codebook, vq.ema_count, vq.ema_weight), before):
            assert torch.equal(t, old)
    assert torch.isfinite(vq(torch.randn(32, 128)).loss)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_float64_latents_are_quantised_in_fp32_and_returned_in_fp64(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, generator=g, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(2, 64, 16, generator=g)
    a = (cb.clone(), torch.ones(2, 64), cb.clone())
    b = (cb.clone(), torch.ones(2, 64), cb.clone())
    out = vq_ema(x, *a, layout="lapo", num_latents=4, backend=backend)
    ref = vq_ema(x.detach().float(), *b, layout="lapo", num_latents=4, backend="reference")
    assert out.quantized.dtype == torch.float64 and torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized.float(), ref.quantized)
    for s, r in zip(a, b):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-6)
    (out.quantized.sum() + out.loss).backward()
    assert x.grad.dtype == torch.float64 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_ema_rate_is_the_references_one_minus_decay(backend):
    """(1 - decay) is taken from the host's double, rounded once (torch's numbers): computed in
    fp32 it is 0.0009999871 for 0.999, and every EMA count and weight came out 1.3e-5 relative off."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    cb = torch.randn(2, 64, 16, generator=g)
    ours, ref = [(cb.clone(), torch.zeros(2, 64), cb.clone()) for _ in range(2)]
    vq_ema(x, *ours, layout="lapo", num_latents=4, decay=0.999, backend=backend)
    vq_ema(x, *ref, layout="lapo", num_latents=4, decay=0.999, backend="reference")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=3e-6, atol=1e-9)  # (fp32 decay: ema_weight 1.3e-5 off)


# -- torch.compile: the op as custom ops (fake implementations, autograd around them) -----------------

class _VQNet(torch.nn.Module):
    def __init__(self, backend="auto"):
        super().__init__()
        self.lin = torch.nn.Linear(128, 128)
        self.vq = VectorQuantizerEMA(dead_code_threshold=0.01, backend=backend)

    def forward(self, x):
        out = self.vq(self.lin(x))
        return (out.quantized - x).pow(2).mean() + out.loss, out


@pytest.mark.parametrize("compiler,backend", [("inductor", "cpu"), ("aot_eager", "reference"),
                                              ("aot_eager", "triton")])
def test_torch_compile_fullgraph_of_the_module_equals_eager(compiler, backend):
    """One graph (fullgraph=True): forward, the EMA update and dead-code refills in place, backward."""
    _compiled_matches_eager(compiler, backend, sizes=(64, 64, 64))


def _compiled_matches_eager(compiler: str, backend: str, sizes, dynamic=None) -> None:
    """_VQNet compiled as one graph vs eager over batches of `sizes`: losses, indices, the linear
    layer's gradient and the VQ's state (codebook, EMA statistics, refills)."""
    import copy

    torch._dynamo.reset()  # the other compile tests' graphs of the same code count toward its recompile limit
    torch.manual_seed(0)
    eager = _VQNet(backend)
    net = copy.deepcopy(eager)
    compiled = torch.compile(net, fullgraph=True, backend=compiler, dynamic=dynamic)
    for B in sizes:
        x = torch.randn(B, 128)
        (lc, oc), (le, oe) = compiled(x), eager(x)
        lc.backward()
        le.backward()
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
        assert torch.equal(oc.indices, oe.indices)
    torch.testing.assert_close(net.lin.weight.grad, eager.lin.weight.grad, rtol=1e-5, atol=1e-7)
    for name in ("codebook", "ema_count", "ema_weight", "refills"):
        torch.testing.assert_close(getattr(net.vq, name), getattr(eager.vq, name), rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_of_vq_ema_and_its_nonfinite_error():
    f = torch.compile(lambda x, cb, n, w: vq_ema(x, cb, n, w, layout="grouped"), fullgraph=True, backend="aot_eager")
    cb = torch.randn(2, 16, 8)
    state, twin = (cb.clone(), torch.zeros(2, 16), cb.clone()), (cb.clone(), torch.zeros(2, 16), cb.clone())
    x = torch.randn(10, 16)
    got, want = f(x, *state), vq_ema(x, *twin, layout="grouped")
    assert torch.equal(got.indices, want.indices)
    for a, b in zip(state, twin):
        torch.testing.assert_close(a, b)
    x[3, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        f(x, *state)
    for a, b in zip(state, twin):  # untouched by the refused batch
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiler,backend,dynamic", [("inductor", "cpu", None), ("aot_eager", "reference", None),
                                                      ("aot_eager", "cpu", True)])
def test_torch_compile_with_changing_batch_sizes_equals_eager(compiler, backend, dynamic):
    """A compiled training loop whose batch size changes (a smaller last batch): the second size is
    compiled with a symbolic batch (automatic dynamic shapes), which the layout's per-shape cache
    could not hash; every size matches eager."""
    _compiled_matches_eager(compiler, backend, sizes=(16, 12, 7), dynamic=dynamic)
