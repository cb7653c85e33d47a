"""Triton kernels of the contrastive loss engine (launchers live in triton_engine.py).

Gradients in the forward (the GEMMs run through torch; these kernels do the O(B*D) and O(R*N) work
around them): `inverse_norms_kernel`, `xent_rows_kernel` (row lse, loss and P - Y of one logit chunk),
`finish_kernel` (the normalisation's Jacobian, dL/dtau terms) and `scale_kernel` (the backward).

The recompute kernels (`row_lse_partial_kernel`, `lse_merge_kernel`, `softmax_probs_kernel`) recompute
score tiles S = q_rows @ c_cols^T over the full feature dimension in fp32 and
fold the scales in afterwards: s_ij = row_scale_i * col_scale_j * <q_i, c_j>. Row/column indices
are wrapped (`offs % M`) so every load is in bounds and unmasked; wrapped lanes are masked out of
every reduction and store. `UPCAST` converts tiles to fp32 right after the load: the interpreter's
bf16 `tl.dot` is wrong, the GPU's is what we want. No block pointers (removed in triton 3.9).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _score_tile(
    q_ptr,
    c_ptr,
    rows,
    cols,
    D,
    stride_q,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """<q_i, c_j> for a BLOCK_M x BLOCK_N tile, accumulated in fp32 over D (rows/cols in bounds)."""
    offs_k = tl.arange(0, BLOCK_K)
    q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * stride_q + offs_k[None, :]
    c_ptrs = c_ptr + cols.to(tl.int64)[:, None] * stride_c + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        if EVEN_K:
            q_blk = tl.load(q_ptrs)
            c_blk = tl.load(c_ptrs)
        else:
            k_mask = (k + offs_k) < D
            q_blk = tl.load(q_ptrs, mask=k_mask[None, :], other=0.0)
            c_blk = tl.load(c_ptrs, mask=k_mask[None, :], other=0.0)
        if UPCAST:
            q_blk = q_blk.to(tl.float32)
            c_blk = c_blk.to(tl.float32)
        acc = tl.dot(q_blk, tl.trans(c_blk), acc, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_K
        c_ptrs += BLOCK_K
    return acc


@triton.jit
def row_lse_partial_kernel(
    q_ptr,
    c_ptr,
    row_scale_ptr,
    col_scale_ptr,
    part_ptr,
    lse_ptr,
    M,
    N,
    D,
    stride_q,
    stride_c,
    tiles_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    FLATTEN: tl.constexpr = False,
):
    """Online (max, sum-exp) of one row block over one column split, in base-2 units.

    Grid (column splits, row blocks), splits fastest: the programs running at once share a few q
    row blocks and walk the same column tiles, so both stay in L2. With WRITE_LSE (one split) the
    program writes lse directly; otherwise (m, l) go to part[0/1, split, row] for lse_merge_kernel.
    """
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m % M
    # log2(e) folded into the row scale: the tile epilogue is one multiply per element and exp2
    row_scale = tl.load(row_scale_ptr + rows) * LOG2E
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # the last split may run past the final column tile: those columns are masked to -inf below
    # (same time as the other splits, and no data-dependent loop bound)
    # FLATTEN lets the pipeliner run the feature loops of consecutive tiles as one (loads of the next
    # tile start during this tile's epilogue)
    for step in tl.range(0, tiles_per_split, flatten=FLATTEN):
        offs_n = (pid_s * tiles_per_split + step) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = offs_n % N
        acc = _score_tile(
            q_ptr, c_ptr, rows, cols, D, stride_q, stride_c,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        col_scale = tl.load(col_scale_ptr + cols)
        s = acc * row_scale[:, None] * col_scale[None, :]
        # a -inf score only comes from non-finite input; it would vanish from the sum, so make it NaN
        s = tl.where(s == float("-inf"), float("nan"), s)
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    row_ok = offs_m < M
    if WRITE_LSE:
        tl.store(lse_ptr + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
    else:
        tl.store(part_ptr + pid_s * M + offs_m, m_i, mask=row_ok)
        tl.store(part_ptr + (tl.num_programs(0) + pid_s) * M + offs_m, l_i, mask=row_ok)


@triton.jit
def lse_merge_kernel(part_ptr, lse_ptr, M, splits, BLOCK: tl.constexpr):
    """lse_i = ln2 * (m + log2(sum_s l_s * 2^(m_s - m))), m = max_s m_s, from base-2 partials."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for s in range(0, splits):
        m = tl.maximum(m, tl.load(part_ptr + s * M + offs, mask=ok, other=float("-inf")))
    # all splits empty (-inf): shift by 0 so that -inf - -inf does not invent a NaN
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        m_s = tl.load(part_ptr + s * M + offs, mask=ok, other=float("-inf"))
        l_s = tl.load(part_ptr + (splits + s) * M + offs, mask=ok, other=0.0)
        l += l_s * tl.exp2(m_s - m_shift)
    l = tl.where(ok, l, 1.0)  # lanes past M: keep log2 away from 0 (no value is stored there)
    tl.store(lse_ptr + offs, (m_shift + tl.log2(l)) * LN2, mask=ok)


