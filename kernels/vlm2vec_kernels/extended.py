"""The contrastive loss with the v3 options: Matryoshka prefixes, candidate ids, a false-negative margin.

For each direction (query -> candidates; with `symmetric` also positive -> queries) and each chunk of
rows R, the logits of every prefix come from one pass over D: the raw dot products of prefix d_k are
a running sum of one GEMM per segment [d_{k-1}, d_k),

    S^k_R = S^{k-1}_R + q_R[:, seg_k] c[:, seg_k]^T,      l^k = a^k_i b^k_j S^k  (a = rq^k / tau, b = rc^k)

with the prefix inverse norms rq^k, rc^k from running sums of squares. `row_losses.row_loss_grad` turns
each l^k into the row losses and E^k = dL/dl^k (weight w_k and the row's weight folded in); then, from
the last prefix to the first, H^k = sum_{m >= k} E^m a^m b^m (one buffer, added in place) gives the
gradient block of segment k in one GEMM each way:

    dq_R[:, seg_k] = H^k c[:, seg_k],    dc[:, seg_k] += (H^k)^T q_R[:, seg_k]

so the whole fwd+bwd costs 6 B^2 d_K FLOPs (2 for the logits, 4 for the gradients) whatever the number
of prefixes. The normalisation of every prefix adds -<E^k, l^k>_row (r^k)^2 x[:, :d_k] per row and
dL/dtau = -1/tau sum <E, l>: row and column sums of the chunk, no GEMM. Memory: one chunk of logits per
prefix (never B x B). Gradients are computed in the forward for scalar losses (the backward scales
them); with reduction="none" the backward runs the same pass with the upstream weights. On the Triton
backend Matryoshka alone (no ids, margin or symmetric) goes to `triton_prefix.py` instead.

The training case (one direction, a scalar reduction, no ids or margin: `_plain_uniform_pass`) orders
the same work for the CPU's memory: the K segment GEMMs of a chunk write P^k into K buffers allocated
once (fresh large tensors cost a page fault per 4 KiB), then each block of a few rows takes every
prefix at once in cache (prefix sums S^k, softmax, the E l sums, H^k written over P^k), and two GEMMs
per segment read the H^k. The dozen elementwise passes per prefix then touch memory about twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import torch_engine
from .distributed import all_gather_rows, reduce_scatter_rows
from .engine import NORM_EPS, LossCall, Targets, accumulation_dtype
from .row_losses import plain_loss_grad, row_loss_grad
from .rows import clamp_targets, guard_infinite_candidates_, inverse_norm, inverse_temperature, nan_where


@dataclass(frozen=True)
class _Direction:
    """One direction of the loss: rows x scored against columns y, row i's target column, and the ids
    that say which columns are the same item as the target (None: the target alone)."""

    x: Tensor
    y: Tensor
    target: Tensor
    bad: Tensor | None  # rows whose target was out of range: NaN losses
    row_ids: Tensor | None
    col_ids: Tensor | None


def _prefix_inverse_norms(x: Tensor, bounds: list[int], acc: torch.dtype) -> Tensor:
    """[K, rows] inverse norms of every prefix x[:, :d_k]: the running sum of squares along D, read at
    each d_k (a handful of ops for all prefixes)."""
    if len(bounds) == 2:
        return inverse_norm(x[:, : bounds[1]]).unsqueeze(0)
    squares = x[:, : bounds[-1]].to(acc).square()
    sums = torch.stack([squares[:, lo:hi].sum(1) for lo, hi in zip(bounds, bounds[1:])]).cumsum_(0)
    return sums.sqrt_().clamp_min_(NORM_EPS).reciprocal_()


def _add_or_set(out: Tensor, value: Tensor, weight: float, first: bool) -> None:
    """out (+)= weight * value: the first term writes, the later ones add."""
    if first:
        torch.mul(value, weight, out=out)
    else:
        out.add_(value, alpha=weight)


def _projection_coef(es: Tensor, r: Tensor) -> Tensor:
    """<E, l> r^2, 0 where the norm was clamped at eps (the normalisation is constant there)."""
    return r.square().masked_fill_(r > 0.5 / NORM_EPS, 0.0).mul_(es)


# Rows per block of the elementwise work of the fused Matryoshka chunk (`_prefix_block_`): the block's
# logits of every prefix (K * rows * N fp32) stay in the CPU's cache through its dozen passes
BLOCK_ELEMENTS = 2**18


def _prefix_block_(
    logits: Tensor,
    target: Tensor,
    a: Tensor,
    b: Tensor | None,
    dim_weights: tuple[float, ...],
    losses: Tensor,
    es_rows: Tensor,
    es_cols: Tensor,
    scratch: Tensor,
    first: bool,
) -> None:
    """Every prefix of one row block, plain InfoNCE, one weight for every row. logits [K, R, N] holds
    the segment products P^k = x_seg_k y_seg_k^T and leaves holding H^k = sum_{m >= k} E^m a^m b^m
    (unweighted by the row weight): S^k = S^{k-1} + P^k, l^k = a^k_i b^k_j S^k, E^k = w_k (softmax(l^k) - Y).
    Writes losses [R] = sum_k w_k L^k and es_rows [K, R] = <E^k, l^k>_row; adds (or, first, writes) the
    column sums into es_cols [K, N]. scratch [2, R, N]: E^k and a b^T of the block (allocated once: a
    fresh tensor of this size is a page fault per 4 KiB)."""
    n_dims = logits.shape[0]
    for k in range(1, n_dims):
        logits[k].add_(logits[k - 1])
    for k in reversed(range(n_dims)):
        l = logits[k]
        scale = a[k, :, None] if b is None else torch.mul(a[k, :, None], b[k], out=scratch[1])  # a_i b_j
        l.mul_(scale)
        loss_k, e = plain_loss_grad(l, target, True, scratch[0])
        _add_or_set(losses, loss_k, dim_weights[k], k == n_dims - 1)
        if dim_weights[k] != 1.0:
            e.mul_(dim_weights[k])
        l.mul_(e)  # E l: its row and column sums carry dL/dtau and the prefix normalisations
        torch.sum(l, 1, out=es_rows[k])
        if first:
            torch.sum(l, 0, out=es_cols[k])
        else:
            es_cols[k].add_(l.sum(0))
        if k == n_dims - 1:
            torch.mul(e, scale, out=l)
        else:
            torch.addcmul(logits[k + 1], e, scale, out=l)  # H^k = E^k a b + H^{k+1}


def _direction_pass(
    d: _Direction,
    call: LossCall,
    inv_tau: float | Tensor,
    row_weight: Tensor | None,
    reverse: _Direction | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(row losses sum_k w_k L^k [M], reverse row losses or None, dx, dy, dL/dtau) of one direction;
    gradients (in the accumulation dtype, weighted by row_weight [M]) only when row_weight is given.

    `reverse` (symmetric, one process): the reverse direction's logits are columns t of this one's
    (positive t_i against query k is l_k,t_i), so one chunk holds every row, the reverse rows are read
    from it and their gradient is added into those columns before the two gradient GEMMs."""
    acc = accumulation_dtype(d.x.dtype)
    x, y = d.x.to(acc), d.y.to(acc)
    (n_rows, dim), n_cols = x.shape, y.shape[0]
    bounds = [0, *call.dims]
    n_dims = len(call.dims)
    if call.normalize:
        rx, ry = _prefix_inverse_norms(x, bounds, acc), _prefix_inverse_norms(y, bounds, acc)
        a = rx * inv_tau
    else:
        rx = ry = None
        a = torch.ones(n_dims, n_rows, dtype=acc, device=x.device) * inv_tau
    margin = None if call.margin is None else call.margin * inv_tau
    want = row_weight is not None
    step = n_rows if reverse is not None else torch_engine._chunk_rows(n_rows, n_cols)
    # one direction with one weight for every row (scalar reductions)
    uniform = want and reverse is None and row_weight.stride(0) == 0
    if uniform and d.row_ids is None and margin is None and d.bad is None:
        return _plain_uniform_pass(x, y, d.target, call, inv_tau, row_weight[0], rx, ry, a, step)
    # every buffer is written before it is added to (no zero fills: each is an op on the CPU)
    losses = torch.empty(n_rows, dtype=acc, device=x.device)
    dx = torch.empty(n_rows, dim, dtype=acc, device=x.device) if want else None
    dy = torch.empty(n_cols, dim, dtype=acc, device=x.device) if want else None
    coef_x = torch.empty(n_dims, n_rows, dtype=acc, device=x.device) if want else None
    coef_y = torch.empty(n_dims, n_cols, dtype=acc, device=x.device) if want else None
    dtau = None
    reverse_losses = None
    if reverse is not None:
        reverse_losses = torch.empty(n_rows, dtype=acc, device=x.device)
        reverse_same = None
        if reverse.row_ids is not None:
            reverse_same = reverse.row_ids[:, None] == reverse.col_ids[None, :]
    # uniform (ids or a margin here): E is weighted once, by w_k rw a_i together, and the row / column
    # sums of E l scaled after the sum (one pass less per prefix); its R x N temporaries (two softmax
    # buffers: E^k and H^{k+1} live at once; E l) are reused by every chunk and prefix
    scratch = torch.empty(3, step * n_cols, dtype=acc, device=x.device) if uniform else None
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        x_rows = x[rows]
        chunk = None if scratch is None else scratch[:, : (rows.stop - start) * n_cols].view(3, -1, n_cols)
        same = None
        if d.row_ids is not None:
            same = d.row_ids[rows, None] == d.col_ids[None, :]
        logits = []  # S^k, then l^k, then E^k a b, then H^k
        for k in range(n_dims):
            seg = slice(bounds[k], bounds[k + 1])
            if k == 0:
                logits.append(torch.mm(x_rows[:, seg], y[:, seg].T))
            else:  # torch.addmm rather than addmm_: FlopCounterMode counts it
                logits.append(torch.addmm(logits[-1], x_rows[:, seg], y[:, seg].T))
        held = None
        for k in reversed(range(n_dims)):
            l = logits[k]
            l.mul_(a[k, rows, None])
            if ry is not None:
                l.mul_(ry[k])
            first = k == n_dims - 1
            out = None if chunk is None else chunk[k % 2]
            loss_k, grad = row_loss_grad(l, d.target[rows], same, call.positives, margin, want, out)
            if d.bad is not None:  # an out-of-range target: its row's loss and gradient are NaN (the
                # logits stay finite: in one pass they are also the reverse direction's columns)
                nan_where(loss_k, d.bad[rows])
                if grad is not None:
                    nan_where(grad, d.bad[rows, None].expand_as(grad))
            _add_or_set(losses[rows], loss_k, call.dim_weights[k], first)
            if reverse is not None:
                r = l[:, d.target].T  # [positives, queries]
                if reverse.bad is not None:
                    nan_where(r, reverse.bad[:, None].expand_as(r))
                r_loss, r_grad = row_loss_grad(r, reverse.target, reverse_same, call.positives, margin, want)
                _add_or_set(reverse_losses, r_loss, call.dim_weights[k], first)
            if not want:
                continue
            if uniform:
                weight = row_weight[0] * call.dim_weights[k]
                el = torch.mul(grad, l, out=chunk[2])
                es_rows = el.sum(1).mul_(weight)
                grad.mul_((a[k, rows] * weight)[:, None])
            else:
                grad.mul_((call.dim_weights[k] * row_weight[rows])[:, None])
                if reverse is not None:
                    grad.index_add_(1, d.target, r_grad.mul_((call.dim_weights[k] * row_weight)[:, None]).T)
                el = grad * l
                es_rows = el.sum(1)
                grad.mul_(a[k, rows, None])
            term = es_rows.sum() * (-inv_tau)
            dtau = term if dtau is None else dtau.add_(term)
            if rx is not None:
                coef_x[k, rows] = _projection_coef(es_rows, rx[k, rows])
                es_cols = el.sum(0).mul_(weight) if uniform else el.sum(0)
                _add_or_set(coef_y[k], _projection_coef(es_cols, ry[k]), 1.0, start == 0)
            if ry is not None:
                grad.mul_(ry[k])
            held = grad if held is None else grad.add_(held)  # H^k = sum_{m >= k} E^m a^m b^m
            seg = slice(bounds[k], bounds[k + 1])
            torch.mm(held, y[:, seg], out=dx[rows, seg])
            torch.addmm(dy[:, seg], held.T, x_rows[:, seg], beta=0 if start == 0 else 1, out=dy[:, seg])
    if not want:
        return losses, reverse_losses, None, None, None
    _prefix_grads_tail_(dx, dy, x, y, bounds, None if rx is None else (coef_x, coef_y))
    return losses, reverse_losses, dx, dy, dtau


