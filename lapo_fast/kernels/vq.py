"""Triton kernels of the fused EMA vector quantiser (the op and its dispatcher: lapo_fast/ops/vq.py).

A step launches a search (with the GEMM search for large codebooks: a code-norms kernel before it,
and a rows kernel after it when it splits the codes) and a finalize, with no host read; the
accumulators are zeroed by the allocation, or by the code-norms kernel. Which kernels, with which
tiles, is the dispatcher's plan (lapo_fast/ops/vq.py: triton_plan, LAUNCHERS).

vq_search_resident_kernel: codebooks small enough to live in registers (LAPO's 64 x 16). A
persistent kernel: program (p, g) loads codebook g and ||c||^2 once, then walks the row tiles
p, p + P, p + 2P, ... For each tile: distances ||c||^2 - 2 x.c on tensor cores (PRECISION
"tf32x3", a 3-term TF32 split as accurate as fp32 FMA), argmin with ties to the lowest index,
quantised rows and indices written, and the tile's code counts and one-hot^T x sums added into
registers. They leave the program once: relaxed atomics into the zeroed accumulators, or, in the
deterministic mode, stored as the program's own partial (the host sums partials in a fixed order).
With CONTIGUOUS, a tile is BLOCK_B whole batch entries, each a contiguous d*L run in memory (the
LAPO layout, and the grouped one with L = 1): loaded and stored with vector accesses and
transposed to (rows, d) in registers.

vq_search_kernel: any K and d. Codes in tiles of BLOCK_K, d in chunks of BLOCK_D (x chunks are
reloaded from L1/L2 per code tile); counts and sums are added per row tile, only for code tiles
the row tile used: relaxed atomics, or load-add-store into the program's own partial.

Both write, per program, the squared error of its rows (err, a (G, P) partial), add the rows
holding NaN/inf, or whose squared distance to their code overflows, to stats[2] (an integer count:
exact in any order), and program 0 of each group writes the sum of the group's old EMA counts (the
update needs it, and the finalize overwrites them).

vq_finalize_kernel: one program per (group, block of codes): the group's loss, perplexity and, for
its codes, the EMA update. With GUARD, a batch holding NaN/inf anywhere (or an overflowing distance)
leaves the state as it was and makes the loss NaN: the caller's next read of the loss sees it, and
no host read is needed here.

All offsets that can pass 2^31 are int64.
"""

import triton
import triton.language as tl


@triton.jit
def _zeroed(x):
    """x with NaN/inf as 0, so they cannot poison the argmin (which rows held any, the caller
    finds from the squared error: non-finite x makes it NaN or inf)."""
    return tl.where((x == x) & (tl.abs(x) < float("inf")), x, 0.0)


@triton.jit
def _row_error(x_raw, x, q, mask, CHECK_FINITE: tl.constexpr):
    """(squared error of each row, whether the row held NaN/inf or overflowed). With CHECK_FINITE
    the error of the raw x finds both in one reduction (a flagged row's error is then 0: the loss
    becomes NaN anyway); without, NaN/inf count as 0, as documented."""
    diff = tl.where(mask, (x_raw if CHECK_FINITE else x) - q, 0.0)
    row_err = tl.sum(diff * diff, axis=1)
    if CHECK_FINITE:
        bad = (row_err < float("inf")) == 0  # NaN or inf
        return tl.where(bad, 0.0, row_err), bad
    return row_err, row_err != row_err  # (all False: the error of zeroed x is finite unless it overflows)


@triton.jit
def _clean(x, mask):
    """x with NaN/inf zeroed (so they cannot poison the argmin), and which rows held any."""
    finite = (x == x) & (tl.abs(x) < float("inf"))
    bad_row = tl.sum(tl.where(mask & (finite == 0), 1, 0), axis=1) > 0
    return tl.where(finite, x, 0.0), bad_row


@triton.jit
def _tf32_hi(v):
    """The TF32 part of fp32 values (10 mantissa bits, truncated: what a TF32 product reads);
    v - _tf32_hi(v) is exact and is the low part."""
    return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _distance_dots(x_hi, x_lo, c_hi, c_lo, dots, SPLIT_X: tl.constexpr, PRECISION: tl.constexpr):
    """dots += x . c on tensor cores to fp32 accuracy: the 3-term TF32 split (x_hi c_hi + x_hi c_lo
    + x_lo c_hi) for fp32 x, 2 terms when x is 16-bit (exact in TF32); c is (d, codes)."""
    if PRECISION == "ieee":  # (before sm_80: fp32 FMAs; the halves add up to x and c exactly)
        dots = tl.dot(x_hi + x_lo, c_hi + c_lo, dots, input_precision="ieee")
    else:
        dots = tl.dot(x_hi, c_hi, dots, input_precision="tf32")
        dots = tl.dot(x_hi, c_lo, dots, input_precision="tf32")
        if SPLIT_X:
            dots = tl.dot(x_lo, c_hi, dots, input_precision="tf32")
    return dots