@triton.jit
def _grouped_tile(GROUP_M: tl.constexpr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of this program on a 1-D grid, in groups of GROUP_M row tiles so
    that the programs running at once reuse each other's q and c tiles from L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def softmax_probs_kernel(
    q_ptr,
    c_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    weight_ptr,
    pq_ptr,
    pc_ptr,
    M,
    N,
    D,
    stride_q,
    stride_c,
    stride_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Writes one [M, N] block of P * col_scale (-> gq = . @ c) and of P * row_scale
    (-> gc = .^T @ q), P = w * exp(s - lse), in the buffers' dtype, for two GEMMs on raw q and c."""
    pid_m, pid_n = _grouped_tile(GROUP_M, M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    acc = _score_tile(
        q_ptr, c_ptr, rows, cols, D, stride_q, stride_c,
        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    row_scale = tl.load(row_scale_ptr + rows)
    col_scale = tl.load(col_scale_ptr + cols)
    lse2 = tl.load(lse_ptr + rows) * LOG2E
    weight = tl.load(weight_ptr + rows)
    s2 = acc * (row_scale * LOG2E)[:, None] * col_scale[None, :]
    valid = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    p = tl.where(valid, weight[:, None] * tl.exp2(s2 - lse2[:, None]), 0.0)  # P, 0 outside the matrix
    offsets = offs_m[:, None] * stride_p + offs_n[None, :]  # int32: the launcher keeps a block < 2^31
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(pq_ptr + offsets, (p * col_scale[None, :]).to(pq_ptr.dtype.element_ty), mask=mask)
    tl.store(pc_ptr + offsets, (p * row_scale[:, None]).to(pc_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# gradients in the forward


@triton.jit
def _inverse_norm_rows(x_ptr, r_ptr, block, n, D, stride, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """r_i = 1 / max(|x_i|, eps) for one block of rows (NaN rows stay NaN)."""
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(offs_r, n - 1).to(tl.int64)
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride + cols[None, :], mask=(cols < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    norm = tl.maximum(tl.sqrt(ss), eps, propagate_nan=tl.PropagateNan.ALL)
    tl.store(r_ptr + offs_r, 1.0 / norm, mask=offs_r < n)


@triton.jit
def inverse_norms_kernel(
    q_ptr, c_ptr, rq_ptr, rc_ptr, M, N, D, stride_q, stride_c, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Inverse row norms of q (the first cdiv(M, BLOCK_R) programs) and of c (the rest): one launch."""
    pid = tl.program_id(0)
    q_blocks = tl.cdiv(M, BLOCK_R)
    if pid < q_blocks:
        _inverse_norm_rows(q_ptr, rq_ptr, pid, M, D, stride_q, eps, BLOCK_R, BLOCK_D)
    else:
        _inverse_norm_rows(c_ptr, rc_ptr, pid - q_blocks, N, D, stride_c, eps, BLOCK_R, BLOCK_D)


@triton.jit
def _inverse_temperature(tau_ptr, inv_tau, TAU_TENSOR: tl.constexpr):
    """1 / tau from a 0-dim tensor (NaN unless 0 < tau < Inf: no host check) or the given number."""
    if TAU_TENSOR:
        tau = tl.load(tau_ptr).to(tl.float32)
        return tl.where((tau > 0) & (tau < float("inf")), 1.0 / tau, float("nan"))
    else:
        return inv_tau


@triton.jit
def _mask_copies(s, ids_ptr, cols, col_ok, t_id, is_t):
    """s with -Inf where column j is a copy of row i's target (same id, j != t(i)); s * 0 - Inf keeps
    a NaN (a non-finite candidate) NaN."""
    col_id = tl.load(ids_ptr + cols, mask=col_ok, other=0)
    copy = (col_id[None, :] == t_id[:, None]) & ~is_t
    return tl.where(copy, s * 0.0 - float("inf"), s)


@triton.jit
def xent_rows_kernel(
    s_ptr, e_ptr, rq_ptr, rc_ptr, tau_ptr, inv_tau, t_ptr, ids_ptr, loss_ptr,
    row0, R, N, stride_s, stride_e, t_offset, t_stride, weight,
    NORMALIZE: tl.constexpr, TAU_TENSOR: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_IDS: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One block of rows of a logit chunk S = q_R c^T (raw dot products, fp32, R x N):

        s_ij = a_i rc_j S_ij,  a_i = rq_i / tau,  lse_i = log sum_j exp(s_ij),
        loss[row0 + i] = weight * (lse_i - s_i,t(i)),
        E_ij = weight * (P_ij - Y_ij) a_i rc_j      (WANT_GRAD; E may be S itself)

    so that E c and E^T q are the gradients at fixed scales; P_it - 1 is formed as -sum_{j != t} P_ij
    (a second running sum), which keeps its relative precision when P_it ~ 1. Two passes over the row:
    online max / sum-exp (base 2), then P. A target outside [0, N) or a -Inf logit (only from
    non-finite input, which a plain log-sum-exp would drop) makes the row NaN. HAS_IDS
    (positives="mask"): columns j != t(i) with ids[j] == ids[t(i)] get s_ij = -Inf (P_ij = 0; a NaN
    stays NaN).
    """
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < R
    local = tl.minimum(offs_r, R - 1)
    rows = row0 + local  # global query rows, in bounds
    a = tl.zeros((BLOCK_R,), dtype=tl.float32) + _inverse_temperature(tau_ptr, inv_tau, TAU_TENSOR)
    if NORMALIZE:
        a = a * tl.load(rq_ptr + rows)
    if HAS_TARGETS:
        t = tl.load(t_ptr + rows) + t_offset
    else:
        t = t_offset + rows.to(tl.int64) * t_stride
    a = tl.where((t >= 0) & (t < N), a, float("nan"))
    if HAS_IDS:  # the target's id (an out-of-range target reads column 0: its row is NaN anyway)
        t_id = tl.load(ids_ptr + tl.where((t >= 0) & (t < N), t, 0))
    a2 = a * LOG2E  # base-2 logits: the epilogue is one multiply and exp2
    s_rows = s_ptr + local.to(tl.int64)[:, None] * stride_s
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    rest = tl.zeros((BLOCK_R,), dtype=tl.float32)  # sum_{j != t} exp2(s_j - m), online
    pos = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = tl.load(s_rows + cols[None, :], mask=col_ok[None, :], other=0.0) * a2[:, None]
        if NORMALIZE:
            s = s * tl.load(rc_ptr + cols, mask=col_ok, other=0.0)[None, :]
        s = tl.where(s == float("-inf"), float("nan"), s)
        is_t = cols[None, :] == t[:, None]
        if HAS_IDS:
            s = _mask_copies(s, ids_ptr, cols, col_ok, t_id, is_t)
        pos += tl.sum(tl.where(is_t, s, 0.0), axis=1)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        rest = rest * tl.exp2(m - m_new) + tl.sum(tl.where(is_t, 0.0, tl.exp2(s - m_new[:, None])), axis=1)
        m = m_new
    # the target's term from its logit at the end (no third running sum: one reduction per tile, as
    # before the precision fix, keeps the sm_90 build free of spills), then the whole sum
    l = rest + tl.exp2(pos - m)
    lse2 = m + tl.log2(l)
    # (max - l_t) first: a small loss is not rounded to the ulp of the logits (|l| ~ 1/tau)
    tl.store(loss_ptr + rows, ((m - pos) + tl.log2(l)) * (LN2 * weight), mask=row_ok)
    if WANT_GRAD:
        # E at the target: -sum_{j != t} P_ij, not P_it - 1 (P_it ~ 1 rounds at 6e-8, which is the
        # whole gradient of a confident row)
        e_t = -rest / l
        wa = weight * a
        e_rows = e_ptr + local.to(tl.int64)[:, None] * stride_e
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            s = tl.load(s_rows + cols[None, :], mask=col_ok[None, :], other=0.0) * a2[:, None]
            e = wa[:, None]
            if NORMALIZE:
                rc = tl.load(rc_ptr + cols, mask=col_ok, other=0.0)[None, :]
                s = s * rc
                e = e * rc
            s = tl.where(s == float("-inf"), float("nan"), s)
            is_t = cols[None, :] == t[:, None]
            if HAS_IDS:
                s = _mask_copies(s, ids_ptr, cols, col_ok, t_id, is_t)
            p = tl.where(is_t, e_t[:, None], tl.exp2(s - lse2[:, None]))
            mask = row_ok[:, None] & col_ok[None, :]
            tl.store(e_rows + cols[None, :], (p * e).to(e_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_rows(
    g_ptr, x_ptr, r_ptr, dots_ptr, block, n, D, stride_x, neg_inv_tau,
    NORMALIZE: tl.constexpr, WANT_DOTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """g_i -= <g_i, x_i> r_i^2 x_i in place (none where r_i was clamped at 1/eps); dots: -<g_i, x_i>/tau."""
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < n
    rows = tl.minimum(offs_r, n - 1).to(tl.int64)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = (cols < D)[None, :]
        g = tl.load(g_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(g * x, axis=1)
    if WANT_DOTS:
        tl.store(dots_ptr + offs_r, dot * neg_inv_tau, mask=row_ok)
    if NORMALIZE:
        r = tl.load(r_ptr + rows)
        coef = tl.where(r > 0.5e12, 0.0, r * r) * dot
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            ptrs = g_ptr + rows[:, None] * D + cols[None, :]
            g = tl.load(ptrs, mask=mask, other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, g - coef[:, None] * x, mask=mask)


@triton.jit
def finish_kernel(
    gq_ptr, q_ptr, rq_ptr, gc_ptr, c_ptr, rc_ptr, dots_ptr, tau_ptr, inv_tau,
    M, N, D, stride_q, stride_c,
    HAS_Q: tl.constexpr, HAS_C: tl.constexpr, NORMALIZE: tl.constexpr, WANT_DOTS: tl.constexpr,
    TAU_TENSOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The normalisation's Jacobian on the query rows (first programs) and candidate rows (the rest),
    in place in the fp32 gradients gq [M, D], gc [N, D], and the rows' dL/dtau terms: one launch."""
    pid = tl.program_id(0)
    q_blocks = 0
    if HAS_Q:
        q_blocks = tl.cdiv(M, BLOCK_R)
    neg_inv_tau = -_inverse_temperature(tau_ptr, inv_tau, TAU_TENSOR)
    if pid < q_blocks:
        _finish_rows(
            gq_ptr, q_ptr, rq_ptr, dots_ptr, pid, M, D, stride_q, neg_inv_tau,
            NORMALIZE, WANT_DOTS, BLOCK_R, BLOCK_D,
        )  # fmt: skip
    elif HAS_C:
        _finish_rows(
            gc_ptr, c_ptr, rc_ptr, dots_ptr, pid - q_blocks, N, D, stride_c, neg_inv_tau,
            NORMALIZE, False, BLOCK_R, BLOCK_D,
        )  # fmt: skip


@triton.jit
def _scale_block(x_ptr, out_ptr, block, n, g, BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(x_ptr + offs, mask=offs < n, other=0.0) * g
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even in the bits (the interpreter's conversion truncates); the result is
        # an exact bf16 value, which every conversion keeps. Inf and NaN stay what they are.
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def scale_kernel(
    a_ptr, a_out_ptr, n_a, b_ptr, b_out_ptr, n_b, t_ptr, t_out_ptr, n_t, g_ptr, BLOCK: tl.constexpr
):  # fmt: skip
    """x_out = x * g for the three buffers a, b, t (dq, dc, dtau; g: the upstream scalar), each rounded
    once to its output's dtype (to nearest even); the outputs
    may be the inputs. One launch for the whole backward."""
    pid = tl.program_id(0)
    a_blocks = tl.cdiv(n_a, BLOCK)
    b_blocks = tl.cdiv(n_b, BLOCK)
    g = tl.load(g_ptr).to(tl.float32)
    if pid < a_blocks:
        _scale_block(a_ptr, a_out_ptr, pid, n_a, g, BLOCK)
    elif pid < a_blocks + b_blocks:
        _scale_block(b_ptr, b_out_ptr, pid - a_blocks, n_b, g, BLOCK)
    else:
        _scale_block(t_ptr, t_out_ptr, pid - a_blocks - b_blocks, n_t, g, BLOCK)
