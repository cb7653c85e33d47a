"""Pure-torch pieces of the contrastive loss: the float64 reference and the chunked engine.

`reference_contrastive_loss` is written straight from the formula with the whole Bq x Bc logit matrix
in float64; tests compare every backend against it and `backend="reference"` calls it.

The engine (`row_lse`, `softmax_grad`, `row_lse_and_grad`) computes the one piece that needs a custom
autograd rule, the row log-sum-exp over all candidates,

    lse_i = log sum_j exp(s_ij),   s_ij = row_scale_i * col_scale_j * <q_i, c_j>,

walking over blocks of rows so that at most `chunk * N` logits exist at once (never M x N). It has the
same interface as `triton_contrastive.py`; `contrastive.py` picks one. Accumulation happens in the dtype
of `row_scale` (float32, or float64 for gradcheck); q and c may be any float dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest number of logits one chunk may hold: 2**22 fp32 = 16 MiB. Tests lower it to force many chunks.
MAX_CHUNK_ELEMENTS = 2**22
# exp() of arguments below about -87 yields fp32 denormals, which run ~20x slower on CPUs; such terms are
# under 1e-37 of a row sum that is >= 1, so flooring the argument changes nothing representable.
EXP_FLOOR = -87.0


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


def _raw_logits(q_rows: Tensor, c: Tensor, row_scale: Tensor, out: Tensor) -> Tensor:
    """Writes (row_scale * q_rows) @ c.T into `out` (col_scale not applied yet); returns the scaled rows."""
    scaled_rows = q_rows.to(row_scale.dtype) * row_scale[:, None]
    torch.mm(scaled_rows, c.T, out=out)
    return scaled_rows


def _exp_(shifted: Tensor) -> Tensor:
    """In place exp, with arguments floored at EXP_FLOOR (NaN stays NaN)."""
    return shifted.clamp_min_(EXP_FLOOR).exp_()


def _lse_and_exp_(logits: Tensor) -> tuple[Tensor, Tensor]:
    """In place: logits -> exp(logits - rowmax). Returns (lse, rowsum of the exponentials).

    NaN and +-Inf propagate: amax keeps NaN, and Inf - Inf gives NaN, so a bad row never looks finite.
    """
    row_max = logits.amax(dim=1)
    _exp_(logits.sub_(row_max[:, None]))
    row_sum = logits.sum(dim=1)
    return row_max.add_(row_sum.log()), row_sum


def _accumulate_grads(
    exps: Tensor,
    row_factor: Tensor,
    scaled_rows: Tensor,
    c: Tensor,
    col_scale: Tensor,
    gq_rows: Tensor,
    gc: Tensor,
    first: bool,
) -> None:
    """With P = row_factor[:, None] * exps: gc += P^T (row_scale q) and gq_rows = (P * col_scale) c.

    The row factor is folded into the [rows, D] operands, so the chunk itself is touched only once more
    (the col_scale multiply)."""
    weighted_rows = scaled_rows.mul_(row_factor[:, None])
    if first:
        torch.mm(exps.T, weighted_rows, out=gc)
    else:
        gc.addmm_(exps.T, weighted_rows)
    torch.mm(exps.mul_(col_scale), c, out=gq_rows)
    gq_rows.mul_(row_factor[:, None])


def _chunks(n_rows: int, n_cols: int, q: Tensor, acc: torch.dtype):
    """(start, stop, logits buffer view) over row blocks; the buffer is allocated once."""
    step = _chunk_rows(n_rows, n_cols)
    buffer = torch.empty(step, n_cols, dtype=acc, device=q.device)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        yield start, stop, buffer[: stop - start]


def row_lse(q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor) -> Tensor:
    """lse_i = log sum_j exp(row_scale_i * col_scale_j * <q_i, c_j>).

    q [M, D], c [N, D] (any float dtype), row_scale [M], col_scale [N] (accumulation dtype, fp32 or
    fp64). Returns lse [M] in the accumulation dtype. Extra memory: one chunk of logits + c upcast.
    """
    acc = row_scale.dtype
    c = c.to(acc)
    lse = torch.empty(q.shape[0], dtype=acc, device=q.device)
    for start, stop, logits in _chunks(q.shape[0], c.shape[0], q, acc):
        _raw_logits(q[start:stop], c, row_scale[start:stop], logits)
        lse[start:stop] = _lse_and_exp_(logits.mul_(col_scale))[0]
    return lse


def softmax_grad(
    q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor, lse: Tensor, row_weight: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradient pieces of sum_i row_weight_i * lse_i, recomputing the logits chunk by chunk.

    With P_ij = row_weight_i * exp(s_ij - lse_i): gq_i = sum_j P_ij col_scale_j c_j [M, D] and
    gc_j = sum_i P_ij row_scale_i q_i [N, D], both in the accumulation dtype (so dL/dq = row_scale * gq,
    dL/drow_scale = <gq_i, q_i>, and likewise for the candidates). gc accumulates across chunks.
    """
    acc = row_scale.dtype
    c = c.to(acc)
    gq = torch.empty(q.shape[0], c.shape[1], dtype=acc, device=q.device)
    gc = torch.empty(c.shape[0], c.shape[1], dtype=acc, device=q.device)
    for start, stop, logits in _chunks(q.shape[0], c.shape[0], q, acc):
        scaled_rows = _raw_logits(q[start:stop], c, row_scale[start:stop], logits)
        _exp_(torch.addcmul(-lse[start:stop, None], logits, col_scale, out=logits))  # s - lse
        weight = row_weight[start:stop]
        _accumulate_grads(logits, weight, scaled_rows, c, col_scale, gq[start:stop], gc, first=start == 0)
    return gq, gc


def row_lse_and_grad(
    q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor, row_weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`row_lse` and `softmax_grad` in one pass (each chunk holds every column, so its lse is final
    before its probabilities are needed). Used when the loss is a scalar whose per-row weights are
    known in the forward: saves recomputing the logits (6 instead of 8 B^2 D FLOP)."""
    acc = row_scale.dtype
    c = c.to(acc)
    lse = torch.empty(q.shape[0], dtype=acc, device=q.device)
    gq = torch.empty(q.shape[0], c.shape[1], dtype=acc, device=q.device)
    gc = torch.empty(c.shape[0], c.shape[1], dtype=acc, device=q.device)
    for start, stop, logits in _chunks(q.shape[0], c.shape[0], q, acc):
        scaled_rows = _raw_logits(q[start:stop], c, row_scale[start:stop], logits)
        lse[start:stop], row_sum = _lse_and_exp_(logits.mul_(col_scale))
        factor = row_weight[start:stop] / row_sum
        _accumulate_grads(logits, factor, scaled_rows, c, col_scale, gq[start:stop], gc, first=start == 0)
    return lse, gq, gc
