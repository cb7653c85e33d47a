"""Triton kernels of the contrastive loss engine (launchers live in triton_contrastive.py).

All kernels recompute score tiles S = q_rows @ c_cols^T over the full feature dimension in fp32 and
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
            q_ptr,
            c_ptr,
            rows,
            cols,
            D,
            stride_q,
            stride_c,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
            UPCAST,
            DOT_PRECISION,
        )
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
def _prob_tile(
    q_ptr,
    c_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    weight_ptr,
    offs_m,
    offs_n,
    M,
    N,
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
    """P_ij = w_i * exp(s_ij - lse_i) for one tile (0 outside the matrix) and the tile's scales."""
    rows = offs_m % M
    cols = offs_n % N
    acc = _score_tile(
        q_ptr,
        c_ptr,
        rows,
        cols,
        D,
        stride_q,
        stride_c,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        EVEN_K,
        UPCAST,
        DOT_PRECISION,
    )
    row_scale = tl.load(row_scale_ptr + rows)
    col_scale = tl.load(col_scale_ptr + cols)
    lse2 = tl.load(lse_ptr + rows) * LOG2E
    weight = tl.load(weight_ptr + rows)
    s2 = acc * (row_scale * LOG2E)[:, None] * col_scale[None, :]
    valid = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    p = tl.where(valid, weight[:, None] * tl.exp2(s2 - lse2[:, None]), 0.0)
    return p, row_scale, col_scale, rows, cols


@triton.jit
def softmax_grad_atomic_kernel(
    q_ptr,
    c_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    weight_ptr,
    gq_ptr,
    gc_ptr,
    M,
    N,
    D,
    stride_q,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    GRAD_BF16: tl.constexpr,
):
    """One P tile, then gq[rows] += (P*cs) @ c[cols] and gc[cols] += (P*rs)^T @ q[rows].

    1-D grouped grid over P tiles; gq/gc are zeroed fp32 [*, D] buffers updated with relaxed
    atomics: cheap while they stay in L2 (small batches), see the launcher's path choice.
    """
    pid_m, pid_n = _grouped_tile(GROUP_M, M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p, row_scale, col_scale, rows, cols = _prob_tile(
        q_ptr,
        c_ptr,
        row_scale_ptr,
        col_scale_ptr,
        lse_ptr,
        weight_ptr,
        offs_m,
        offs_n,
        M,
        N,
        D,
        stride_q,
        stride_c,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        EVEN_K,
        UPCAST,
        DOT_PRECISION,
    )
    # P goes to the tensor cores as bf16 for 16-bit inputs (fp16 would flush small P to zero),
    # as fp32 otherwise (3xTF32 on the GPU, exact under the interpreter)
    if GRAD_BF16:
        p_q = (p * col_scale[None, :]).to(tl.bfloat16)
        p_c = tl.trans((p * row_scale[:, None]).to(tl.bfloat16))
    else:
        p_q = p * col_scale[None, :]
        p_c = tl.trans(p * row_scale[:, None])
    offs_k = tl.arange(0, BLOCK_K)
    q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * stride_q + offs_k[None, :]
    c_ptrs = c_ptr + cols.to(tl.int64)[:, None] * stride_c + offs_k[None, :]
    gq_ptrs = gq_ptr + offs_m.to(tl.int64)[:, None] * D + offs_k[None, :]
    gc_ptrs = gc_ptr + offs_n.to(tl.int64)[:, None] * D + offs_k[None, :]
    row_ok = (offs_m < M)[:, None]
    col_ok = (offs_n < N)[:, None]
    for k in range(0, D, BLOCK_K):
        if EVEN_K:
            q_blk = tl.load(q_ptrs)
            c_blk = tl.load(c_ptrs)
            gq_mask = row_ok
            gc_mask = col_ok
        else:
            k_ok = ((k + offs_k) < D)[None, :]
            q_blk = tl.load(q_ptrs, mask=k_ok, other=0.0)
            c_blk = tl.load(c_ptrs, mask=k_ok, other=0.0)
            gq_mask = row_ok & k_ok
            gc_mask = col_ok & k_ok
        if GRAD_BF16:
            q_blk = q_blk.to(tl.bfloat16)
            c_blk = c_blk.to(tl.bfloat16)
        else:
            q_blk = q_blk.to(tl.float32)
            c_blk = c_blk.to(tl.float32)
        gq_part = tl.dot(p_q, c_blk, input_precision=DOT_PRECISION)
        gc_part = tl.dot(p_c, q_blk, input_precision=DOT_PRECISION)
        tl.atomic_add(gq_ptrs, gq_part, mask=gq_mask, sem="relaxed")
        tl.atomic_add(gc_ptrs, gc_part, mask=gc_mask, sem="relaxed")
        q_ptrs += BLOCK_K
        c_ptrs += BLOCK_K
        gq_ptrs += BLOCK_K
        gc_ptrs += BLOCK_K


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
    p, row_scale, col_scale, _, _ = _prob_tile(
        q_ptr,
        c_ptr,
        row_scale_ptr,
        col_scale_ptr,
        lse_ptr,
        weight_ptr,
        offs_m,
        offs_n,
        M,
        N,
        D,
        stride_q,
        stride_c,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        EVEN_K,
        UPCAST,
        DOT_PRECISION,
    )
    offsets = offs_m[:, None] * stride_p + offs_n[None, :]  # int32: the launcher keeps a block < 2^31
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(pq_ptr + offsets, (p * col_scale[None, :]).to(pq_ptr.dtype.element_ty), mask=mask)
    tl.store(pc_ptr + offsets, (p * row_scale[:, None]).to(pc_ptr.dtype.element_ty), mask=mask)
