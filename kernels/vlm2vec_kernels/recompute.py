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

import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import torch_engine
from .distributed import gather_rows
from .engine import NORM_EPS, accumulation_dtype, inverse

# Bound on the [rows, D] fp32 temporaries of the positive pair and the normalisation gradient. On a
# GPU one block covers every batch below 2**28 elements, so the op count does not grow with B. On the
# CPU blocks stay at 256 KiB: the host allocator then reuses freed chunks. Row dot products of rows
# already in the accumulation dtype skip the blocks: one batched matrix product with no temporary.
ROW_BLOCK_ELEMENTS = 2**16
DEVICE_ROW_BLOCK_ELEMENTS = 2**28


# ----------------------------------------------------------------------------------------------------
# O(B*D) pieces, in one block unless the rows exceed the device's block bound

Positives = slice | Tensor  # rows of B holding each query's positive: a strided slice or indices


def _block_rows(x: Tensor) -> int:
    """Rows per block of x's [rows, D] fp32 temporaries (all rows unless huge on a GPU)."""
    elements = ROW_BLOCK_ELEMENTS if x.device.type == "cpu" else DEVICE_ROW_BLOCK_ELEMENTS
    return max(1, elements // x.shape[1])


def _blocks(n: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _sub_positives(positives: Positives, block: slice) -> Positives:
    """The positives of rows `block`: a sub-slice (still a view) or a slice of the indices."""
    if isinstance(positives, slice):
        picked = range(positives.start, positives.stop, positives.step)[block]
        return slice(picked.start, picked.stop, picked.step)
    return positives[block]


def _dots_in_one_op(x: Tensor, y: Tensor, dtype: torch.dtype) -> bool:
    """Whether <x_i, y_i> can run as one batched matrix product: both already in the accumulation
    dtype (16-bit rows are promoted block by block instead) and with unit stride along D (else the
    product would copy them)."""
    return x.dtype == y.dtype == dtype and x.stride(1) == 1 and y.stride(1) == 1


def _batched_dots(x: Tensor, y: Tensor) -> Tensor:
    """<x_i, y_i> [rows] as a batch of [1, D] x [D, 1] products: one op and no [rows, D] temporary
    (row blocks of elementwise products cost hundreds of small ops at large B on the CPU)."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def _take(x: Tensor, positives: Positives) -> Tensor:
    return x[positives] if isinstance(positives, slice) else x.index_select(0, positives)


def _positive_logits(
    rows: Tensor, cands: Tensor, positives: Positives, cand_rows: Tensor | None, scale: Tensor
) -> Tensor:
    """scale_i * <rows_i, cands[positives_i]> [n] in the dtype of scale ([n, 1], fp32 or fp64).

    The scale multiplies first, so 16-bit rows are promoted and every product and the sum run in fp32.
    `cand_rows`: cands[positives] when already at hand (a view, or the symmetric case's gathered rows).
    """
    step = _block_rows(rows)
    if rows.shape[0] <= step:
        cand_rows = _take(cands, positives) if cand_rows is None else cand_rows
        return (rows * scale).mul_(cand_rows).sum(1)
    if cand_rows is not None and _dots_in_one_op(rows, cand_rows, scale.dtype):
        return _batched_dots(rows, cand_rows).mul_(scale[:, 0])
    out = torch.empty(rows.shape[0], dtype=scale.dtype, device=rows.device)
    for block in _blocks(rows.shape[0], step):
        picked = _take(cands, _sub_positives(positives, block)) if cand_rows is None else cand_rows[block]
        torch.sum((rows[block] * scale[block]).mul_(picked), 1, out=out[block])
    return out


def _row_dots(g: Tensor, x: Tensor) -> Tensor:
    """<g_i, x_i> as [rows, 1] in g's dtype (x may be 16-bit: the product promotes to g's dtype)."""
    step = _block_rows(g)
    if g.shape[0] <= step:
        return (g * x).sum(1, keepdim=True)
    if _dots_in_one_op(g, x, g.dtype):
        return _batched_dots(g, x).unsqueeze(1)
    out = torch.empty(g.shape[0], 1, dtype=g.dtype, device=g.device)
    for block in _blocks(g.shape[0], step):
        torch.sum(g[block] * x[block], 1, keepdim=True, out=out[block])
    return out


def _add_positive_rows_(
    g: Tensor, cands: Tensor, positives: Positives, cand_rows: Tensor | None, coef: Tensor, value: float
) -> None:
    """g_i += value * coef_i * cands[positives_i] (the positive pair's term of the row gradient)."""
    if cand_rows is not None:
        g.addcmul_(cand_rows, coef, value=value)
        return
    step = _block_rows(g)
    if g.shape[0] <= step:
        g.addcmul_(cands.index_select(0, positives), coef, value=value)
        return
    for block in _blocks(g.shape[0], step):
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
    step = _block_rows(rows)
    if rows.shape[0] <= step:
        g.index_add_(0, positives, rows * coef, alpha=value)
        return
    for block in _blocks(rows.shape[0], step):
        g.index_add_(0, positives[block], rows[block] * coef[block], alpha=value)


def _add_scaled_(g: Tensor, x: Tensor, factor: float | Tensor) -> Tensor:
    """g += factor * x, factor a number or a 0-dim tensor (no host read)."""
    return g.add_(x, alpha=factor) if isinstance(factor, float) else g.addcmul_(x, factor)


def _finish_input_grad(
    g: Tensor,
    x: Tensor,
    dots: Tensor | None,
    norms: Tensor | None,
    scale: Tensor | None,
    weight: Tensor | None,
) -> Tensor:
    """In place g -> dL/dx = weight * scale * (g - <g, x> / |x|^2 x) for normalised rows (no projection
    term for rows with |x| <= eps, as F.normalize), then rounded once to x's dtype."""
    if dots is not None:
        # threshold: |x| where |x| > eps, else Inf (dividing by it drops the term); NaN stays NaN
        g.addcmul_(x, dots.div_(torch.threshold(norms, NORM_EPS, math.inf).square_()), value=-1)
    factor = scale if weight is None else (weight if scale is None else scale * weight)
    if factor is not None:
        g.mul_(factor)
    return g.to(x.dtype)


def _inverse_temperature(tau: Tensor, checked: bool) -> Tensor:
    """1 / tau as a 0-dim tensor. An unchecked (device) tau that is <= 0, Inf or NaN gives NaN:
    log(tau) is then NaN or +-Inf, and lerp(r, l, 0) = r + 0 * (l - r) turns that into NaN while
    returning r = 1/tau exactly otherwise. Three tiny ops instead of a host sync."""
    inverse = tau.reciprocal()
    return inverse if checked else torch.lerp(inverse, tau.log(), 0.0)


# ----------------------------------------------------------------------------------------------------
# the autograd function


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a differentiable tensor."""

    engine: ModuleType
    engine_dtype: torch.dtype | None  # dtype the engine needs q and c in; None: any (torch engine)
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
        inv_tau = plan.inv_tau if tau is None else _inverse_temperature(tau, plan.tau_checked)
        if plan.normalize:
            a_norms = torch.linalg.vector_norm(A, dim=1, keepdim=True, dtype=acc)
            b_norms = torch.linalg.vector_norm(B, dim=1, keepdim=True, dtype=acc)
            ra = a_norms.clamp_min(NORM_EPS).reciprocal_()
            rb = b_norms.clamp_min(NORM_EPS).reciprocal_()
            a = ra * inv_tau if plan.symmetric else ra.mul_(inv_tau)
        else:
            a_norms = b_norms = None
            ra = torch.ones(A.shape[0], 1, dtype=acc, device=A.device) if plan.symmetric else None
            rb = torch.ones(B.shape[0], 1, dtype=acc, device=B.device)
            a = _filled(A.shape[0], inv_tau, acc, A.device)
        a_local, A_local = _local(a, plan.local), _local(A, plan.local)
        rb_p = _take(rb, p)
        if plan.bad_positives is not None:  # fresh (index_select): poisoning it leaves rb intact
            rb_p.masked_fill_(plan.bad_positives, math.nan)
        # the positive rows as a view (default layout) or gathered once when the reverse direction
        # needs them as its rows anyway; None: gathered block by block where used
        B_p = _take(B, p) if plan.symmetric or isinstance(p, slice) else None
        positive = _positive_logits(A_local, B, p, B_p, a_local * rb_p)

        A_e, B_e = _for_engine(A, plan.engine_dtype), _for_engine(B, plan.engine_dtype)
        A_local_e = _local(A_e, plan.local)
        row_scale, col_scale = a_local.view(-1), rb.view(-1)
        engine = plan.engine
        lse = engine.row_lse(A_local_e, B_e, row_scale, col_scale)
        B_p_e = reverse_row_scale = reverse_col_scale = reverse_lse = None
        if plan.symmetric:
            B_p_e = _for_engine(B_p, plan.engine_dtype)
            reverse_row_scale, reverse_col_scale = (rb_p * inv_tau).view(-1), ra.view(-1)
            reverse_lse = engine.row_lse(B_p_e, A_e, reverse_row_scale, reverse_col_scale)
            losses = torch.lerp(lse, reverse_lse, 0.5).sub_(positive)
        else:
            losses = lse - positive
        if not plan.normalize:
            # without normalisation an Inf candidate can give s = -Inf for every query, which the LSE
            # rightly ignores; the loss must not look finite (normalised rows carry NaN in their scales)
            losses.add_(B.sum(dtype=acc).mul_(0))

        ctx.plan = plan
        ctx.inv_tau = inv_tau if isinstance(inv_tau, float) else None
        ctx.save_for_backward(
            A,
            B,
            tau,
            None if isinstance(inv_tau, float) else inv_tau,
            a_norms,
            b_norms,
            a,
            rb,
            rb_p,
            B_p,
            A_e,
            B_e,
            B_p_e,
            row_scale,
            col_scale,
            reverse_row_scale,
            reverse_col_scale,
            lse,
            reverse_lse,
        )
        if not plan.as_sum:
            return losses
        total = losses.mean() if plan.use_mean else losses.sum()
        return total if plan.use_mean or plan.out_scale == 1 else total.mul_(plan.out_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        plan = ctx.plan
        (
            A,
            B,
            tau,
            inv_tau_t,
            a_norms,
            b_norms,
            a,
            rb,
            rb_p,
            B_p,
            A_e,
            B_e,
            B_p_e,
            row_scale,
            col_scale,
            reverse_row_scale,
            reverse_col_scale,
            lse,
            reverse_lse,
        ) = ctx.saved_tensors
        inv_tau = ctx.inv_tau if inv_tau_t is None else inv_tau_t
        h = 0.5 if plan.symmetric else 1.0
        a_local, A_local, p = _local(a, plan.local), _local(A, plan.local), plan.positives
        # weights: a scalar loss folds its upstream weight into the final per-row scales (the engine
        # runs with unit weights); per-row losses hand the engine their weights
        if plan.as_sum:
            factor = plan.out_scale * h
            weight, row_weight = (grad_out if factor == 1 else grad_out * factor), None
            row_coef, col_coef = rb_p, a_local
        else:
            weight, row_weight = None, (grad_out if h == 1 else grad_out * h)
            column = row_weight.unsqueeze(1)
            row_coef, col_coef = rb_p * column, a_local * column

        engine_weight = torch.ones_like(lse) if row_weight is None else row_weight
        grads = list(
            plan.engine.softmax_grad(_local(A_e, plan.local), B_e, row_scale, col_scale, lse, engine_weight)
        )
        if plan.symmetric:
            grads += plan.engine.softmax_grad(
                B_p_e, A_e, reverse_row_scale, reverse_col_scale, reverse_lse, engine_weight
            )
        g_a, g_b = grads[0], grads[1]  # queries' rows, all candidates

        _add_positive_rows_(g_a, B, p, B_p, row_coef, -1 / h)
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
            dots = _row_dots(g_a, A) if plan.normalize or need_tau else None
            if need_tau:
                d_tau = (a * dots).sum() * (-inv_tau)
                d_tau = d_tau if weight is None else d_tau.mul_(weight)
            if need_a:
                d_a = _finish_input_grad(g_a, A, dots if plan.normalize else None, a_norms, a, weight)
        if need_b:
            dots = _row_dots(g_b, B) if plan.normalize else None
            d_b = _finish_input_grad(g_b, B, dots, b_norms, rb if plan.normalize else None, weight)
        return d_a, d_b, d_tau, None


def _filled(n: int, value: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, 1] filled with a number or a 0-dim tensor's value (no host read)."""
    if isinstance(value, float):
        return torch.full((n, 1), value, dtype=dtype, device=device)
    return value.to(dtype).repeat(n, 1)


def recompute_loss(
    query: Tensor,
    candidates: Tensor,
    tau: float | Tensor,
    *,
    engine: ModuleType,
    normalize: bool,
    targets: Tensor | None,
    targets_checked: bool,
    tau_checked: bool,
    symmetric: bool,
    reduction: str,
    group: dist.ProcessGroup | None,
    layout: tuple[int, int, int, int, int],
) -> Tensor:
    """The loss through `_InfoNCE`. `layout`: (world, rank offset of the queries, of the candidates,
    global query count, candidate rows per rank ...) as `contrastive.py` worked it out."""
    world, q_offset, c_offset, global_n_q, counts = layout
    acc = accumulation_dtype(query.dtype)
    tau_input = tau.to(device=query.device, dtype=acc) if isinstance(tau, Tensor) else None
    n_q, n_c = query.shape[0], candidates.shape[0]
    bad_targets = None
    if not targets_checked:  # clamped into range, those rows' scales poisoned with NaN in the forward
        clamped = targets.clamp(0, n_c - 1)
        targets, bad_targets = clamped, clamped.ne(targets).unsqueeze(1)
    if group is None:
        a_rows, b_rows, local = query, candidates, None
    else:  # gathered in fp32: the reduce-scatter of their gradients sums in fp32, rounded once
        counts_q, counts_c = counts
        b_rows = gather_rows(candidates.to(acc), counts_c, group)
        if symmetric:
            a_rows, local = gather_rows(query.to(acc), counts_q, group), slice(q_offset, q_offset + n_q)
        else:
            a_rows, local = query, None
    if targets is None:  # default layout: positives at c_offset, c_offset + (1 + K), ...
        stride = n_c // n_q
        positives = slice(c_offset, c_offset + n_q * stride, stride)
    else:
        positives = targets + c_offset if c_offset else targets
    plan = _Plan(
        engine=engine,
        engine_dtype=None if engine is torch_engine else query.dtype,
        normalize=normalize,
        symmetric=symmetric,
        positives=positives,
        bad_positives=bad_targets,
        local=local,
        inv_tau=None if tau_input is not None else inverse(tau, acc),
        tau_checked=tau_checked,
        as_sum=reduction != "none",
        use_mean=reduction == "mean" and world == 1,
        out_scale={"mean": world / global_n_q, "sum": float(world), "none": 1.0}[reduction],
    )
    return _InfoNCE.apply(a_rows, b_rows, tau_input, plan)
