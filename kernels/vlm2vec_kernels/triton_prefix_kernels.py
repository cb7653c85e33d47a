"""Triton kernels of the Matryoshka loss (launchers: triton_prefix.py; the math: docs/loss_v3.md).

With prefixes d_1 < ... < d_K (K a constexpr, the d_k and weights w_k scalar arguments D0..D7 and
W0..W7, so nothing is read from the host and every launch is the same for a CUDA graph):

- `prefix_norms_kernel`: r[k, i] = 1 / max(|x_i[:d_k]|, eps) for q and c, a running sum of squares.
- `prefix_logits_kernel`: S^k = q[:, :d_k] c[:, :d_k]^T for every k from ONE pass over D (one tile
  accumulator, stored at each d_k): the FLOPs of one GEMM, 2 M N d_K.
- `prefix_rows_kernel`: for k = K..1 per block of rows, the row lse of l^k = a^k_i b^k_j S^k, the loss,
  E^k = w_k rw_i (P - Y), the suffix sum H^k = sum_{m >= k} E^m a^m b^m written over S^k, and the
  normalisation's row / column sums <E^k, l^k> (columns by atomic adds) and the rows' dL/dtau terms.
- `segment_grad_kernel`: out[:, seg_k] = H^k Y[:, seg_k] - (sum_{m >= k} coef_m) X[:, seg_k], one
  launch for all segments (each output tile multiplies by the H of its segment: 2 P Q d_K FLOPs); with
  H's strides swapped it is the candidates' gradient.

Interpreter traps (DESIGN.md 5): tiles upcast to fp32 after the load, blocks >= 16, powers of two.
"""

import triton
import triton.language as tl

from .triton_kernels import _inverse_temperature

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _pick(k: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7):
    """The k-th of eight scalar arguments (k a constexpr: no branch survives compilation)."""
    if k == 0:
        return x0
    elif k == 1:
        return x1
    elif k == 2:
        return x2
    elif k == 3:
        return x3
    elif k == 4:
        return x4
    elif k == 5:
        return x5
    elif k == 6:
        return x6
    else:
        return x7


@triton.jit
def _segment(k: tl.constexpr, D0, D1, D2, D3, D4, D5, D6, D7):
    """[lo, hi) of segment k: [d_{k-1}, d_k) with d_0 = 0."""
    hi = _pick(k, D0, D1, D2, D3, D4, D5, D6, D7)
    if k == 0:
        lo = hi * 0
    else:
        lo = _pick(k - 1, D0, D1, D2, D3, D4, D5, D6, D7)
    return lo, hi