@triton.jit
def _store_old_total(ema_count_ptr, old_total_ptr, g, K, BLOCK_K: tl.constexpr):
    """The sum of group g's EMA counts before the update (the finalize needs it and overwrites them)."""
    total = 0.0
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        total += tl.sum(tl.load(ema_count_ptr + g * K + codes, mask=codes < K, other=0.0), axis=0)
    tl.store(old_total_ptr + g, total)


@triton.jit
def _tile_rows(tile, n_batch, L, BLOCK_N: tl.constexpr):
    rows = tl.cast(tile, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = rows // L
    return rows, b, rows - b * L, b < n_batch


@triton.jit
def vq_search_resident_kernel(
    x_ptr, out_ptr, idx_ptr, codebook_ptr, ema_count_ptr,
    counts_ptr, sums_ptr, stats_ptr, err_ptr, old_total_ptr,
    n_batch, K, d, G, L, num_tiles,
    stride_b, stride_g, stride_k, stride_l,
    ACCUMULATE_SUMS: tl.constexpr, DETERMINISTIC: tl.constexpr, CONTIGUOUS: tl.constexpr,
    L_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, CHECK_FINITE: tl.constexpr, NARROW: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    P = tl.num_programs(0)
    BLOCK_B: tl.constexpr = BLOCK_N // L_C
    codes = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    code_mask = codes < K
    dim_mask = dims < d
    cb_base = codebook_ptr + g * K * d
    c = tl.load(cb_base + codes[:, None] * d + dims[None, :],
                mask=code_mask[:, None] & dim_mask[None, :], other=0.0)
    cnorm = tl.where(code_mask, tl.sum(c * c, axis=1), float("inf"))  # padding codes never win
    # 16-bit x is exact in TF32, so x.c needs only c's two TF32 halves: 2 products, not tf32x3's 3.
    c_hi = _tf32_hi(c)
    c_hiT = tl.trans(c_hi)
    c_loT = tl.trans(c - c_hi)
    # bf16 x: c as three bf16 pieces (8 + 8 + 8 significant bits: all of fp32's 24), so x.c is three
    # exact bf16 products summed in fp32 -- half-width operands, one k-step for d=16
    BF16_X: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16 and PRECISION == "tf32x3"
    c1 = c.to(tl.bfloat16)
    r1 = c - c1.to(tl.float32)
    c2 = r1.to(tl.bfloat16)
    c3 = (r1 - c2.to(tl.float32)).to(tl.bfloat16)
    c1T, c2T, c3T = tl.trans(c1), tl.trans(c2), tl.trans(c3)
    if pid == 0:
        tl.store(old_total_ptr + g, tl.sum(tl.load(ema_count_ptr + g * K + codes, mask=code_mask, other=0.0), axis=0))

    # NARROW (a codebook of <= 1,024 values, atomic mode: registers to spare): the codes' counts as
    # a tensor-core product one-hot^T ones (every column holds the count), a few MMAs per tile
    # instead of a reduction over rows across threads; and fp32 x's halves shared (below).
    ones = tl.full((BLOCK_N, 16), 1.0, tl.float32)
    if not NARROW:
        acc_cnt = tl.zeros((BLOCK_K,), tl.float32)
    else:
        acc_cnt = tl.zeros((BLOCK_K, 16), tl.float32)
    acc_sum = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    err_rows = tl.zeros((BLOCK_N,), tl.float32)  # per row slot, summed once at the end: no per-tile block reduction
    bad_rows = tl.zeros((BLOCK_N,), tl.int32)
    for tile in range(pid, num_tiles, P):
        if CONTIGUOUS:  # BLOCK_B batch entries, each d*L contiguous values of group g
            bb = tl.cast(tile, tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
            seg = tl.arange(0, BLOCK_D * L_C)
            x_off = bb[:, None] * stride_b + g * stride_g + seg[None, :]
            seg_mask = (bb < n_batch)[:, None] & (seg < BLOCK_D * L_C)[None, :]
            xs = tl.load(x_ptr + x_off, mask=seg_mask, other=0.0)
            x = tl.reshape(tl.permute(tl.reshape(xs, (BLOCK_B, BLOCK_D, L_C)), (0, 2, 1)), (BLOCK_N, BLOCK_D))
            x = x.to(tl.float32)
            rows, b, l, row_mask = _tile_rows(tile, n_batch, L_C, BLOCK_N)
        else:
            # L_C: L as a constant divisor (shifts, not a division call), or 1: divide by the runtime L
            rows, b, l, row_mask = _tile_rows(tile, n_batch, L if L_C == 1 else L_C, BLOCK_N)
            x_off = b[:, None] * stride_b + g * stride_g + dims[None, :] * stride_k + l[:, None] * stride_l
            x = tl.load(x_ptr + x_off, mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
        mask = row_mask[:, None] & dim_mask[None, :]
        x_raw = x
        x = _zeroed(x_raw)

        # fp32 x on tensor cores: its TF32 halves serve the distances and, training, the sums. (Where
        # it does not train, or is not NARROW, Triton's own tf32x3 needs fewer registers on sm_80.)
        SPLIT_X: tl.constexpr = x_ptr.dtype.element_ty == tl.float32 and PRECISION == "tf32x3"
        SHARE_SPLIT: tl.constexpr = SPLIT_X and ACCUMULATE_SUMS and NARROW
        x_hi = _tf32_hi(x) if SPLIT_X else x
        x_lo = x - x_hi
        if BF16_X:
            xb = x.to(tl.bfloat16)  # exact: x was bf16
            dots = tl.dot(xb, c1T)
            dots = tl.dot(xb, c2T, dots)
            dots = tl.dot(xb, c3T, dots)
        elif SPLIT_X and not SHARE_SPLIT:
            dots = tl.dot(x, tl.trans(c), input_precision="tf32x3")
        else:
            dots = _distance_dots(x_hi, x_lo, c_hiT, c_loT, tl.zeros((BLOCK_N, BLOCK_K), tl.float32), SPLIT_X,
                                  PRECISION)
        dist = cnorm[None, :] - 2.0 * dots
        best = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int32)

        tl.store(idx_ptr + (b * G + g) * L + l, best.to(tl.int64), mask=row_mask)
        q = tl.load(cb_base + best[:, None] * d + dims[None, :], mask=mask, other=0.0)
        if CONTIGUOUS:
            q_out = q.to(out_ptr.dtype.element_ty)  # narrow before the shuffle: half the bytes for 16-bit x
            qs = tl.reshape(tl.permute(tl.reshape(q_out, (BLOCK_B, L_C, BLOCK_D)), (0, 2, 1)), (BLOCK_B, BLOCK_D * L_C))
            tl.store(out_ptr + x_off, qs, mask=seg_mask)
        else:
            tl.store(out_ptr + x_off, q.to(out_ptr.dtype.element_ty), mask=mask)
        row_err, bad_row = _row_error(x_raw, x, q, mask, CHECK_FINITE)
        err_rows += row_err
        bad_rows += tl.where(bad_row & row_mask, 1, 0)

        # (codes, rows); for 16-bit x in x's type (0/1 are exact in it), for the 16-bit products below
        X16: tl.constexpr = PRECISION == "tf32x3" and x_ptr.dtype.element_ty != tl.float32
        onehot_t = ((codes[:, None] == best[None, :]) & row_mask[None, :]).to(
            x_ptr.dtype.element_ty if X16 else tl.float32)
        if not NARROW:
            acc_cnt += tl.sum(onehot_t.to(tl.float32), axis=1)
        elif X16:
            acc_cnt = tl.dot(onehot_t, ones.to(x_ptr.dtype.element_ty), acc_cnt)  # exact: 0/1 and 1, fp32 sums
        else:
            acc_cnt = tl.dot(onehot_t, ones, acc_cnt, input_precision="tf32")  # 0/1 and 1: exact in TF32
        if ACCUMULATE_SUMS:  # per-code sums of x: one-hot^T x
            if X16:  # one-hot and 16-bit x are exact in their own type: one 16-bit product is exact
                acc_sum = tl.dot(onehot_t, x.to(x_ptr.dtype.element_ty), acc_sum)
            elif PRECISION == "tf32x3":  # one-hot is exact in TF32: two products of x's TF32 halves suffice
                acc_sum = tl.dot(onehot_t, x_hi, acc_sum, input_precision="tf32")
                acc_sum = tl.dot(onehot_t, x_lo, acc_sum, input_precision="tf32")
            else:
                acc_sum = tl.dot(onehot_t, x, acc_sum, input_precision=PRECISION)

    tl.store(err_ptr + g * P + pid, tl.sum(err_rows, axis=0))
    bad = tl.sum(bad_rows, axis=0)
    if bad > 0:
        tl.atomic_add(stats_ptr + 2, bad.to(tl.float32), sem="relaxed")
    if NARROW:
        acc_cnt = tl.max(acc_cnt, axis=1)
    s_off = (g * K + codes)[:, None] * d + dims[None, :]
    s_mask = code_mask[:, None] & dim_mask[None, :]
    if DETERMINISTIC:  # this program's partial, fully overwritten
        part = pid.to(tl.int64) * G * K
        tl.store(counts_ptr + part + g * K + codes, acc_cnt, mask=code_mask)
        if ACCUMULATE_SUMS:
            tl.store(sums_ptr + part * d + s_off, acc_sum, mask=s_mask)
    else:
        used = acc_cnt > 0
        tl.atomic_add(counts_ptr + g * K + codes, acc_cnt, mask=code_mask & used, sem="relaxed")
        if ACCUMULATE_SUMS:
            tl.atomic_add(sums_ptr + s_off, acc_sum, mask=s_mask & used[:, None], sem="relaxed")


@triton.jit
def vq_search_kernel(
    x_ptr, out_ptr, idx_ptr, codebook_ptr, ema_count_ptr,
    counts_ptr, sums_ptr, stats_ptr, err_ptr, old_total_ptr,
    n_batch, K, d, G, L: tl.constexpr, num_tiles,
    stride_b, stride_g, stride_k, stride_l,
    ACCUMULATE_SUMS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    P = tl.num_programs(0)
    dims = tl.arange(0, BLOCK_D)
    cb_base = codebook_ptr + g.to(tl.int64) * K * d
    if pid == 0:
        _store_old_total(ema_count_ptr, old_total_ptr, g, K, BLOCK_K)
    part = pid.to(tl.int64) * 0
    if DETERMINISTIC:
        part = pid.to(tl.int64) * G * K  # this program's partial slice

    err = 0.0
    bad = 0
    for tile in range(pid, num_tiles, P):
        rows, b, l, row_mask = _tile_rows(tile, n_batch, L, BLOCK_N)
        row_off = b * stride_b + g * stride_g + l * stride_l
        best_val = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_mask = codes < K
            dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            cnorm = tl.zeros((BLOCK_K,), tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dm = (d0 + dims) < d
                xc = tl.load(x_ptr + row_off[:, None] + (d0 + dims)[None, :] * stride_k,
                             mask=row_mask[:, None] & dm[None, :], other=0.0).to(tl.float32)
                xc, _ = _clean(xc, row_mask[:, None] & dm[None, :])
                c = tl.load(cb_base + codes[:, None] * d + (d0 + dims)[None, :],
                            mask=code_mask[:, None] & dm[None, :], other=0.0)
                cnorm += tl.sum(c * c, axis=1)
                dots += tl.dot(xc, tl.trans(c), input_precision=PRECISION)
            dist = tl.where(code_mask, cnorm, float("inf"))[None, :] - 2.0 * dots
            tile_min = tl.min(dist, axis=1)
            tile_arg = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int32) + k0
            better = tile_min < best_val  # strict: an earlier code tile keeps ties
            best_val = tl.where(better, tile_min, best_val)
            best = tl.where(better, tile_arg, best)

        tl.store(idx_ptr + (b * G + g) * L + l, best.to(tl.int64), mask=row_mask)
        bad_row = tl.zeros((BLOCK_N,), tl.int1)  # rows holding NaN/inf (they counted as zeros above)
        row_err = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dm = (d0 + dims) < d
            m = row_mask[:, None] & dm[None, :]
            off = row_off[:, None] + (d0 + dims)[None, :] * stride_k
            xc, bad_chunk = _clean(tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32), m)
            bad_row = bad_row | bad_chunk
            q = tl.load(cb_base + best[:, None] * d + (d0 + dims)[None, :], mask=m, other=0.0)
            tl.store(out_ptr + off, q.to(out_ptr.dtype.element_ty), mask=m)
            diff = tl.where(m, xc - q, 0.0)
            row_err += tl.sum(diff * diff, axis=1)
        err += tl.sum(row_err, axis=0)
        bad_row = bad_row | (row_err == float("inf"))  # |x| so large its distance overflows: non-finite too
        bad += tl.sum(tl.where(bad_row & row_mask, 1, 0), axis=0)

        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_mask = codes < K
            onehot = ((best[:, None] == codes[None, :]) & row_mask[:, None]).to(tl.float32)
            cnt = tl.sum(onehot, axis=0)
            if tl.sum(cnt, axis=0) > 0:  # most code tiles see none of a tile's rows when K is large
                c_off = part + g * K + codes
                if DETERMINISTIC:
                    old = tl.load(counts_ptr + c_off, mask=code_mask, other=0.0)
                    tl.store(counts_ptr + c_off, old + cnt, mask=code_mask)
                else:
                    tl.atomic_add(counts_ptr + c_off, cnt, mask=code_mask & (cnt > 0), sem="relaxed")
                if ACCUMULATE_SUMS:
                    for d0 in range(0, d, BLOCK_D):
                        dm = (d0 + dims) < d
                        m = row_mask[:, None] & dm[None, :]
                        xc, _ = _clean(tl.load(x_ptr + row_off[:, None] + (d0 + dims)[None, :] * stride_k,
                                               mask=m, other=0.0).to(tl.float32), m)
                        s = tl.dot(tl.trans(onehot), xc, input_precision=PRECISION)
                        s_off = c_off[:, None] * d + (d0 + dims)[None, :]
                        s_mask = code_mask[:, None] & dm[None, :]
                        if DETERMINISTIC:
                            tl.store(sums_ptr + s_off, tl.load(sums_ptr + s_off, mask=s_mask, other=0.0) + s,
                                     mask=s_mask)
                        else:
                            tl.atomic_add(sums_ptr + s_off, s, mask=s_mask & (cnt > 0)[:, None], sem="relaxed")

    tl.store(err_ptr + g * P + pid, err)
    if bad > 0:
        tl.atomic_add(stats_ptr + 2, bad.to(tl.float32), sem="relaxed")


@triton.jit
def vq_finalize_kernel(
    counts_ptr, sums_ptr, ema_count_ptr, ema_weight_ptr, codebook_ptr,
    stats_ptr, err_ptr, old_total_ptr,
    K, d, G, P, numel, decay, rate, eps, commitment,
    UPDATE: tl.constexpr, GUARD: tl.constexpr, PER_GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """stats: [loss, perplexity (summed over groups), rows with NaN/inf]; with PER_GROUP (a fixed
    summation order for the deterministic mode) the loss and perplexity of group g go to
    stats[3 + g] and stats[3 + G + g] instead, for the host to sum."""
    g = tl.program_id(0)
    kb = tl.program_id(1)
    bad = tl.load(stats_ptr + 2)  # the search's count (all ranks' under DDP)

    rows = 0.0  # the batch's rows: the sum of this group's counts
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        rows += tl.sum(tl.load(counts_ptr + g * K + codes, mask=codes < K, other=0.0), axis=0)

    if kb == 0:
        err = 0.0
        for t0 in range(0, P, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            err += tl.sum(tl.load(err_ptr + g * P + t, mask=t < P, other=0.0), axis=0)
        loss = err * commitment / numel
        if GUARD:
            loss = tl.where(bad > 0, float("nan"), loss)
        entropy = 0.0
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            p = tl.load(counts_ptr + g * K + codes, mask=codes < K, other=0.0) / tl.maximum(rows, 1.0)
            entropy += tl.sum(tl.where(codes < K, -p * tl.log(p + 1e-10), 0.0), axis=0)
        if PER_GROUP:
            tl.store(stats_ptr + 3 + g, loss)
            tl.store(stats_ptr + 3 + G + g, tl.exp(entropy))
        else:
            tl.atomic_add(stats_ptr, loss, sem="relaxed")
            tl.atomic_add(stats_ptr + 1, tl.exp(entropy), sem="relaxed")

    if GUARD:
        apply = bad == 0
    else:
        apply = bad > -1.0
    if UPDATE:
        if apply:
            total = decay * tl.load(old_total_ptr + g) + rate * rows  # sum of decayed counts
            codes = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            code_mask = codes < K
            cnt = tl.load(counts_ptr + g * K + codes, mask=code_mask, other=0.0)
            c = decay * tl.load(ema_count_ptr + g * K + codes, mask=code_mask, other=0.0) + rate * cnt
            c = (c + eps) / (total + K * eps) * total  # Laplace smoothing
            tl.store(ema_count_ptr + g * K + codes, c, mask=code_mask)
            dims = tl.arange(0, BLOCK_D)
            for d0 in range(0, d, BLOCK_D):
                m = code_mask[:, None] & ((d0 + dims) < d)[None, :]
                off = (g * K + codes).to(tl.int64)[:, None] * d + (d0 + dims)[None, :]
                w = decay * tl.load(ema_weight_ptr + off, mask=m, other=0.0) \
                    + rate * tl.load(sums_ptr + off, mask=m, other=0.0)
                tl.store(ema_weight_ptr + off, w, mask=m)
                tl.store(codebook_ptr + off, w / c[:, None], mask=m)


@triton.jit
def vq_backward_kernel(grad_q_ptr, x_ptr, q_ptr, grad_x_ptr, coef_ptr, numel, BLOCK: tl.constexpr):
    """grad_x = grad_q + coef * (x - q) over contiguous tensors."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    coef = tl.load(coef_ptr)
    gq = tl.load(grad_q_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offs, (gq + coef * (x - q)).to(grad_x_ptr.dtype.element_ty), mask=m)


@triton.jit
def vq_code_norms_kernel(codebook_ptr, ema_count_ptr, cnorm_ptr, c_split_ptr, old_total_ptr,
                         counts_ptr, sums_ptr, stats_ptr, K, d, G, K_PAD, D_PAD,
                         ZERO_SUMS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Before vq_search_gemm_kernel, once per step, program (g, block of BLOCK_K codes): the
    search's operands, padded so that its tiles load without masks: ||c||^2 of the codes (+inf for
    the padding codes, which then never win) into cnorm (G, K_PAD), and their TF32 halves
    transposed, hi into c_split[0, g] and lo into c_split[1, g], each (D_PAD, K_PAD) with zeros in
    the padding: split once per step, not once per row tile. Block 0 also sums the group's old EMA
    counts (the finalize needs the sum and overwrites the counts). It zeroes the search's
    accumulators -- the codes' counts (and sums), and in program (0, 0) the stats -- so the step
    needs no zero-fill launch."""
    g = tl.program_id(0)
    kb = tl.program_id(1)
    codes = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    dims = tl.arange(0, BLOCK_D)
    tl.store(counts_ptr + g * K + codes, tl.zeros((BLOCK_K,), tl.float32), mask=code_mask)
    if g + kb == 0:
        tl.store(stats_ptr + tl.arange(0, 4), tl.zeros((4,), tl.float32), mask=tl.arange(0, 4) < 3)
    plane = tl.cast(D_PAD, tl.int64) * K_PAD
    hi_base = c_split_ptr + g * plane
    lo_base = hi_base + G * plane
    norm = tl.zeros((BLOCK_K,), tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        c = tl.load(codebook_ptr + (g * K + codes).to(tl.int64)[:, None] * d + (d0 + dims)[None, :],
                    mask=code_mask[:, None] & ((d0 + dims) < d)[None, :], other=0.0)
        norm += tl.sum(c * c, axis=1)
        if ZERO_SUMS:
            tl.store(sums_ptr + (g * K + codes).to(tl.int64)[:, None] * d + (d0 + dims)[None, :], tl.zeros_like(c),
                     mask=code_mask[:, None] & ((d0 + dims) < d)[None, :])
        hi = _tf32_hi(c)
        t_off = (d0 + dims)[None, :] * K_PAD + codes[:, None]
        tl.store(hi_base + t_off, hi)
        tl.store(lo_base + t_off, c - hi)
    tl.store(cnorm_ptr + g * K_PAD + codes, tl.where(code_mask, norm, float("inf")))
    if kb == 0:
        _store_old_total(ema_count_ptr, old_total_ptr, g, K, BLOCK_K)


@triton.jit
def _gemm_rows_done(best, rows, b, l, row_mask, x_ptr, out_ptr, idx_ptr, codebook_ptr, counts_ptr, sums_ptr,
                    g, G, K, d, L, stride_b, stride_g, stride_k, stride_l,
                    ACCUMULATE_SUMS: tl.constexpr, CHECK_FINITE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """A row tile whose nearest codes are known: indices, q, each row's count (and, training, its
    x) added atomically to its code's accumulators; returns (the tile's squared error, its rows
    holding NaN/inf or overflowing)."""
    dims = tl.arange(0, BLOCK_D)
    g_codes = tl.cast(g, tl.int64) * K
    row_off = b * stride_b + g * stride_g + l * stride_l
    tl.store(idx_ptr + (b * G + g) * L + l, best.to(tl.int64), mask=row_mask)
    tl.atomic_add(counts_ptr + g_codes + best, tl.full((BLOCK_N,), 1.0, tl.float32), mask=row_mask, sem="relaxed")
    bad_row = tl.zeros((BLOCK_N,), tl.int1)
    row_err = tl.zeros((BLOCK_N,), tl.float32)
    q_row = (g_codes + best)[:, None] * d
    for d0 in range(0, d, BLOCK_D):
        m = row_mask[:, None] & ((d0 + dims) < d)[None, :]
        off = row_off[:, None] + (d0 + dims)[None, :] * stride_k
        x_raw = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        xc = _zeroed(x_raw)
        q = tl.load(codebook_ptr + q_row + (d0 + dims)[None, :], mask=m, other=0.0)
        tl.store(out_ptr + off, q.to(out_ptr.dtype.element_ty), mask=m)
        chunk_err, bad_chunk = _row_error(x_raw, xc, q, m, CHECK_FINITE)
        row_err += chunk_err
        bad_row = bad_row | bad_chunk
        if ACCUMULATE_SUMS:
            tl.atomic_add(sums_ptr + q_row + (d0 + dims)[None, :], xc, mask=m, sem="relaxed")
    if CHECK_FINITE:  # a sum of finite chunks can still overflow
        bad_row = bad_row | (row_err == float("inf"))
    return tl.sum(tl.where(bad_row, 0.0, row_err), axis=0), tl.sum(tl.where(bad_row & row_mask, 1, 0), axis=0)


@triton.jit
def vq_search_gemm_kernel(
    x_ptr, out_ptr, idx_ptr, codebook_ptr, cnorm_ptr, c_split_ptr,
    counts_ptr, sums_ptr, stats_ptr, err_ptr, part_val_ptr, part_idx_ptr,
    n_batch, K, d, G, L: tl.constexpr, num_tiles, K_PAD, D_PAD, codes_per_split, rows_pad,
    stride_b, stride_g, stride_k, stride_l,
    ACCUMULATE_SUMS: tl.constexpr, SPLIT_X: tl.constexpr, ONE_CHUNK: tl.constexpr, SPLIT_CODES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
):
    """The search for large codebooks (tokenizers: thousands of codes), as a GEMM with an argmin
    epilogue; the default (atomic) mode. Persistent over row tiles; per code tile the distances
    ||c||^2 - 2 x.c come from tensor cores (c's TF32 halves and norms, padded, from
    vq_code_norms_kernel) and each (row, column) keeps its running minimum and the code tile it
    came from -- three instructions per (row, code), no cross-thread reduction until the row
    tile's codes are all seen. Then the nearest code (ties: the lowest index) and _gemm_rows_done.
    With SPLIT_CODES (few row tiles: program (p, g, s) takes codes_per_split of the codes, so that
    every multiprocessor works) each row's nearest code in the split and its distance go to the
    partials, and vq_gemm_rows_kernel finishes. With ONE_CHUNK (d <= BLOCK_D) the row tile is
    loaded and split once; else x is re-read per code tile, chunk by chunk, from L1/L2."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    P = tl.num_programs(0)
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_K)
    plane = tl.cast(D_PAD, tl.int64) * K_PAD
    hi_base = c_split_ptr + g * plane
    lo_base = hi_base + G * plane
    norm_base = cnorm_ptr + g * K_PAD
    c_tile = dims[:, None] * K_PAD + cols[None, :]  # a (d, codes) tile of the transposed halves
    k_start = split * codes_per_split
    k_end = tl.minimum(k_start + codes_per_split, K_PAD)
    err = 0.0
    bad = 0
    for tile in range(pid, num_tiles, P):
        rows, b, l, row_mask = _tile_rows(tile, n_batch, L, BLOCK_N)
        row_off = b * stride_b + g * stride_g + l * stride_l
        if ONE_CHUNK:
            m = row_mask[:, None] & (dims < d)[None, :]
            x = _zeroed(tl.load(x_ptr + row_off[:, None] + dims[None, :] * stride_k, mask=m, other=0.0)
                        .to(tl.float32))
            x_hi = _tf32_hi(x) if SPLIT_X else x
            x_lo = x - x_hi
        best_val = tl.full((BLOCK_N, BLOCK_K), float("inf"), tl.float32)
        best_k0 = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            if ONE_CHUNK:
                dots = _distance_dots(x_hi, x_lo, tl.load(hi_base + k0 + c_tile), tl.load(lo_base + k0 + c_tile),
                                      dots, SPLIT_X, PRECISION)
            else:
                for d0 in range(0, D_PAD, BLOCK_D):
                    m = row_mask[:, None] & ((d0 + dims) < d)[None, :]
                    xc = _zeroed(tl.load(x_ptr + row_off[:, None] + (d0 + dims)[None, :] * stride_k, mask=m,
                                         other=0.0).to(tl.float32))
                    xc_hi = _tf32_hi(xc) if SPLIT_X else xc
                    at = d0 * K_PAD + k0
                    dots = _distance_dots(xc_hi, xc - xc_hi, tl.load(hi_base + at + c_tile),
                                          tl.load(lo_base + at + c_tile), dots, SPLIT_X, PRECISION)
            dist = tl.load(norm_base + k0 + cols)[None, :] - 2.0 * dots
            better = dist < best_val  # strict: an earlier code tile keeps a tie
            best_val = tl.where(better, dist, best_val)
            best_k0 = tl.where(better, k0, best_k0)
        nearest = tl.min(best_val, axis=1)
        best = tl.min(tl.where(best_val == nearest[:, None], best_k0 + cols[None, :], 2147483647), axis=1)
        best = tl.minimum(best, K - 1)  # no column matched (NaN distances of a non-finite codebook): in bounds
        if SPLIT_CODES:
            part = (split * G + g).to(tl.int64) * rows_pad + rows
            tl.store(part_val_ptr + part, nearest, mask=row_mask)
            tl.store(part_idx_ptr + part, best, mask=row_mask)
        else:
            tile_err, tile_bad = _gemm_rows_done(best, rows, b, l, row_mask, x_ptr, out_ptr, idx_ptr, codebook_ptr,
                                                 counts_ptr, sums_ptr, g, G, K, d, L, stride_b, stride_g, stride_k,
                                                 stride_l, ACCUMULATE_SUMS, CHECK_FINITE, BLOCK_N, BLOCK_D)
            err += tile_err
            bad += tile_bad

    if not SPLIT_CODES:
        tl.store(err_ptr + g * P + pid, err)
        if bad > 0:
            tl.atomic_add(stats_ptr + 2, bad.to(tl.float32), sem="relaxed")


@triton.jit
def vq_gemm_rows_kernel(
    x_ptr, out_ptr, idx_ptr, codebook_ptr, counts_ptr, sums_ptr, stats_ptr, err_ptr, part_val_ptr, part_idx_ptr,
    n_batch, K, d, G, L: tl.constexpr, num_tiles, rows_pad,
    stride_b, stride_g, stride_k, stride_l,
    SPLITS: tl.constexpr, ACCUMULATE_SUMS: tl.constexpr, CHECK_FINITE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """After a vq_search_gemm_kernel that split the codes: each row's nearest code over the splits'
    partials (taken in code order, strictly smaller only: ties keep the lowest index), then
    _gemm_rows_done. Persistent over row tiles like the search."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    P = tl.num_programs(0)
    err = 0.0
    bad = 0
    for tile in range(pid, num_tiles, P):
        rows, b, l, row_mask = _tile_rows(tile, n_batch, L, BLOCK_N)
        at = g.to(tl.int64) * rows_pad + rows
        best_val = tl.load(part_val_ptr + at, mask=row_mask, other=0.0)
        best = tl.load(part_idx_ptr + at, mask=row_mask, other=0)
        for s in tl.range(1, SPLITS, loop_unroll_factor=1):  # not unrolled by Triton: 16 splits spilled
            part = (s * G + g).to(tl.int64) * rows_pad + rows
            val = tl.load(part_val_ptr + part, mask=row_mask, other=0.0)
            better = val < best_val
            best_val = tl.where(better, val, best_val)
            best = tl.where(better, tl.load(part_idx_ptr + part, mask=row_mask, other=0), best)
        tile_err, tile_bad = _gemm_rows_done(best, rows, b, l, row_mask, x_ptr, out_ptr, idx_ptr, codebook_ptr,
                                             counts_ptr, sums_ptr, g, G, K, d, L, stride_b, stride_g, stride_k,
                                             stride_l, ACCUMULATE_SUMS, CHECK_FINITE, BLOCK_N, BLOCK_D)
        err += tile_err
        bad += tile_bad
    tl.store(err_ptr + g * P + pid, err)
    if bad > 0:
        tl.atomic_add(stats_ptr + 2, bad.to(tl.float32), sem="relaxed")