def _prefix_grads_tail_(
    dx: Tensor, dy: Tensor, x: Tensor, y: Tensor, bounds: list[int], coefs: tuple[Tensor, Tensor] | None
) -> None:
    """In place: the columns beyond the largest prefix take no part; with coefs = (coef_x, coef_y)
    [K, rows] (the normalisation terms <E^k, l^k> (r^k)^2 per prefix; None without `normalize`)
    segment k takes the terms of every prefix m >= k: dx[:, seg_k] -= (sum_{m >= k} coef_x[m]) x[:, seg_k]."""
    if bounds[-1] < dx.shape[1]:
        dx[:, bounds[-1] :] = 0
        dy[:, bounds[-1] :] = 0
    if coefs is None:
        return
    coef_x, coef_y = coefs
    for k in reversed(range(len(bounds) - 1)):
        seg = slice(bounds[k], bounds[k + 1])
        if k + 2 < len(bounds):
            coef_x[k] += coef_x[k + 1]
            coef_y[k] += coef_y[k + 1]
        dx[:, seg].addcmul_(x[:, seg], coef_x[k, :, None], value=-1)
        dy[:, seg].addcmul_(y[:, seg], coef_y[k, :, None], value=-1)


def _plain_uniform_pass(
    x: Tensor,
    y: Tensor,
    target: Tensor,
    call: LossCall,
    inv_tau: float | Tensor,
    weight: Tensor,
    rx: Tensor | None,
    ry: Tensor | None,
    a: Tensor,
    step: int,
) -> tuple[Tensor, None, Tensor, Tensor, Tensor]:
    """_direction_pass for plain InfoNCE with one weight for every row (the scalar reductions without
    ids, margin or symmetric): per chunk the K segment GEMMs write P^k into K buffers, the elementwise
    work runs block by block in cache (`_prefix_block_`: prefix sums, softmax, E l sums, H^k), then two
    GEMMs per segment read H^k. Memory: K chunks of logits and one block."""
    (n_rows, dim), n_cols = x.shape, y.shape[0]
    bounds = [0, *call.dims]
    n_dims = len(call.dims)
    acc = x.dtype
    losses = torch.empty(n_rows, dtype=acc, device=x.device)
    dx = torch.empty(n_rows, dim, dtype=acc, device=x.device)
    dy = torch.empty(n_cols, dim, dtype=acc, device=x.device)
    es_rows = torch.empty(n_dims, n_rows, dtype=acc, device=x.device)
    es_cols = torch.empty(n_dims, n_cols, dtype=acc, device=x.device)
    bufs = torch.empty(n_dims, step, n_cols, dtype=acc, device=x.device)
    # blocks are for a CPU's cache; a GPU takes the chunk whole (each block would be a dozen launches)
    block = max(1, min(step, BLOCK_ELEMENTS // max(n_cols, 1))) if x.device.type == "cpu" else step
    scratch = torch.empty(2, block, n_cols, dtype=acc, device=x.device)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        count = rows.stop - start
        x_rows, logits = x[rows], bufs[:, :count]
        for k in range(n_dims):  # P^k; the running sums S^k are taken block by block
            seg = slice(bounds[k], bounds[k + 1])
            torch.mm(x_rows[:, seg], y[:, seg].T, out=logits[k])
        for b_start in range(0, count, block):
            r = slice(b_start, min(b_start + block, count))
            g = slice(start + r.start, start + r.stop)
            _prefix_block_(
                logits[:, r], target[g], a[:, g], ry, call.dim_weights, losses[g], es_rows[:, g],
                es_cols, scratch[:, : r.stop - r.start], start == 0 and b_start == 0,
            )  # fmt: skip
        for k in range(n_dims):  # dx_seg = w H^k y_seg, dy_seg += w (H^k)^T x_seg (w: after the loop)
            seg = slice(bounds[k], bounds[k + 1])
            torch.mm(logits[k], y[:, seg], out=dx[rows, seg])
            torch.addmm(dy[:, seg], logits[k].T, x_rows[:, seg], beta=0 if start == 0 else 1, out=dy[:, seg])
    dx.mul_(weight)
    dy.mul_(weight)
    es_rows.mul_(weight)
    es_cols.mul_(weight)
    dtau = es_rows.sum() * (-inv_tau)
    coefs = None if rx is None else (_projection_coef(es_rows, rx), _projection_coef(es_cols, ry))
    _prefix_grads_tail_(dx, dy, x, y, bounds, coefs)
    return losses, None, dx, dy, dtau


# symmetric on one process: every row in one chunk (its logits held per prefix) while the logits of
# all prefixes stay within this many elements (2**28 fp32 = 1 GiB: B = 16,384 with one prefix);
# larger batches (and `group`) run the reverse direction as a second pass (12 B^2 D instead of 6)
SYMMETRIC_ONE_PASS_ELEMENTS = 2**28


def _fits_one_pass(n_rows: int, n_cols: int, call: LossCall) -> bool:
    return n_rows * n_cols * len(call.dims) <= SYMMETRIC_ONE_PASS_ELEMENTS


def fits_one_pass(call: LossCall, query: Tensor, candidates: Tensor) -> bool:
    """Whether a symmetric call runs both directions in one pass here (one process, all logits held):
    then this path does 6 B^2 D FLOPs against the recompute path's 16."""
    return call.layout.group is None and _fits_one_pass(query.shape[0], candidates.shape[0], call)


@dataclass(frozen=True)
class _Plan:
    call: LossCall
    temperature: float | None  # None: the temperature is the tensor input
    needs: tuple[bool, bool, bool]  # gradients wanted for (query, candidates, temperature)


def _directions(
    q: Tensor, c: Tensor, call: LossCall, one_pass: bool
) -> tuple[list[_Direction], Tensor, Tensor | None]:
    """The directions of the loss, the gathered candidates' row of each local query's positive, and the
    local queries' rows among the gathered queries (symmetric under a group) or None. `one_pass`: the
    reverse direction reads its logits from the forward ones (its rows are not gathered)."""
    layout = call.layout
    n_q, n_c = q.shape[0], c.shape[0]
    stride = n_c // n_q if call.targets is None else 0
    targets = Targets(call.targets, layout.c_offset, stride, checked=call.targets_checked)
    c_all = c if layout.group is None else all_gather_rows(c, layout.counts_c, layout.group)
    ids_all = call.candidate_ids
    if ids_all is not None and layout.group is not None:
        ids_all = all_gather_rows(ids_all, layout.counts_c, layout.group)
    target, bad = targets.columns(n_q, q.device), None
    if not call.targets_checked:
        target, bad = clamp_targets(target, c_all.shape[0])
    row_ids = None if ids_all is None else ids_all[target]
    forward = _Direction(q, c_all, target, bad, row_ids, ids_all)
    if not call.symmetric:
        return [forward], target, None
    # reverse: each local positive against every query; its target is its own query
    q_all, query_ids, local = q, row_ids, None
    if layout.group is not None:
        q_all = all_gather_rows(q, layout.counts_q, layout.group)
        if row_ids is not None:
            query_ids = all_gather_rows(row_ids, layout.counts_q, layout.group)
        local = slice(layout.q_offset, layout.q_offset + n_q)
    own = torch.arange(layout.q_offset, layout.q_offset + n_q, device=q.device)
    positive_rows = c_all if one_pass else c_all.index_select(0, target)  # one pass: not read
    reverse = _Direction(positive_rows, q_all, own, bad, row_ids, query_ids)
    return [forward, reverse], target, local


def _triton_prefix():
    """triton_prefix.py, imported on first use (only the Triton backend needs triton)."""
    from . import triton_prefix

    return triton_prefix


def _run(q: Tensor, c: Tensor, tau: Tensor | None, plan: _Plan, weight: float | Tensor | None):
    """(row losses [Bq], [dq, dc, dtau] or None): the gradients of sum_i weight_i * loss_i."""
    call = plan.call
    if call.engine.__name__.endswith(".triton_engine") and _triton_prefix().applies(call, q, c):
        # Matryoshka alone on the Triton backend: kernels of its own (triton_prefix.py)
        losses, grads = _triton_prefix().run(q, c, plan.temperature if tau is None else tau, call, weight)
        return losses, None if grads is None else [g if need else None for g, need in zip(grads, plan.needs)]
    acc = accumulation_dtype(q.dtype)
    inv_tau = inverse_temperature(plan.temperature if tau is None else tau, acc, call.tau_checked)
    one_pass = call.symmetric and fits_one_pass(call, q, c)
    directions, target, local = _directions(q, c, call, one_pass)
    h = 0.5 if call.symmetric else 1.0
    row_weight = None
    if weight is not None:
        row_weight = torch.as_tensor(weight, dtype=acc, device=q.device).mul(h).expand(q.shape[0])
    if one_pass:
        losses, rev_losses, dq, dc_all, dtau = _direction_pass(
            directions[0], call, inv_tau, row_weight, reverse=directions[1]
        )
        losses = torch.lerp(losses, rev_losses, 0.5)
    else:
        losses, _, dq, dc_all, dtau = _direction_pass(directions[0], call, inv_tau, row_weight)
    if call.symmetric and not one_pass:  # the reverse direction as a pass of its own
        rev_losses, _, d_pos, dq_all, rev_dtau = _direction_pass(directions[1], call, inv_tau, row_weight)
        losses = torch.lerp(losses, rev_losses, 0.5)
        if weight is not None:
            dc_all.index_add_(0, target, d_pos)
            dtau += rev_dtau
            if local is None:
                dq += dq_all
            else:
                layout = call.layout
                dq += reduce_scatter_rows(dq_all, layout.counts_q, layout.rank, layout.group)
    # a non-finite candidate makes every row NaN, even where ids or the margin mask it out
    guard_infinite_candidates_(losses, directions[0].y)
    if weight is None:
        return losses, None
    dc = dc_all
    if call.layout.group is not None:
        dc = reduce_scatter_rows(dc_all, call.layout.counts_c, call.layout.rank, call.layout.group)
    need_q, need_c, need_tau = plan.needs
    return losses, [dq if need_q else None, dc if need_c else None, dtau if need_tau else None]


class ExtendedInfoNCE(torch.autograd.Function):
    """The v3 loss: scalar reductions compute their gradients in the forward; reduction="none" runs the
    pass again in the backward with the upstream weights."""

    @staticmethod
    def forward(ctx, query: Tensor, candidates: Tensor, tau: Tensor | None, plan: _Plan) -> Tensor:
        call = plan.call
        as_sum = call.reduction != "none"
        scale = call.layout.scale(call.reduction)
        wanted = any(plan.needs)
        losses, grads = _run(query, candidates, tau, plan, scale if as_sum and wanted else None)
        ctx.plan, ctx.grads = plan, grads
        ctx.save_for_backward(query, candidates, tau)
        return losses.sum() * scale if as_sum else losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, candidates, tau = ctx.saved_tensors
        plan = ctx.plan
        grads, ctx.grads = ctx.grads, None
        if plan.call.reduction == "none":
            grads = _run(query, candidates, tau, plan, grad_out)[1]
            grad_out = torch.ones((), dtype=grad_out.dtype, device=grad_out.device)
        elif grads is None:  # a repeated backward (retain_graph): recompute
            grads = _run(query, candidates, tau, plan, plan.call.layout.scale(plan.call.reduction))[1]
        dtypes = [query.dtype, candidates.dtype, None if tau is None else tau.dtype]
        return *plan.call.engine.scale_grads(grads, grad_out, dtypes), None


def extended_loss(query: Tensor, candidates: Tensor, tau: float | Tensor, call: LossCall) -> Tensor:
    """The loss of one checked call with any v3 option (torch ops on the inputs' device)."""
    tau_input = tau.to(query.device, accumulation_dtype(query.dtype)) if isinstance(tau, Tensor) else None
    grad = torch.is_grad_enabled()
    needs = tuple(grad and x is not None and x.requires_grad for x in (query, candidates, tau_input))
    plan = _Plan(call, None if tau_input is not None else tau, needs)
    return ExtendedInfoNCE.apply(query, candidates, tau_input, plan)
