"""The torch engine of the contrastive loss: the CPU product (and a fallback on any device).

Implements the interface of `engine.py`. Both paths walk the query rows in chunks so that at most
`chunk * N` logits exist at once (never M x N):

- `xent` (gradients in the forward, 6 B^2 D FLOPs): per chunk one GEMM for the logits, an in-place
  fused softmax turned into P - Y, and two GEMMs into the fp32 gradient buffers (`_gradient_chunks`
  keeps most chunks in the query-gradient rows not yet written, so the pass allocates little).
- `row_lse` / `softmax_grad` (the recompute path, 8 B^2 D FLOPs) for what `xent` cannot do exactly.

Accumulation happens in fp32 (fp64 for fp64 inputs); q and c may be any float dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .engine import Targets, accumulation_dtype
from .rows import (
    clamp_targets,
    guard_infinite_candidates_,
    inverse_norm,
    inverse_temperature,
    nan_where,
    project_,
    row_dots,
)

# The recompute path may hand this engine fp32 copies of 16-bit rows (gathered across ranks): it
# accumulates in fp32 whatever the operands' dtype, so it takes them as they are.
OPERANDS_IN_INPUT_DTYPE = False

# Largest number of logits one chunk may hold: 2**22 fp32 = 16 MiB. Tests lower it to force many chunks.
MAX_CHUNK_ELEMENTS = 2**22
# The gradient pass needs little chunk memory of its own: each chunk's logits and scaled rows live in
# the rows of the query-gradient buffer that no chunk has written yet (`_gradient_chunks`), in chunks
# of up to TAIL_CHUNK_FACTOR times the usual size (fewer, larger GEMMs). Only the last rows, where that
# free tail gets too small, use a spare buffer sized from a memory budget: SPARE_BUDGET of the engine's
# gradient buffers ((M + N) * D elements), but at least MIN_SPARE_ROWS rows and at most one usual
# chunk. At B = 8192, D = 1536 that is one full 512-row chunk (19 MiB, 2.2% of eager's peak): 13
# chunks in all (a 258-row spare gave 18; every chunk re-reads and re-writes the whole candidate
# gradient, and small chunks run the GEMMs less efficiently).
TAIL_CHUNK_FACTOR = 2
SPARE_BUDGET = 1 / 4
MIN_SPARE_ROWS = 256


def _chunk_rows(n_rows: int, n_cols: int) -> int:
    """Rows per chunk so that a chunk holds at most MAX_CHUNK_ELEMENTS logits (at least one row)."""
    return max(1, min(n_rows, MAX_CHUNK_ELEMENTS // max(n_cols, 1)))


def _chunks(q: Tensor, n_cols: int, acc: torch.dtype):
    """(rows, logits buffer) per row block of q. When one chunk holds every row it yields (None, None)
    once: callers then work on the whole tensors, with no slicing, and the matmul allocates the logits
    (a handful of ops per call instead of a dozen per chunk). Otherwise the buffer is allocated once."""
    step = _chunk_rows(q.shape[0], n_cols)
    if step >= q.shape[0]:
        yield None, None
        return
    buffer = torch.empty(step, n_cols, dtype=acc, device=q.device)
    for start in range(0, q.shape[0], step):
        stop = min(start + step, q.shape[0])
        yield slice(start, stop), buffer[: stop - start]


def _spare_rows(n_rows: int, n_cols: int, dim: int, step: int) -> int:
    """Rows of the spare chunk buffer: SPARE_BUDGET of the gradient buffers, within
    [MIN_SPARE_ROWS, step]."""
    budget = int((n_rows + n_cols) * dim * SPARE_BUDGET) // (n_cols + dim)
    return max(1, min(step, n_rows, max(MIN_SPARE_ROWS, budget)))


def _gradient_chunks(gq: Tensor, n_cols: int, step: int):
    """(rows, scratch) per row chunk of the gradient pass; scratch: rows * (n_cols + D) free elements
    for the chunk's logits and scaled rows.

    Chunks run in row order and each writes only gq[rows], so gq's rows after the current chunk are
    free: a chunk of r rows starting at row i fits there when (M - i - r) * D >= r * (N + D). Chunks
    take that tail (up to TAIL_CHUNK_FACTOR * step rows) while it holds at least the spare buffer's
    rows; the rows left after that (about spare * (N + 2D) / D of them) go through one spare buffer,
    the only chunk memory the pass allocates. gq must be contiguous (it is the engine's own buffer)."""
    n_rows, dim = gq.shape
    per_row = n_cols + dim
    flat = gq.view(-1)
    small = _spare_rows(n_rows, n_cols, dim, step)
    spare = None
    start = 0
    while start < n_rows:
        fit = (n_rows - start) * dim // (per_row + dim)
        if fit >= small:
            stop = start + min(TAIL_CHUNK_FACTOR * step, fit)
            scratch = flat[stop * dim : stop * dim + (stop - start) * per_row]
        else:
            stop = min(start + small, n_rows)
            if spare is None:
                spare = torch.empty(small * per_row, dtype=gq.dtype, device=gq.device)
            scratch = spare[: (stop - start) * per_row]
        yield slice(start, stop), scratch
        start = stop


def _part(x: Tensor | None, rows: slice | None) -> Tensor | None:
    return x if rows is None or x is None else x[rows]


def _softmax_chunk_(
    q_rows: Tensor,
    c_t: Tensor,
    row_scale: Tensor,
    col_scale: Tensor,
    out: Tensor | None,
    rows_out: Tensor | None,
    with_lse: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """P = softmax_j(s_ij) for these rows, in `out` (or a new tensor); returns (P, row_scale * q_rows
    (in `rows_out` or a new tensor), lse or None). c_t is the candidates transposed, [D, N], in the
    accumulation dtype.

    One fused in-place softmax (rows stay in cache) instead of separate max/sub/exp/sum passes. The lse
    comes from two row maxima: the softmax's largest entry is exactly 1/sum_j exp(s_ij - max_j s_ij), so
    lse = max_j s_ij - log(max_j P_ij). NaN/Inf in a row make its P and lse NaN (Inf - Inf), never finite.
    """
    if rows_out is None:
        scaled_rows = q_rows.to(row_scale.dtype) * row_scale[:, None]
    else:
        scaled_rows = torch.mul(q_rows, row_scale[:, None], out=rows_out)
    logits = torch.mm(scaled_rows, c_t) if out is None else torch.mm(scaled_rows, c_t, out=out)
    logits.mul_(col_scale)
    row_max = logits.amax(dim=1) if with_lse else None
    torch.softmax(logits, dim=1, out=logits)
    lse = row_max.sub_(logits.amax(dim=1).log_()) if with_lse else None
    return logits, scaled_rows, lse


def _accumulate_grads_(
    probs: Tensor,
    row_weight: Tensor | None,
    scaled_rows: Tensor,
    c: Tensor,
    col_scale: Tensor,
    gq_rows: Tensor | None,
    gc: Tensor | None,
    first: bool,
) -> tuple[Tensor, Tensor]:
    """With P = row_weight[:, None] * probs (row_weight None: all ones): gc += P^T (row_scale q) and
    gq_rows = (P * col_scale) c. gq_rows / gc None: allocated here (single chunk). Returns both.

    The row weight is folded into the [rows, D] operands, so the chunk itself is touched only once
    more (the col_scale multiply)."""
    weighted_rows = scaled_rows if row_weight is None else scaled_rows.mul_(row_weight[:, None])
    if gc is None:
        gc = torch.mm(probs.T, weighted_rows)
    else:  # torch.addmm(out=) rather than addmm_: FlopCounterMode counts it
        torch.addmm(gc, probs.T, weighted_rows, beta=0 if first else 1, out=gc)
    probs.mul_(col_scale)
    gq_rows = torch.mm(probs, c) if gq_rows is None else torch.mm(probs, c, out=gq_rows)
    if row_weight is not None:
        gq_rows.mul_(row_weight[:, None])
    return gq_rows, gc


def row_lse(q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor) -> Tensor:
    """lse_i = log sum_j exp(row_scale_i * col_scale_j * <q_i, c_j>).

    q [M, D], c [N, D] (any float dtype), row_scale [M], col_scale [N] (accumulation dtype, fp32 or
    fp64). Returns lse [M] in the accumulation dtype. Extra memory: one chunk of logits (+ c upcast).
    """
    acc = row_scale.dtype
    c_t = c.to(acc).T
    lse = None
    for rows, logits in _chunks(q, c.shape[0], acc):
        _, _, chunk_lse = _softmax_chunk_(
            _part(q, rows), c_t, _part(row_scale, rows), col_scale, logits, None, True
        )
        if rows is None:
            return chunk_lse
        if lse is None:
            lse = torch.empty(q.shape[0], dtype=acc, device=q.device)
        lse[rows] = chunk_lse
    return lse


def softmax_grad(
    q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor, lse: Tensor, row_weight: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradient pieces of sum_i row_weight_i * lse_i, recomputing the logits chunk by chunk.

    With P_ij = row_weight_i * exp(s_ij - lse_i): gq_i = sum_j P_ij col_scale_j c_j [M, D] and
    gc_j = sum_i P_ij row_scale_i q_i [N, D], both in the accumulation dtype (so dL/dq = row_scale * gq,
    dL/drow_scale = <gq_i, q_i>, and likewise for the candidates). gc accumulates across chunks.
    `lse` must be row_lse's result: this engine renormalises each recomputed row itself (a fused
    softmax), which gives the same probabilities without the rounding of a stored lse.
    """
    del lse  # the fused softmax recomputes the row normaliser exactly
    acc = row_scale.dtype
    c = c.to(acc)
    c_t = c.T
    (n_rows, dim), n_cols = q.shape, c.shape[0]
    step = _chunk_rows(n_rows, n_cols)
    if step >= n_rows:  # one chunk: the matmuls allocate what they need
        probs, scaled_rows, _ = _softmax_chunk_(q, c_t, row_scale, col_scale, None, None, False)
        return _accumulate_grads_(probs, row_weight, scaled_rows, c, col_scale, None, None, True)
    gq = torch.empty(n_rows, dim, dtype=acc, device=q.device)
    gc = torch.empty(n_cols, dim, dtype=acc, device=q.device)
    for rows, scratch in _gradient_chunks(gq, n_cols, step):
        count = rows.stop - rows.start
        logits = scratch[: count * n_cols].view(count, n_cols)
        rows_out = scratch[count * n_cols :].view(count, dim)
        probs, scaled_rows, _ = _softmax_chunk_(
            q[rows], c_t, row_scale[rows], col_scale, logits, rows_out, False
        )
        _accumulate_grads_(
            probs, _part(row_weight, rows), scaled_rows, c, col_scale, gq[rows], gc, rows.start == 0
        )
    return gq, gc


# ----------------------------------------------------------------------------------------------------
# gradients in the forward (engine.py's interface)


def inverse_norms(q: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """1 / max(|x_i|, eps) per row of q and of c, in the accumulation dtype."""
    return inverse_norm(q), inverse_norm(c)


def xent(
    q: Tensor,
    c: Tensor,
    rq: Tensor | None,
    rc: Tensor | None,
    tau: float | Tensor,
    targets: Targets,
    weight: float,
    want_dq: bool,
    want_dc: bool,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """weight * sum_i (lse_i - s_i,t(i)) and its gradients at fixed scales (engine.py), chunk by chunk.
    With `ids` (int64 [N]) the columns j != t(i) with ids[j] == ids[t(i)] leave row i's softmax (the
    positives="mask" loss: s_ij = -Inf, so P_ij = 0 and no gradient).

    Per chunk of R rows: the rows scaled by a = rq / tau [R, D], S = (a q) c^T [R, N] (one GEMM), the
    column scale, then softmax in place; lse_i = max_j s_ij - log max_j P_ij (the largest probability
    is exactly 1 / sum_j exp(s_ij - max_j s_ij), read at the argmax found with the max: no second pass
    over the chunk). P - Y in place, dc (+)= (P - Y)^T (a q) before and dq_R = ((P - Y) diag(rc)) c
    after the column scale. A row with NaN/Inf gives a NaN loss.
    """
    acc = accumulation_dtype(q.dtype)
    (n_rows, dim), n_cols = q.shape, c.shape[0]
    inv_tau = inverse_temperature(tau, acc)
    if rq is not None:
        a = rq * inv_tau
    elif isinstance(inv_tau, Tensor):
        a = inv_tau.repeat(n_rows)
    else:
        a = torch.full((n_rows,), inv_tau, dtype=acc, device=q.device)
    cols = targets.columns(n_rows, q.device)
    if not targets.checked:  # out-of-range rows: clamped to a valid column, their scale NaN
        cols, bad = clamp_targets(cols, n_cols)
        nan_where(a, bad)
    c = c.to(acc)
    want = want_dq or want_dc
    gq = torch.empty(n_rows, dim, dtype=acc, device=q.device) if want_dq else None
    gc = torch.empty(n_cols, dim, dtype=acc, device=q.device) if want_dc else None
    step = _chunk_rows(n_rows, n_cols)
    if gq is not None and step < n_rows:
        chunks = _gradient_chunks(gq, n_cols, step)
    else:
        chunks = _scratch_chunks(n_rows, n_cols, dim, step, acc, q.device)
    loss = None
    for rows, scratch in chunks:
        count = rows.stop - rows.start
        logits = scratch[: count * n_cols].view(count, n_cols)
        a_rows = a[rows, None]
        scaled = torch.mul(q[rows], a_rows, out=scratch[count * n_cols :].view(count, dim))
        s = torch.mm(scaled, c.T, out=logits)
        if rc is not None:
            s.mul_(rc)
        target = cols[rows, None]
        if ids is not None:  # the target's copies leave the softmax (a NaN there: the guard below)
            s.masked_fill_((ids[None, :] == ids[target]).scatter_(1, target, False), -math.inf)
        row_max, at_max = s.max(1, keepdim=True)
        chunk_loss = row_max.sub_(s.gather(1, target))  # max_j s_ij - s_i,t(i)
        torch.softmax(s, 1, out=s)
        chunk_loss.sub_(s.gather(1, at_max).log_())  # - log max_j P_ij: read where s was largest
        chunk_sum = chunk_loss.sum()
        loss = chunk_sum if loss is None else loss.add_(chunk_sum)
        if not want:
            continue
        # P - Y with Y's column as -sum_{j != t} P_ij: P_it - 1 would carry P_it's rounding near 1
        # (6e-8) times s_it ~ 1/tau into finish's <dq, q> (dtau, the normalisation) for a small loss
        s.scatter_(1, target, s.scatter_(1, target, 0.0).sum(1, keepdim=True).neg_())
        if gc is not None:  # torch.addmm(out=) rather than addmm_: FlopCounterMode counts it
            torch.addmm(gc, s.T, scaled, beta=0 if rows.start == 0 else 1, out=gc)
        if gq is not None:
            if rc is not None:
                s.mul_(rc)
            torch.mm(s, c, out=gq[rows]).mul_(a_rows * weight)
    if rc is None or ids is not None:  # an Inf candidate a -Inf logit would hide: the loss is NaN
        guard_infinite_candidates_(loss, c)
    if gc is not None:
        gc.mul_(rc[:, None] * weight if rc is not None else weight)
    return loss.mul_(weight), gq, gc


def _scratch_chunks(n_rows: int, n_cols: int, dim: int, step: int, acc: torch.dtype, device):
    """(rows, scratch of rows * (n_cols + dim) elements) per chunk, from one buffer."""
    step = min(step, n_rows)
    buffer = torch.empty(step * (n_cols + dim), dtype=acc, device=device)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        yield slice(start, stop), buffer[: (stop - start) * (n_cols + dim)]


def finish(
    dq: Tensor | None,
    q: Tensor,
    rq: Tensor | None,
    dc: Tensor | None,
    c: Tensor,
    rc: Tensor | None,
    tau: float | Tensor,
    want_dtau: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The normalisation's Jacobian in place (rows.project_) and dtau = -1/tau sum_i <dq_i, q_i>."""
    dtau = None
    if dq is not None:
        dots = row_dots(dq, q)
        if want_dtau:
            dtau = dots.sum().mul_(-inverse_temperature(tau, dq.dtype))
        if rq is not None:
            project_(dq, q, dots, rq)
    if dc is not None and rc is not None:
        project_(dc, c, row_dots(dc, c), rc)
    return dq, dc, dtau


def scale_grads(
    grads: list[Tensor | None], grad_out: Tensor, dtypes: list[torch.dtype]
) -> list[Tensor | None]:
    """grad * grad_out, rounded once to each dtype (in place when the dtype is the buffer's)."""
    out = []
    for g, dtype in zip(grads, dtypes):
        if g is None:
            out.append(None)
        elif g.dtype == dtype:
            out.append(g.mul_(grad_out))
        else:
            out.append(torch.mul(g, grad_out, out=torch.empty(g.shape, dtype=dtype, device=g.device)))
    return out
