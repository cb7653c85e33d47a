"""Pure-torch pieces of the contrastive loss: the float64 reference and the chunked engine.

`reference_contrastive_loss` is written straight from the formula with the whole Bq x Bc logit matrix
in float64; tests compare every backend against it and `backend="reference"` calls it.

The engine (`row_lse`, `softmax_grad`, `row_lse_and_grad`) computes the one piece that needs a custom
autograd rule, the row log-sum-exp over all candidates,

    lse_i = log sum_j exp(s_ij),   s_ij = row_scale_i * col_scale_j * <q_i, c_j>,

walking over blocks of rows so that at most `chunk * N` logits exist at once (never M x N). The passes
that produce gradients (`softmax_grad`, `row_lse_and_grad`) need little chunk memory of their own:
most of their chunks live in the query-gradient rows not yet written (`_gradient_chunks`). It has the
same interface as `triton_contrastive.py`; `contrastive.py` picks one. Accumulation happens in the
dtype of `row_scale` (float32, or float64 for gradcheck); q and c may be any float dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest number of logits one chunk may hold: 2**22 fp32 = 16 MiB. Tests lower it to force many chunks.
MAX_CHUNK_ELEMENTS = 2**22
# The gradient pass needs little chunk memory of its own: each chunk's logits and scaled rows live in
# the rows of the query-gradient buffer that no chunk has written yet (`_gradient_chunks`), in chunks
# of up to TAIL_CHUNK_FACTOR times the usual size (fewer, larger GEMMs). Only the last rows, where that
# free tail gets too small, use a spare buffer sized from a memory budget: SPARE_BUDGET of the engine's
# gradient buffers ((M + N) * D elements), but at least MIN_SPARE_ROWS rows and at most one usual
# chunk. At B = 8192, D = 1536 that is 258 rows (9.6 MiB, 10% of the gradients; a full 512-row
# chunk: 19 MiB). The floor keeps the chunk count low: each chunk is ~10 ops, and on a loaded 2-core box
# every parallel op waits for both threads (B = 8192, D = 256 took 4.9 s with 64-row chunks, 2.6 s
# with 256, 1.7 s with 512; eager 1.65 s).
TAIL_CHUNK_FACTOR = 2
SPARE_BUDGET = 1 / 10
MIN_SPARE_ROWS = 256


def reference_contrastive_loss(
    query: Tensor,
    candidates: Tensor,
    temperature: float | Tensor,
    *,
    normalize: bool,
    targets: Tensor,
    symmetric: bool,
    reduction: str,
) -> Tensor:
    """InfoNCE in float64 from the formula, materialising the full logit matrix (tests only).

    `targets` [Bq] holds the index of each query's positive in `candidates`. The symmetric direction
    scores each positive `candidates[targets[i]]` against all queries, with query i as its target.
    Returns a float64 scalar (mean/sum) or [Bq] vector (none); gradients flow to the inputs.
    """
    q = query.double()
    c = candidates.double()
    tau = temperature.double() if isinstance(temperature, Tensor) else float(temperature)
    if normalize:
        q = F.normalize(q, dim=1)
        c = F.normalize(c, dim=1)
    rows = torch.arange(q.shape[0], device=q.device)
    logits = q @ c.T / tau
    losses = torch.logsumexp(logits, dim=1) - logits[rows, targets]
    if symmetric:
        reverse = c[targets] @ q.T / tau
        reverse_losses = torch.logsumexp(reverse, dim=1) - reverse[rows, rows]
        losses = 0.5 * (losses + reverse_losses)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


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
    elif first:
        torch.mm(probs.T, weighted_rows, out=gc)
    else:
        gc.addmm_(probs.T, weighted_rows)
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
    return _lse_and_grads(q, c, row_scale, col_scale, row_weight, with_lse=False)[1:]


def row_lse_and_grad(
    q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor, row_weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`row_lse` and `softmax_grad` in one pass (each chunk holds every column, so its softmax is final
    before the gradient needs it). Used when the loss is a scalar whose per-row weights are known in
    the forward: saves recomputing the logits (6 instead of 8 B^2 D FLOP). row_weight None means all
    ones (no multiply at all)."""
    return _lse_and_grads(q, c, row_scale, col_scale, row_weight, with_lse=True)


def _lse_and_grads(
    q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor, row_weight: Tensor | None, with_lse: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    acc = row_scale.dtype
    c = c.to(acc)
    c_t = c.T
    (n_rows, dim), n_cols = q.shape, c.shape[0]
    step = _chunk_rows(n_rows, n_cols)
    if step >= n_rows:  # one chunk: the matmuls allocate what they need
        probs, scaled_rows, lse = _softmax_chunk_(q, c_t, row_scale, col_scale, None, None, with_lse)
        gq, gc = _accumulate_grads_(probs, row_weight, scaled_rows, c, col_scale, None, None, True)
        return lse, gq, gc
    gq = torch.empty(n_rows, dim, dtype=acc, device=q.device)
    gc = torch.empty(n_cols, dim, dtype=acc, device=q.device)
    lse = torch.empty(n_rows, dtype=acc, device=q.device) if with_lse else None
    for rows, scratch in _gradient_chunks(gq, n_cols, step):
        count = rows.stop - rows.start
        logits = scratch[: count * n_cols].view(count, n_cols)
        rows_out = scratch[count * n_cols :].view(count, dim)
        probs, scaled_rows, chunk_lse = _softmax_chunk_(
            q[rows], c_t, row_scale[rows], col_scale, logits, rows_out, with_lse
        )
        if with_lse:
            lse[rows] = chunk_lse
        _accumulate_grads_(
            probs, _part(row_weight, rows), scaled_rows, c, col_scale, gq[rows], gc, rows.start == 0
        )
    return lse, gq, gc
