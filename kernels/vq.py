"""Triton kernels of the fused EMA vector quantiser (see lapo_fast/ops/vq.py for the op).

vq_search_kernel: one program per (tile of BLOCK_N rows, codebook group). It loads the tile once
(through the strided layout of lapo_fast/ops/vq_layout.py), scans the codes in tiles of BLOCK_K
computing ||c||^2 - 2 x.c in fp32 (no N x K matrix in memory), keeps the running argmin (ties to the
lowest index), writes the quantised rows and indices, and adds the tile's per-code counts and sums
(one-hot^T @ x) into the accumulators: with one atomic per used code per tile, or, in the
deterministic mode, into per-tile partials that the host sums in a fixed order.

vq_ema_finalize_kernel: one program per group: loss and NaN count from the search's per-tile
partials, perplexity of the batch counts, then (unless the input had NaN/inf) the EMA update of
counts (with Laplace smoothing), weights and codes. So a training step is three launches: one
zero-fill of the accumulators, the search, the finalize.

vq_backward_kernel: grad_x = grad_q + coef * (x - q), one elementwise pass.
"""

import triton
import triton.language as tl


@triton.jit
def vq_search_kernel(
    x_ptr, out_ptr, idx_ptr, codebook_ptr,
    counts_ptr, sums_ptr, err_ptr, bad_ptr,
    n_rows, K, d, G, L,
    stride_b, stride_g, stride_k, stride_l,
    ACCUMULATE_SUMS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_tiles = tl.num_programs(0)

    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < n_rows
    b = rows // L
    l = rows % L
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    mask = row_mask[:, None] & dim_mask[None, :]
    x_off = b[:, None] * stride_b + g * stride_g + dims[None, :] * stride_k + l[:, None] * stride_l
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)

    # Non-finite rows are counted (the host raises) and zeroed so they cannot poison the argmin.
    finite = (x == x) & (tl.abs(x) < float("inf"))
    bad_row = tl.sum(tl.where(mask & (finite == 0), 1, 0), axis=1) > 0
    x = tl.where(finite, x, 0.0)

    cb_base = codebook_ptr + g * K * d
    best_val = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        c = tl.load(cb_base + codes[:, None] * d + dims[None, :],
                    mask=code_mask[:, None] & dim_mask[None, :], other=0.0)
        # ||c||^2 on the fly (the tile is loaded anyway): no separate launch; padding never wins.
        cnorm = tl.where(code_mask, tl.sum(c * c, axis=1), float("inf"))
        dots = tl.dot(x, tl.trans(c), input_precision="ieee")
        dist = cnorm[None, :] - 2.0 * dots
        tile_min = tl.min(dist, axis=1)
        tile_arg = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int32) + k0
        better = tile_min < best_val  # strict: an earlier tile keeps ties
        best_val = tl.where(better, tile_min, best_val)
        best_idx = tl.where(better, tile_arg, best_idx)

    tl.store(idx_ptr + (b * G + g) * L + l, best_idx.to(tl.int64), mask=row_mask)
    q = tl.load(cb_base + best_idx[:, None] * d + dims[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + x_off, q.to(out_ptr.dtype.element_ty), mask=mask)
    diff = tl.where(mask, x - q, 0.0)
    tl.store(err_ptr + g * num_tiles + pid, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    tl.store(bad_ptr + g * num_tiles + pid, tl.sum(tl.where(bad_row & row_mask, 1, 0), axis=0))

    # Counts are needed in eval mode too (perplexity); sums only when training.
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        onehot = ((best_idx[:, None] == codes[None, :]) & row_mask[:, None]).to(tl.float32)
        cnt = tl.sum(onehot, axis=0)
        if DETERMINISTIC:
            tl.store(counts_ptr + (pid * G + g) * K + codes, cnt, mask=code_mask)
        else:
            tl.atomic_add(counts_ptr + g * K + codes, cnt, mask=code_mask & (cnt > 0))
        if ACCUMULATE_SUMS:
            s = tl.dot(tl.trans(onehot), x, input_precision="ieee")
            s_mask = code_mask[:, None] & dim_mask[None, :]
            if DETERMINISTIC:
                s_off = ((pid * G + g) * K + codes)[:, None] * d + dims[None, :]
                tl.store(sums_ptr + s_off, s, mask=s_mask)
            else:
                s_off = (g * K + codes)[:, None] * d + dims[None, :]
                tl.atomic_add(sums_ptr + s_off, s, mask=s_mask & (cnt > 0)[:, None])


@triton.jit
def vq_ema_finalize_kernel(
    counts_ptr, sums_ptr, ema_count_ptr, ema_weight_ptr, codebook_ptr,
    err_ptr, bad_ptr, stats_ptr,
    K, d, G, tiles, numel, decay, eps, commitment,
    UPDATE: tl.constexpr, GUARD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """stats (zeroed by the host) receives [loss, perplexity summed over groups, rows with NaN/inf]."""
    g = tl.program_id(0)
    # The search kernel's per-tile partials: this group's squared error, and every group's bad
    # rows (so all programs agree on whether to update).
    err = 0.0
    bad = 0
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        err += tl.sum(tl.load(err_ptr + g * tiles + t, mask=t < tiles, other=0.0), axis=0)
        for h in range(0, G):
            bad += tl.sum(tl.load(bad_ptr + h * tiles + t, mask=t < tiles, other=0), axis=0)
    tl.atomic_add(stats_ptr, err * commitment / numel)
    if g == 0:
        tl.store(stats_ptr + 2, bad.to(tl.float32))

    rows = 0.0   # the batch's rows (all ranks' under DDP): the sum of its counts
    total = 0.0  # sum of the decayed EMA counts
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        cnt = tl.load(counts_ptr + g * K + codes, mask=code_mask, other=0.0)
        rows += tl.sum(cnt, axis=0)
        if UPDATE:
            old = tl.load(ema_count_ptr + g * K + codes, mask=code_mask, other=0.0)
            total += tl.sum(tl.where(code_mask, decay * old + (1.0 - decay) * cnt, 0.0), axis=0)
    entropy = 0.0
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        p = tl.load(counts_ptr + g * K + codes, mask=code_mask, other=0.0) / tl.maximum(rows, 1.0)
        entropy += tl.sum(tl.where(code_mask, -p * tl.log(p + 1e-10), 0.0), axis=0)
    tl.atomic_add(stats_ptr + 1, tl.exp(entropy))

    # With GUARD, non-finite input leaves the state as it was (the host raises): every store below
    # writes back the old value then.
    keep_old = 0.0
    if GUARD:
        keep_old = tl.where(bad > 0, 1.0, 0.0)
    if UPDATE:
        dims = tl.arange(0, BLOCK_D)
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_mask = codes < K
            cnt = tl.load(counts_ptr + g * K + codes, mask=code_mask, other=0.0)
            old = tl.load(ema_count_ptr + g * K + codes, mask=code_mask, other=0.0)
            c = decay * old + (1.0 - decay) * cnt
            c = (c + eps) / (total + K * eps) * total
            keep = (tl.zeros_like(c) + keep_old) > 0
            tl.store(ema_count_ptr + g * K + codes, tl.where(keep, old, c), mask=code_mask)
            for j0 in range(0, d, BLOCK_D):
                dj = j0 + dims
                m = code_mask[:, None] & (dj < d)[None, :]
                off = (g * K + codes)[:, None] * d + dj[None, :]
                old_w = tl.load(ema_weight_ptr + off, mask=m, other=0.0)
                w = decay * old_w + (1.0 - decay) * tl.load(sums_ptr + off, mask=m, other=0.0)
                keep2 = (tl.zeros_like(w) + keep_old) > 0
                old_code = tl.load(codebook_ptr + off, mask=m, other=0.0)
                tl.store(ema_weight_ptr + off, tl.where(keep2, old_w, w), mask=m)
                tl.store(codebook_ptr + off, tl.where(keep2, old_code, w / c[:, None]), mask=m)


@triton.jit
def vq_backward_kernel(grad_q_ptr, x_ptr, q_ptr, grad_x_ptr, coef_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    coef = tl.load(coef_ptr)
    gq = tl.load(grad_q_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offs, (gq + coef * (x - q)).to(grad_x_ptr.dtype.element_ty), mask=m)
