"""InfoNCE contrastive loss without a Bq x Bc matrix: argument checks, backend dispatch, orchestration.

The engines (chunked torch in `torch_ref.py`, Triton in `triton_contrastive.py`) compute the one piece
that needs all candidates at once, the row log-sum-exp, and the split softmax gradient. Around them one
autograd Function, `_InfoNCE`, adds the L2 normalisation, the temperature, the positive logit and (for
`symmetric`) the reverse direction, with their gradients in closed form written in place into the
engine's fp32 buffers. Plain autograd only does the cross-rank gather.

Launch overhead is what a small batch pays (B=1024 on an H100: the kernels take ~0.15 ms), so the
orchestration is a fixed, small number of ops: the caller's tensors go to the engine as they are (no
fp32 copies; mixed-dtype elementwise ops compute in fp32), O(B*D) work runs as one block on a GPU
(row blocks bound the temporaries only on the CPU or for huge inputs), and the common case needs ~20
ops forward and ~20 backward besides the engine (tests/test_loss_overhead.py counts them).

No host syncs on a GPU: value checks that would read a device tensor back (a tensor temperature's
sign, targets' range) run only for CPU tensors, where they raise a clear ValueError. On a GPU the bad
values are folded into the result instead (`_reads_values_on_host`): an invalid temperature
(<= 0, Inf, NaN) or an out-of-range target makes the loss and the gradients NaN, as non-finite
embeddings already do, and the CUDA context stays usable (unlike a device-side assert).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import torch_ref
from .distributed import gather_rows, gather_sizes, world_and_rank

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
# Bound on the [rows, D] fp32 temporaries of the positive pair and the normalisation gradient. On a
# GPU one block covers every batch below 2**28 elements (1 GiB in fp32; the caching allocator reuses
# it), so the op count does not grow with B. On the CPU blocks stay at 256 KiB: the host allocator
# then reuses freed chunks (8 MiB temporaries raised the resident peak of tests/test_loss_memory.py by
# up to 8 MiB from run to run). Row dot products of rows already in the accumulation dtype skip the
# blocks: one batched matrix product with no temporary (`_batched_dots`). Hundreds of small blocked
# ops cost seconds at B = 8192 on a loaded 2-core box (each parallel op waits for both threads).
ROW_BLOCK_ELEMENTS = 2**16
DEVICE_ROW_BLOCK_ELEMENTS = 2**28


# ----------------------------------------------------------------------------------------------------
# argument checks


def _check_embeddings(query: Tensor, candidates: Tensor) -> None:
    for name, x in (("query", query), ("candidates", candidates)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): need at least one row and D >= 1")
    shapes = f"query {tuple(query.shape)}, candidates {tuple(candidates.shape)}"
    if query.shape[1] != candidates.shape[1]:
        raise ValueError(f"query and candidates must have the same embedding size D, got {shapes}")
    if query.dtype != candidates.dtype:
        raise TypeError(
            f"query and candidates must have the same dtype, got {query.dtype} and {candidates.dtype}"
        )
    if query.device != candidates.device:
        raise ValueError(
            f"query and candidates must be on the same device, got {query.device} and {candidates.device}"
        )


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _reads_values_on_host(t: Tensor) -> bool:
    """Whether value checks may read `t` back: only where that is free (CPU tensors). On a GPU the read
    would wait for every queued kernel, so bad values are folded into a NaN result instead."""
    return t.device.type == "cpu"


def _check_temperature_value(value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be positive and finite, got {value}")


def _checked_temperature(temperature: float | Tensor, device: torch.device) -> float | Tensor:
    """A positive finite float, or a 0-dim float tensor that needs a gradient (keeps its graph).

    A CPU tensor is read and checked here (no device sync), and becomes a float when no gradient is
    wanted. A device tensor is not read: `_inverse_temperature` folds a bad value into NaN.
    """
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point() or temperature.numel() != 1:
            raise TypeError(
                "temperature tensor must be a one-element floating-point tensor, got "
                f"shape {tuple(temperature.shape)} dtype {temperature.dtype}"
            )
        if temperature.device != device and temperature.device.type != "cpu":
            raise ValueError(f"temperature is on {temperature.device} but query is on {device}")
        if _reads_values_on_host(temperature):
            value = temperature.item()
            _check_temperature_value(value)
            if not (temperature.requires_grad and torch.is_grad_enabled()):
                return value
        return temperature.reshape(()) if temperature.dim() else temperature
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        _check_temperature_value(float(temperature))
        return float(temperature)
    raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")


def _checked_targets(
    targets: Tensor | None, query: Tensor, candidates: Tensor, *, host_check: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """(int64 targets, rows whose target is out of range) or (None, None) for the default layout.

    Out-of-range values raise a ValueError where the targets can be read for free (CPU, or
    `host_check`); on a GPU they are clamped into range and reported as a [Bq, 1] bool mask that makes
    those rows' losses NaN (no host sync)."""
    n_q, n_c = query.shape[0], candidates.shape[0]
    if targets is None:
        if n_c % n_q:
            raise ValueError(
                f"candidates rows ({n_c}) must be a multiple of query rows ({n_q}) for the default layout "
                f"[pos_0, neg_0_1..neg_0_K, pos_1, ...]; pass targets otherwise (query {tuple(query.shape)}, "
                f"candidates {tuple(candidates.shape)})"
            )
        return None, None
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be an integer torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != (n_q,):
        raise ValueError(f"targets must have shape ({n_q},) (one per query row), got {tuple(targets.shape)}")
    if targets.device != query.device:
        raise ValueError(f"targets is on {targets.device} but query is on {query.device}")
    targets = targets.long()
    if host_check or _reads_values_on_host(targets):
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= n_c:
            raise ValueError(f"targets must index candidates rows [0, {n_c}), got values in [{low}, {high}]")
        return targets, None
    clamped = targets.clamp(0, n_c - 1)
    return clamped, clamped.ne(targets).unsqueeze(1)


