"""The recompute path of the contrastive loss: symmetric losses and per-row losses (reduction="none").

What the gradients-in-the-forward path (`fused.py`) cannot do exactly runs here: a symmetric loss needs
every column's log-sum-exp before any row's gradient, and per-row losses take an arbitrary upstream
gradient that is known only in the backward. The forward computes the row log-sum-exp (engine
`row_lse`), the backward recomputes the logits (`softmax_grad`): 8 B^2 D FLOPs per direction.

Around the engine one autograd Function, `_InfoNCE`, adds the L2 normalisation, the temperature, the
positive logit and (for `symmetric`) the reverse direction, with their gradients in closed form
written in place into the engine's fp32 buffers. Plain autograd only does the cross-rank gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .distributed import gather_rows
from .engine import LossCall, accumulation_dtype
from .rows import (
    batched_dots,
    block_rows,
    blocks,
    clamp_targets,
    dots_in_one_op,
    guard_infinite_candidates_,
    inverse_norm,
    inverse_temperature,
    nan_where,
    project_,
    row_dots,
)

# ----------------------------------------------------------------------------------------------------
# O(B*D) pieces of the positive pair, in one block unless the rows exceed the device's block bound

Positives = slice | Tensor  # rows of B holding each query's positive: a strided slice or indices


def _sub_positives(positives: Positives, block: slice) -> Positives:
    """The positives of rows `block`: a sub-slice (still a view) or a slice of the indices."""
    if isinstance(positives, slice):
        picked = range(positives.start, positives.stop, positives.step)[block]
        return slice(picked.start, picked.stop, picked.step)
    return positives[block]


def _take(x: Tensor, positives: Positives) -> Tensor:
    return x[positives] if isinstance(positives, slice) else x.index_select(0, positives)


def _positive_logits(
    rows: Tensor, cands: Tensor, positives: Positives, cand_rows: Tensor | None, scale: Tensor
) -> Tensor:
    """scale_i * <rows_i, cands[positives_i]> [n] in the dtype of scale ([n, 1], fp32 or fp64).

    The scale multiplies first, so 16-bit rows are promoted and every product and the sum run in fp32.
    `cand_rows`: cands[positives] when already at hand (a view, or the symmetric case's gathered rows).
    """
    step = block_rows(rows)
    if rows.shape[0] <= step:
        cand_rows = _take(cands, positives) if cand_rows is None else cand_rows
        return (rows * scale).mul_(cand_rows).sum(1)
    if cand_rows is not None and dots_in_one_op(rows, cand_rows, scale.dtype):
        return batched_dots(rows, cand_rows).mul_(scale[:, 0])
    out = torch.empty(rows.shape[0], dtype=scale.dtype, device=rows.device)
    for block in blocks(rows.shape[0], step):
        picked = _take(cands, _sub_positives(positives, block)) if cand_rows is None else cand_rows[block]
        torch.sum((rows[block] * scale[block]).mul_(picked), 1, out=out[block])
    return out


def _add_positive_rows_(
    g: Tensor, cands: Tensor, positives: Positives, cand_rows: Tensor | None, coef: Tensor, value: float
) -> None:
    """g_i += value * coef_i * cands[positives_i] (the positive pair's term of the row gradient)."""
    if cand_rows is not None:
        g.addcmul_(cand_rows, coef, value=value)
        return
    step = block_rows(g)
    if g.shape[0] <= step:
        g.addcmul_(cands.index_select(0, positives), coef, value=value)
        return
    for block in blocks(g.shape[0], step):
        g[block].addcmul_(cands.index_select(0, positives[block]), coef[block], value=value)


def _scatter_positive_rows_(
    g: Tensor,
    positives: Positives,
    rows: Tensor,
    coef: Tensor,
    value: float,
    reverse: Tensor | None,
    inv_tau: float | Tensor,
) -> None:
    """g[positives_i] += value * coef_i * rows_i (+ inv_tau * reverse_i): the candidate gradient's
    positive-pair term and, for `symmetric`, the reverse direction's row gradient."""
    if isinstance(positives, slice):
        target = g[positives]
        if reverse is not None:
            _add_scaled_(target, reverse, inv_tau)
        target.addcmul_(rows, coef, value=value)
        return
    if reverse is not None:  # the reverse gradient's buffer takes the positive term, then one scatter
        reverse.mul_(inv_tau).addcmul_(rows, coef, value=value)
        g.index_add_(0, positives, reverse)
        return
    step = block_rows(rows)
    if rows.shape[0] <= step:
        g.index_add_(0, positives, rows * coef, alpha=value)
        return
    for block in blocks(rows.shape[0], step):
        g.index_add_(0, positives[block], rows[block] * coef[block], alpha=value)


def _add_scaled_(g: Tensor, x: Tensor, factor: float | Tensor) -> Tensor:
    """g += factor * x, factor a number or a 0-dim tensor (no host read)."""
    return g.add_(x, alpha=factor) if isinstance(factor, float) else g.addcmul_(x, factor)


def _finish_input_grad(
    g: Tensor, x: Tensor, dots: Tensor | None, r: Tensor | None, scale: Tensor | None, weight: Tensor | None
) -> Tensor:
    """In place g -> dL/dx = weight * scale * (g - <g, x> r^2 x) (the projection for normalised rows,
    r their inverse norms), then rounded once to x's dtype."""
    if dots is not None:
        project_(g, x, dots, r.view(-1))
    factor = scale if weight is None else (weight if scale is None else scale * weight)
    if factor is not None:
        g.mul_(factor)
    return g.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# the autograd function


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a differentiable tensor."""

    engine: ModuleType
    engine_dtype: torch.dtype | None  # dtype the engine needs q and c in; None: any
    normalize: bool
    symmetric: bool
    positives: Positives  # row of B holding each local query's positive
    bad_positives: Tensor | None  # [n, 1] rows whose target was out of range (device check)
    local: slice | None  # the local queries' rows of A (None: all of A)
    inv_tau: float | None  # 1 / temperature when it is a number (else the tau input is a tensor)
    tau_checked: bool  # a tensor temperature's value was checked on the host
    as_sum: bool  # scalar loss (mean/sum) rather than per-row losses
    use_mean: bool  # the scalar is the mean over the rows (else the sum times out_scale)
    out_scale: float  # d scalar / d sum of the row losses


class _Saved(NamedTuple):
    """What the forward keeps for the backward (None where the call does not need it)."""

    A: Tensor
    B: Tensor
    tau: Tensor | None
    inv_tau: Tensor | None  # 1 / tau as a tensor (tensor temperature)
    ra: Tensor | None  # [n, 1] inverse norms (normalize)
    rb: Tensor  # [n, 1] inverse norms, or ones
    a: Tensor  # [n, 1] ra / tau
    rb_p: Tensor  # rb of each local query's positive, NaN for bad targets
    B_p: Tensor | None
    A_e: Tensor  # A, B, B_p in the engine's dtype
    B_e: Tensor
    B_p_e: Tensor | None
    row_scale: Tensor
    col_scale: Tensor
    reverse_row_scale: Tensor | None
    reverse_col_scale: Tensor | None
    lse: Tensor
    reverse_lse: Tensor | None


def _for_engine(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


def _local(x: Tensor | None, rows: slice | None) -> Tensor | None:
    return x if rows is None or x is None else x[rows]


class _InfoNCE(torch.autograd.Function):
    """Per-row InfoNCE of the local queries A[local] against all candidates B (and, if symmetric, of
    their positives B[p] against all of A), with s_ij = ra_i rb_j <A_i, B_j> / tau, ra/rb inverse norms
    when normalising (else 1): loss_i = h (lse_i + lse'_i) - s_i,p(i), h = 1/2 if symmetric (else the
    reverse term is absent and h = 1); reduced to a scalar unless reduction="none".

    Backward, with the engine's G, H (gradient pieces of the LSEs) and a = ra / tau: the gradient of A
    holding the norms is M a (G - B[p] rb_p / h + tau H') in one fp32 buffer, that of B is M rb (H +
    scatter_p(G' / tau - a A / h)) (M: the upstream weight times h), and the norms add a projection
    term per row. dL/dtau comes from A alone: every logit involves exactly one row of A, so
    tau dL/dtau = -sum_j ra_j dL/dra_j.
    """

    @staticmethod
    def forward(ctx, a_rows: Tensor, b_rows: Tensor, tau: Tensor | None, plan: _Plan) -> Tensor:
        A, B, p = a_rows, b_rows, plan.positives
        acc = accumulation_dtype(A.dtype)  # the query dtype, or fp32 / fp64 copies (distributed)
        inv_tau = plan.inv_tau if tau is None else inverse_temperature(tau, acc, plan.tau_checked)
        if plan.normalize:
            ra, rb = inverse_norm(A).unsqueeze(1), inverse_norm(B).unsqueeze(1)
            a = ra * inv_tau
        else:
            ra = torch.ones(A.shape[0], 1, dtype=acc, device=A.device) if plan.symmetric else None
            rb = torch.ones(B.shape[0], 1, dtype=acc, device=B.device)
            a = _filled(A.shape[0], inv_tau, acc, A.device)
        a_local, A_local = _local(a, plan.local), _local(A, plan.local)
        rb_p = _take(rb, p)
        if plan.bad_positives is not None:  # fresh (index_select): poisoning it leaves rb intact
            nan_where(rb_p, plan.bad_positives)
        # the positive rows as a view (default layout) or gathered once when the reverse direction
        # needs them as its rows anyway; None: gathered block by block where used
        B_p = _take(B, p) if plan.symmetric or isinstance(p, slice) else None
        positive = _positive_logits(A_local, B, p, B_p, a_local * rb_p)

        A_e, B_e = _for_engine(A, plan.engine_dtype), _for_engine(B, plan.engine_dtype)
        row_scale, col_scale = a_local.view(-1), rb.view(-1)
        engine = plan.engine
        lse = engine.row_lse(_local(A_e, plan.local), B_e, row_scale, col_scale)
        B_p_e = reverse_row_scale = reverse_col_scale = reverse_lse = None
        if plan.symmetric:
            B_p_e = _for_engine(B_p, plan.engine_dtype)
            reverse_row_scale, reverse_col_scale = (rb_p * inv_tau).view(-1), ra.view(-1)
            reverse_lse = engine.row_lse(B_p_e, A_e, reverse_row_scale, reverse_col_scale)
            losses = torch.lerp(lse, reverse_lse, 0.5).sub_(positive)
        else:
            losses = lse - positive
        if not plan.normalize:
            guard_infinite_candidates_(losses, B)

        ctx.plan = plan
        ctx.inv_tau = inv_tau if isinstance(inv_tau, float) else None
        ctx.save_for_backward(
            *_Saved(
                A, B, tau, None if isinstance(inv_tau, float) else inv_tau, ra if plan.normalize else None,
                rb, a, rb_p, B_p, A_e, B_e, B_p_e, row_scale, col_scale, reverse_row_scale,
                reverse_col_scale, lse, reverse_lse,
            )
        )  # fmt: skip
        if not plan.as_sum:
            return losses
        total = losses.mean() if plan.use_mean else losses.sum()
        return total if plan.use_mean or plan.out_scale == 1 else total.mul_(plan.out_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        plan, saved = ctx.plan, _Saved(*ctx.saved_tensors)
        A, B, tau, a, rb = saved.A, saved.B, saved.tau, saved.a, saved.rb
        inv_tau = ctx.inv_tau if saved.inv_tau is None else saved.inv_tau
        h = 0.5 if plan.symmetric else 1.0
        a_local, A_local, p = _local(a, plan.local), _local(A, plan.local), plan.positives
        # weights: a scalar loss folds its upstream weight into the final per-row scales (the engine
        # runs with unit weights); per-row losses hand the engine their weights
        if plan.as_sum:
            factor = plan.out_scale * h
            weight, row_weight = (grad_out if factor == 1 else grad_out * factor), None
            row_coef, col_coef = saved.rb_p, a_local
        else:
            weight, row_weight = None, (grad_out if h == 1 else grad_out * h)
            column = row_weight.unsqueeze(1)
            row_coef, col_coef = saved.rb_p * column, a_local * column

        engine_weight = torch.ones_like(saved.lse) if row_weight is None else row_weight
        grads = list(
            plan.engine.softmax_grad(
                _local(saved.A_e, plan.local), saved.B_e, saved.row_scale, saved.col_scale, saved.lse,
                engine_weight,
            )
        )  # fmt: skip
        if plan.symmetric:
            grads += plan.engine.softmax_grad(
                saved.B_p_e, saved.A_e, saved.reverse_row_scale, saved.reverse_col_scale,
                saved.reverse_lse, engine_weight,
            )  # fmt: skip
        g_a, g_b = grads[0], grads[1]  # queries' rows, all candidates

        _add_positive_rows_(g_a, B, p, saved.B_p, row_coef, -1 / h)
        if plan.symmetric:  # + tau * (gradient of A as the reverse direction's candidates)
            reverse_rows, reverse_cands = grads[2], grads[3]
            tau_value = 1 / inv_tau if isinstance(inv_tau, float) else tau
            if plan.local is None:
                _add_scaled_(g_a, reverse_cands, tau_value)
            else:
                g_a_local = g_a
                g_a = reverse_cands.mul_(tau_value)
                g_a[plan.local].add_(g_a_local)
        else:
            reverse_rows = None
        _scatter_positive_rows_(g_b, p, A_local, col_coef, -1 / h, reverse_rows, inv_tau)

        need_a, need_b, need_tau = ctx.needs_input_grad[:3]
        d_a = d_b = d_tau = None
        if need_a or need_tau:
            dots = row_dots(g_a, A) if plan.normalize or need_tau else None
            if need_tau:
                d_tau = (a.view(-1) * dots).sum() * (-inv_tau)
                d_tau = d_tau if weight is None else d_tau.mul_(weight)
            if need_a:
                d_a = _finish_input_grad(g_a, A, dots if plan.normalize else None, saved.ra, a, weight)
        if need_b:
            dots = row_dots(g_b, B) if plan.normalize else None
            d_b = _finish_input_grad(g_b, B, dots, rb, rb if plan.normalize else None, weight)
        return d_a, d_b, d_tau, None


def _filled(n: int, value: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, 1] filled with a number or a 0-dim tensor's value (no host read)."""
    if isinstance(value, float):
        return torch.full((n, 1), value, dtype=dtype, device=device)
    return value.to(dtype).repeat(n, 1)


def recompute_loss(query: Tensor, candidates: Tensor, tau: float | Tensor, call: LossCall) -> Tensor:
    """The loss of one checked call through `_InfoNCE` (gathering across `call.layout.group`)."""
    layout = call.layout
    acc = accumulation_dtype(query.dtype)
    tau_input = tau.to(device=query.device, dtype=acc) if isinstance(tau, Tensor) else None
    n_q, n_c = query.shape[0], candidates.shape[0]
    targets, bad_targets = call.targets, None
    if not call.targets_checked:  # clamped into range, those rows' scales poisoned with NaN in the forward
        targets, bad_targets = clamp_targets(targets, n_c)
        bad_targets = bad_targets.unsqueeze(1)
    if layout.group is None:
        a_rows, b_rows, local = query, candidates, None
    else:  # gathered in fp32: the reduce-scatter of their gradients sums in fp32, rounded once
        b_rows = gather_rows(candidates.to(acc), layout.counts_c, layout.group)
        if call.symmetric:
            a_rows = gather_rows(query.to(acc), layout.counts_q, layout.group)
            local = slice(layout.q_offset, layout.q_offset + n_q)
        else:
            a_rows, local = query, None
    c_offset = layout.c_offset
    if targets is None:  # default layout: positives at c_offset, c_offset + (1 + K), ...
        stride = n_c // n_q
        positives = slice(c_offset, c_offset + n_q * stride, stride)
    else:
        positives = targets + c_offset if c_offset else targets
    plan = _Plan(
        engine=call.engine,
        engine_dtype=query.dtype if call.engine.OPERANDS_IN_INPUT_DTYPE else None,
        normalize=call.normalize,
        symmetric=call.symmetric,
        positives=positives,
        bad_positives=bad_targets,
        local=local,
        inv_tau=None if tau_input is not None else inverse_temperature(tau, acc),
        tau_checked=call.tau_checked,
        as_sum=call.reduction != "none",
        use_mean=call.reduction == "mean" and layout.world == 1,
        out_scale=layout.scale(call.reduction),
    )
    return _InfoNCE.apply(a_rows, b_rows, tau_input, plan)