@triton.jit
def _norm_rows(x_ptr, r_ptr, block, n, stride_x, eps, D0, D1, D2, D3, D4, D5, D6, D7,
               K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    offs = block * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs < n
    rows = tl.minimum(offs, n - 1).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in tl.static_range(K):
        lo, hi = _segment(k, D0, D1, D2, D3, D4, D5, D6, D7)
        for d0 in range(lo, hi, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x_ptrs = x_ptr + rows[:, None] * stride_x + cols[None, :]
            x = tl.load(x_ptrs, mask=(cols < hi)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x * x, axis=1)
        tl.store(r_ptr + k * n + offs, 1.0 / tl.maximum(tl.sqrt(acc), eps), mask=ok)


@triton.jit
def prefix_norms_kernel(
    q_ptr, c_ptr, rq_ptr, rc_ptr, M, N, stride_q, stride_c, eps, D0, D1, D2, D3, D4, D5, D6, D7,
    K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """rq [K, M], rc [K, N]: the first cdiv(M, BLOCK_R) programs take q's rows, the rest c's."""
    pid = tl.program_id(0)
    q_blocks = tl.cdiv(M, BLOCK_R)
    if pid < q_blocks:
        _norm_rows(q_ptr, rq_ptr, pid, M, stride_q, eps, D0, D1, D2, D3, D4, D5, D6, D7, K, BLOCK_R, BLOCK_D)
    else:
        block = pid - q_blocks
        _norm_rows(
            c_ptr, rc_ptr, block, N, stride_c, eps, D0, D1, D2, D3, D4, D5, D6, D7, K, BLOCK_R, BLOCK_D
        )


@triton.jit
def prefix_logits_kernel(
    q_ptr, c_ptr, s_ptr, M, N, stride_q, stride_c, D0, D1, D2, D3, D4, D5, D6, D7,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """S [K, M, N] (fp32): S^k = q[:, :d_k] c[:, :d_k]^T, one accumulator over D stored at each d_k."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    out = s_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.static_range(K):
        lo, hi = _segment(k, D0, D1, D2, D3, D4, D5, D6, D7)
        for d0 in range(lo, hi, BLOCK_K):
            ks = d0 + offs_k
            k_ok = (ks < hi)[None, :]
            a = tl.load(q_ptr + rows[:, None] * stride_q + ks[None, :], mask=k_ok, other=0.0)
            b = tl.load(c_ptr + cols[:, None] * stride_c + ks[None, :], mask=k_ok, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        tl.store(out + k * M * N, acc, mask=mask)


@triton.jit
def _norm_coef(r):
    """r^2, 0 where the norm was clamped at eps (1e-12: the normalisation is constant there)."""
    return tl.where(r > 0.5e12, 0.0, r * r)


@triton.jit
def prefix_rows_kernel(
    s_ptr, rq_ptr, rc_ptr, t_ptr, tau_ptr, inv_tau, rw_ptr, weight, loss_ptr, cx_ptr, cy_ptr, dt_ptr,
    M, N, t_offset, t_stride, W0, W1, W2, W3, W4, W5, W6, W7,
    K: tl.constexpr, NORMALIZE: tl.constexpr, TAU_TENSOR: tl.constexpr, HAS_TARGETS: tl.constexpr,
    ROW_WEIGHT: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One block of query rows, all N columns, every prefix (k = K..1):

        l^k_ij = a^k_i b^k_j S^k_ij (a = rq^k / tau, b = rc^k),  loss_i = sum_k w_k (lse^k_i - l^k_i,t),
        E^k = w_k rw_i (P^k - Y),  H^k = E^k a^k b^k + H^{k+1}  (written over S^k),
        cx[k, i] = <E^k, l^k - l^k_t>_i rq^k_i^2,  cy[k, j] += <E^k, l^k>_j rc^k_j^2,
        dt_i = -1/tau sum_k <E^k, l^k - l^k_t>_i

    (the row sums shifted by l_t, 0 in exact arithmetic, drop P_t ~ 1's rounding times l_t). Two
    passes over the row per prefix: online max / sum-exp (base 2), then E. A target outside [0, N) or
    a -Inf logit (non-finite input) makes the row NaN.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < M
    rows = tl.minimum(offs_r, M - 1)
    inv_t = _inverse_temperature(tau_ptr, inv_tau, TAU_TENSOR)
    if HAS_TARGETS:
        t = tl.load(t_ptr + rows) + t_offset
    else:
        t = t_offset + rows.to(tl.int64) * t_stride
    bad = (t < 0) | (t >= N)
    rw = tl.zeros((BLOCK_R,), dtype=tl.float32) + weight
    if ROW_WEIGHT:
        rw = rw * tl.load(rw_ptr + rows).to(tl.float32)
    loss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    dt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_rows = s_ptr + rows.to(tl.int64)[:, None] * N
    for k in tl.static_range(K - 1, -1, -1):
        w = _pick(k, W0, W1, W2, W3, W4, W5, W6, W7)
        a = tl.zeros((BLOCK_R,), dtype=tl.float32) + inv_t
        if NORMALIZE:
            a = a * tl.load(rq_ptr + k * M + rows)
        a = tl.where(bad, float("nan"), a)
        a2 = a * LOG2E  # base-2 logits
        s_k = s_rows + k * M * N
        m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        lsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        pos = tl.zeros((BLOCK_R,), dtype=tl.float32)
        rest = tl.zeros((BLOCK_R,), dtype=tl.float32)  # lsum without the target column
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            s = tl.load(s_k + cols[None, :], mask=col_ok[None, :], other=0.0) * a2[:, None]
            if NORMALIZE:
                s = s * tl.load(rc_ptr + k * N + cols, mask=col_ok, other=0.0)[None, :]
            s = tl.where(s == float("-inf"), float("nan"), s)
            is_t = cols[None, :] == t[:, None]
            pos += tl.sum(tl.where(is_t, s, 0.0), axis=1)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            scale = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            lsum = lsum * scale + tl.sum(p, axis=1)
            rest = rest * scale + tl.sum(tl.where(is_t, 0.0, p), axis=1)
            m = m_new
        # E at the target: -sum_{j != t} P_ij, not P_it - 1 (P_it ~ 1 rounds at 6e-8, which the small
        # gradient of a well-separated row cannot take)
        e_t = -rest / lsum
        lse2 = m + tl.log2(lsum)
        loss += ((m - pos) + tl.log2(lsum)) * (LN2 * w)  # (max - l_t) first: a small loss stays exact
        if WANT_GRAD:
            wr = w * rw
            es = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                s = tl.load(s_k + cols[None, :], mask=col_ok[None, :], other=0.0)
                b = tl.zeros((BLOCK_N,), dtype=tl.float32) + 1.0
                if NORMALIZE:
                    b = tl.load(rc_ptr + k * N + cols, mask=col_ok, other=0.0)
                s2 = s * a2[:, None] * b[None, :]
                s2 = tl.where(s2 == float("-inf"), float("nan"), s2)
                is_t = cols[None, :] == t[:, None]
                e = tl.where(is_t, e_t[:, None], tl.exp2(s2 - lse2[:, None])) * wr[:, None]
                el = e * (s2 * LN2)
                es += tl.sum(tl.where(col_ok[None, :], e * ((s2 - pos[:, None]) * LN2), 0.0), axis=1)
                g = e * a[:, None] * b[None, :]
                if k < K - 1:
                    g += tl.load(s_k + M * N + cols[None, :], mask=col_ok[None, :], other=0.0)
                if NORMALIZE:
                    col_sum = tl.sum(tl.where(mask, el, 0.0), axis=0) * _norm_coef(b)
                    tl.atomic_add(cy_ptr + k * N + cols, col_sum, mask=col_ok)
                tl.debug_barrier()  # the program's own H^{k+1} reads before S^k's tile is overwritten
                tl.store(s_k + cols[None, :], g, mask=mask)
            tl.debug_barrier()
            dt += es
            if NORMALIZE:
                tl.store(cx_ptr + k * M + rows, es * _norm_coef(tl.load(rq_ptr + k * M + rows)), mask=row_ok)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    if WANT_GRAD:
        tl.store(dt_ptr + rows, dt * -inv_t, mask=row_ok)


@triton.jit
def segment_grad_kernel(
    h_ptr, y_ptr, x_ptr, out_ptr, coef_ptr, P, Q, D, stride_hp, stride_hq, stride_y, stride_x,
    D0, D1, D2, D3, D4, D5, D6, D7,
    K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out [P, D] (fp32): columns of segment k take H^k Y[:, seg_k] - (sum_{m >= k} coef[m]) X[:, seg_k]
    (H^k = h_ptr + k P Q, element (p, q) at p stride_hp + q stride_hq); columns >= d_K are 0. A tile
    of columns straddling a boundary runs once per segment it meets (none do when BLOCK_N divides
    every d_k)."""
    offs_p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_lo = tl.program_id(1) * BLOCK_N
    p_ok = offs_p < P
    ps = tl.minimum(offs_p, P - 1).to(tl.int64)
    ds = tl.minimum(offs_d, D - 1)
    offs_k = tl.arange(0, BLOCK_K)
    mask = p_ok[:, None] & (offs_d < D)[None, :]
    out_ptrs = out_ptr + ps[:, None] * D + offs_d[None, :]
    for k in tl.static_range(K):
        lo, hi = _segment(k, D0, D1, D2, D3, D4, D5, D6, D7)
        if (hi > d_lo) & (lo < d_lo + BLOCK_N):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            h_k = h_ptr + k * P * Q + ps[:, None] * stride_hp
            for q0 in range(0, Q, BLOCK_K):
                qs = q0 + offs_k
                q_ok = qs < Q
                h = tl.load(h_k + qs[None, :].to(tl.int64) * stride_hq, mask=q_ok[None, :], other=0.0)
                y_ptrs = y_ptr + qs.to(tl.int64)[:, None] * stride_y + ds[None, :]
                y = tl.load(y_ptrs, mask=q_ok[:, None], other=0.0).to(tl.float32)
                acc = tl.dot(h, y, acc, input_precision=DOT_PRECISION)
            if NORMALIZE:
                coef = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for m in tl.static_range(k, K):
                    coef += tl.load(coef_ptr + m * P + ps)
                x = tl.load(x_ptr + ps[:, None] * stride_x + ds[None, :]).to(tl.float32)
                acc -= coef[:, None] * x
            in_seg = (offs_d >= lo) & (offs_d < hi)
            tl.store(out_ptrs, acc, mask=mask & in_seg[None, :])  # each column once: its own segment
    d_last = _pick(K - 1, D0, D1, D2, D3, D4, D5, D6, D7)
    if d_last < d_lo + BLOCK_N:  # columns beyond the largest prefix take no part
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        tl.store(out_ptrs, zero, mask=mask & (offs_d >= d_last)[None, :])