def _default_targets(n_q: int, n_c: int, device: torch.device) -> Tensor:
    return torch.arange(n_q, device=device) * (n_c // n_q)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# engines


def _select_engine(backend: str, query: Tensor) -> ModuleType:
    """The module providing row_lse / softmax_grad for this backend and these tensors."""
    on_cuda = query.device.type == "cuda"
    if backend == "torch" or (backend == "auto" and (not on_cuda or query.dtype == torch.float64)):
        return torch_ref
    if query.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32, float16 and bfloat16 inputs, got torch.float64")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {query.device}) or TRITON_INTERPRET=1 set before "
            "triton is first imported; use backend='torch' on the CPU"
        )
    try:
        from . import triton_contrastive
    except Exception as error:  # a broken triton install must not break the torch path
        if backend == "auto":
            warnings.warn(f"Triton engine unavailable ({error}); using the torch engine", stacklevel=3)
            return torch_ref
        raise ImportError(f"backend='triton' could not import the Triton engine: {error}") from error
    return triton_contrastive


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
    fused: bool  # the engine produces the gradient pieces in the forward (row_lse_and_grad)


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
        acc = _accumulation_dtype(A.dtype)  # the query dtype, or fp32 / fp64 copies (distributed)
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
        engine, grads = plan.engine, None
        if plan.fused:
            lse, *grads = engine.row_lse_and_grad(A_local_e, B_e, row_scale, col_scale, None)
        else:
            lse = engine.row_lse(A_local_e, B_e, row_scale, col_scale)
        B_p_e = reverse_row_scale = reverse_col_scale = reverse_lse = None
        if plan.symmetric:
            B_p_e = _for_engine(B_p, plan.engine_dtype)
            reverse_row_scale, reverse_col_scale = (rb_p * inv_tau).view(-1), ra.view(-1)
            if plan.fused:
                reverse_lse, *reverse_grads = engine.row_lse_and_grad(
                    B_p_e, A_e, reverse_row_scale, reverse_col_scale, None
                )
                grads += reverse_grads
            else:
                reverse_lse = engine.row_lse(B_p_e, A_e, reverse_row_scale, reverse_col_scale)
            losses = torch.lerp(lse, reverse_lse, 0.5).sub_(positive)
        else:
            losses = lse - positive
        if not plan.normalize:
            # without normalisation an Inf candidate can give s = -Inf for every query, which the LSE
            # rightly ignores; the loss must not look finite (normalised rows carry NaN in their scales)
            losses.add_(B.sum(dtype=acc).mul_(0))

        ctx.plan, ctx.grads = plan, grads
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

        grads, ctx.grads = ctx.grads, None  # a repeated backward (retain_graph) recomputes
        if grads is None:
            engine_weight = torch.ones_like(lse) if row_weight is None else row_weight
            grads = list(
                plan.engine.softmax_grad(
                    _local(A_e, plan.local), B_e, row_scale, col_scale, lse, engine_weight
                )
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


def _inverse(tau: float, dtype: torch.dtype) -> float:
    """1 / tau, Inf where it overflows `dtype` (as a tensor division would: a tiny temperature then
    gives a NaN loss rather than a conversion error in ops that check their scalar arguments)."""
    inverse = 1 / tau
    return inverse if inverse <= torch.finfo(dtype).max else math.inf


def _filled(n: int, value: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, 1] filled with a number or a 0-dim tensor's value (no host read)."""
    if isinstance(value, float):
        return torch.full((n, 1), value, dtype=dtype, device=device)
    return value.to(dtype).repeat(n, 1)


# ----------------------------------------------------------------------------------------------------
# the loss


def contrastive_loss(
    query: Tensor,
    candidates: Tensor,
    temperature: float | Tensor = 0.02,
    *,
    normalize: bool = True,
    targets: Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """InfoNCE loss of queries against candidates, never materialising the Bq x Bc logit matrix.

    loss_i = logsumexp_j(s_ij) - s_i,t(i),  s_ij = <q_i, c_j> / temperature  (q, c L2-normalised when
    `normalize`; the gradient flows through the normalisation).

    Args:
        query: [Bq, D] float16 / bfloat16 / float32 (float64 for gradcheck; not with Triton).
        candidates: [Bc, D], same dtype and device. Default layout (no `targets`): Bc = Bq * (1 + K),
            rows `[pos_0, neg_0_1..neg_0_K, pos_1, ...]`, so query i's positive is row i * (1 + K);
            K = 0 is plain in-batch negatives. Every candidate is a negative for every other query.
        temperature: positive float, or a one-element tensor (a learnable temperature gets its gradient).
            A CPU tensor is checked (ValueError); a GPU tensor is not read back (no host sync): a value
            <= 0, Inf or NaN makes the loss and its gradients NaN. Keep a learnable temperature on the
            query's device (a CPU one is copied over, which syncs).
        normalize: L2-normalise both sides first (eps 1e-12, as F.normalize).
        targets: int [Bq], index of each query's positive among this rank's `candidates` (overrides
            the default layout; Bc is then free, and several queries may share a positive). Values out
            of range raise a ValueError for CPU tensors; on a GPU (no host sync) they make those rows'
            losses NaN.
        symmetric: also score each positive against all queries (CLIP style; with hard negatives the
            reverse direction is positives -> queries) and average the two directions per pair.
        reduction: "mean" | "sum" | "none" ([Bq] per-query losses; exact for any upstream gradient).
        group: torch.distributed process group for cross-rank negatives. Each rank passes its local
            rows; candidates (and, if symmetric, queries) are gathered so every rank scores against the
            global set, targets stay local (hard negatives stay with their owner) and the candidate
            gradients are reduce-scattered back to their owner. The returned value is scaled so that
            averaging it over ranks gives the global loss: "mean" -> local_sum * world / global_Bq,
            "sum" -> local_sum * world, "none" -> the local rows. With mean/sum, DDP's usual gradient
            averaging then yields exactly the single-process gradient on the concatenated batch. With
            "none" and upstream g_r on rank r, each rank's gradients are those of sum_r <g_r, loss_r>
            (the global per-row loss), before any averaging. Ranks may hold different row counts.
            Every rank must call this with the same options (it runs collectives, forward and backward;
            exchanging the row counts reads them back to the host once per call).
        backend: "auto" (Triton for CUDA tensors, chunked torch otherwise), "triton" (CPU only under
            TRITON_INTERPRET=1), "torch" (chunked), "reference" (float64, full matrix; for tests).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [Bq] for reduction="none". Sums and the
        positive logit run in fp32; input gradients come back in the input dtype, rounded once.
        Non-finite embeddings give a non-finite loss. Extra memory beyond the returned gradients:
        the engine's fp32 gradient buffers (for fp32 inputs they are the returned gradients), one
        chunk of logits (torch engine: <= 2**22 fp32 = 16 MiB; its gradient pass computes most chunks
        in the not yet written rows of the query gradient and holds one spare chunk of at most ~10% of
        the gradients' size) and fp32 row temporaries (256 KiB blocks on the CPU, none for fp32 rows;
        one [rows, D] block below 1 GiB on a GPU) + O(B) vectors; `group` adds fp32 copies of the
        gathered rows, `symmetric` the positives' rows when `targets` pick them.

    Example::

        loss = contrastive_loss(q, c, 0.02)                  # c = [pos_0, neg_0_1, pos_1, neg_1_1, ...]
        loss = contrastive_loss(q, c, tau, targets=t, symmetric=True, group=dist.group.WORLD)
    """
    _check_embeddings(query, candidates)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
    _check_flag("normalize", normalize)
    _check_flag("symmetric", symmetric)
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    tau = _checked_temperature(temperature, query.device)
    targets, bad_targets = _checked_targets(targets, query, candidates, host_check=backend == "reference")
    acc = _accumulation_dtype(query.dtype)
    if backend == "reference":
        if group is not None:
            raise ValueError("backend='reference' is single-process; group must be None")
        if isinstance(tau, Tensor):
            _check_temperature_value(tau.item())  # a test path: reading the value back is fine here
        if targets is None:
            targets = _default_targets(query.shape[0], candidates.shape[0], query.device)
        loss = torch_ref.reference_contrastive_loss(
            query,
            candidates,
            tau,
            normalize=normalize,
            targets=targets,
            symmetric=symmetric,
            reduction=reduction,
        )
        return loss.to(acc)
    engine = _select_engine(backend, query)
    tau_input = None
    if isinstance(tau, Tensor):
        tau_input = tau.to(device=query.device, dtype=acc)

    n_q, n_c = query.shape[0], candidates.shape[0]
    world, q_offset, c_offset, global_n_q = 1, 0, 0, n_q
    if group is None:
        a_rows, b_rows, local = query, candidates, None
    else:  # gathered in fp32: the reduce-scatter of their gradients sums in fp32, rounded once
        world, rank = world_and_rank(group)
        sizes = gather_sizes([n_q, n_c, query.shape[1]], group, query.device)
        if len({s[2] for s in sizes}) != 1:
            raise ValueError(f"embedding size D differs across ranks: {[s[2] for s in sizes]}")
        counts_q, counts_c = [s[0] for s in sizes], [s[1] for s in sizes]
        global_n_q, q_offset, c_offset = sum(counts_q), sum(counts_q[:rank]), sum(counts_c[:rank])
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
    as_sum = reduction != "none"
    use_mean = reduction == "mean" and world == 1
    out_scale = {"mean": world / global_n_q, "sum": float(world), "none": 1.0}[reduction]
    want_grad = torch.is_grad_enabled() and (
        a_rows.requires_grad or b_rows.requires_grad or (tau_input is not None and tau_input.requires_grad)
    )
    plan = _Plan(
        engine=engine,
        engine_dtype=None if engine is torch_ref else query.dtype,
        normalize=normalize,
        symmetric=symmetric,
        positives=positives,
        bad_positives=bad_targets,
        local=local,
        inv_tau=None if tau_input is not None else _inverse(tau, acc),
        tau_checked=tau_input is None or _reads_values_on_host(tau),
        as_sum=as_sum,
        use_mean=use_mean,
        out_scale=out_scale,
        fused=as_sum and want_grad and hasattr(engine, "row_lse_and_grad"),
    )
    return _InfoNCE.apply(a_rows, b_rows, tau_input, plan)


class ContrastiveLoss(nn.Module):
    """nn.Module form of `contrastive_loss`; forward(query, candidates, targets=None).

    With `learnable_temperature=True` the temperature is a parameter stored as its logarithm (so it
    stays positive under any optimizer step), initialised to `temperature`.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        *,
        normalize: bool = True,
        symmetric: bool = False,
        reduction: str = "mean",
        group: dist.ProcessGroup | None = None,
        backend: str = "auto",
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("backend", backend, BACKENDS)
        _checked_temperature(temperature, torch.device("cpu"))
        self.normalize, self.symmetric, self.reduction = normalize, symmetric, reduction
        self.group, self.backend = group, backend
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.log_temperature = None
            self.fixed_temperature = float(temperature)

    @property
    def temperature(self) -> float | Tensor:
        return self.fixed_temperature if self.log_temperature is None else self.log_temperature.exp()

    def forward(self, query: Tensor, candidates: Tensor, targets: Tensor | None = None) -> Tensor:
        return contrastive_loss(
            query,
            candidates,
            self.temperature,
            normalize=self.normalize,
            targets=targets,
            symmetric=self.symmetric,
            reduction=self.reduction,
            group=self.group,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        learnable = self.log_temperature is not None
        return (
            f"temperature={float(self.temperature):.4g}, learnable_temperature={learnable}, "
            f"normalize={self.normalize}, symmetric={self.symmetric}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )
