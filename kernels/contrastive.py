"""InfoNCE contrastive loss without a Bq x Bc matrix: argument checks, backend dispatch, orchestration.

The engines (chunked torch in `torch_ref.py`, Triton in `triton_contrastive.py`) compute the one piece
that needs all candidates at once, the row log-sum-exp, and the split softmax gradient. Around them,
`_DirectionalInfoNCE` adds the positive logit, the L2 normalisation and the temperature in fp32, with
their gradients written in place into the engine's fp32 buffers (closed forms: no autograd graph over
O(B*D) temporaries, so peak memory stays near the size of the returned gradients). Plain autograd
does the rest: the cast to fp32 (gradients are rounded to the input dtype once), the symmetric
average, the reductions and the cross-rank gather.
"""

from __future__ import annotations

import math
import os
import warnings
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
ROW_BLOCK_ELEMENTS = 2**20  # bound on [rows, D] temporaries with explicit targets (4 MiB in fp32)


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


def _checked_temperature(temperature: float | Tensor, device: torch.device) -> float | Tensor:
    """A positive finite float, or a one-element float tensor reshaped to 0-dim (keeps its graph)."""
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point() or temperature.numel() != 1:
            raise TypeError(
                "temperature tensor must be a one-element floating-point tensor, got "
                f"shape {tuple(temperature.shape)} dtype {temperature.dtype}"
            )
        if temperature.device != device and temperature.device.type != "cpu":
            raise ValueError(f"temperature is on {temperature.device} but query is on {device}")
        value = float(temperature.detach())
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        value = float(temperature)
    else:
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be positive and finite, got {value}")
    return temperature.reshape(()) if isinstance(temperature, Tensor) else value


def _checked_targets(targets: Tensor | None, query: Tensor, candidates: Tensor) -> Tensor | None:
    """Validated int64 targets, or None for the default layout (which must then divide evenly)."""
    n_q, n_c = query.shape[0], candidates.shape[0]
    if targets is None:
        if n_c % n_q:
            raise ValueError(
                f"candidates rows ({n_c}) must be a multiple of query rows ({n_q}) for the default layout "
                f"[pos_0, neg_0_1..neg_0_K, pos_1, ...]; pass targets otherwise (query {tuple(query.shape)}, "
                f"candidates {tuple(candidates.shape)})"
            )
        return None
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be an integer torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != (n_q,):
        raise ValueError(f"targets must have shape ({n_q},) (one per query row), got {tuple(targets.shape)}")
    if targets.device != query.device:
        raise ValueError(f"targets is on {targets.device} but query is on {query.device}")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= n_c:
        raise ValueError(f"targets must index candidates rows [0, {n_c}), got values in [{low}, {high}]")
    return targets.long()


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


Positives = slice | Tensor  # rows of the candidates holding each row's positive: a strided slice or indices


def _row_blocks(x: Tensor):
    """(start, stop) of row blocks of x with at most ROW_BLOCK_ELEMENTS elements (bounded temporaries)."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        yield start, min(start + step, x.shape[0])


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """<a_i, b_i> for every row, as a batched [1, D] x [D, 1] product: no [rows, D] temporary."""
    return torch.bmm(a.unsqueeze(1), b.to(a.dtype).unsqueeze(2)).view(-1)


def _positive_dot(rows: Tensor, cands: Tensor, positives: Positives) -> Tensor:
    """<rows_i, cands[positives[i]]>; a slice is a view, indices are gathered in bounded blocks."""
    if isinstance(positives, slice):
        return _row_dot(rows, cands[positives])
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    for start, stop in _row_blocks(rows):
        out[start:stop] = _row_dot(rows[start:stop], cands.index_select(0, positives[start:stop]))
    return out


def _norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """(row norms, inverse row norms clamped as F.normalize: 1 / max(norm, eps))."""
    norms = torch.linalg.vector_norm(x, dim=1)
    return norms, norms.clamp_min(NORM_EPS).reciprocal()


def _subtract_positive_(
    gq: Tensor,
    gc: Tensor,
    rows: Tensor,
    cands: Tensor,
    positives: Positives,
    weight: Tensor,
    row_scale: Tensor,
    col_scale: Tensor,
) -> None:
    """Adds the gradient pieces of -sum_i weight_i * s_i,t(i) to the engine's gq, gc (same split:
    gq_i -= w_i col_scale_t c_t, gc_t -= w_i row_scale_i q_i), in fp32 before any rounding."""
    if isinstance(positives, slice):
        gq.addcmul_(cands[positives], (weight * col_scale[positives])[:, None], value=-1)
        gc[positives].addcmul_(rows, (weight * row_scale)[:, None], value=-1)
        return
    for start, stop in _row_blocks(rows):
        t, w = positives[start:stop], weight[start:stop]
        gq[start:stop].addcmul_(cands.index_select(0, t), (w * col_scale[t])[:, None], value=-1)
        gc.index_add_(0, t, rows[start:stop] * (w * row_scale[start:stop])[:, None], alpha=-1)


def _input_grad_(
    g: Tensor, x: Tensor, scale: Tensor, norms: Tensor | None, d_inverse: Tensor | None
) -> Tensor:
    """In place g -> dL/dx = scale * g + (d_inverse * d(1/max(|x|, eps))/dx) for normalised rows."""
    g.mul_(scale[:, None])
    if norms is not None:
        inverse = norms.clamp_min(NORM_EPS).reciprocal()
        coef = torch.where(norms > NORM_EPS, -d_inverse * inverse**3, torch.zeros_like(inverse))
        g.addcmul_(x, coef[:, None])
    return g


class _DirectionalInfoNCE(torch.autograd.Function):
    """Per-row InfoNCE of `rows` against `cands`: loss_i = lse_i - s_i,t(i), or its sum over i, with
    s_ij = a_i b_j <rows_i, cands_j> / tau (a, b inverse norms when normalising, else 1).

    The backward assembles dL/drows, dL/dcands and dL/dtau in place in the engine's fp32 gq / gc
    buffers (positive pair, normalisation and temperature by their closed forms), so beyond the
    returned gradients only bounded row blocks are allocated. rows/cands (accumulation dtype) carry
    the graph; rows_eng/cands_eng are the same values in the engine's dtype. With `as_sum` the row
    weights are known in the forward, so an engine offering `row_lse_and_grad` produces gq / gc in
    the same pass and the backward only scales them (a repeated backward recomputes instead).
    """

    @staticmethod
    def forward(ctx, rows, cands, tau, positives, rows_eng, cands_eng, normalize, engine, as_sum, want_grad):
        (row_norms, row_inverse), (cand_norms, col_scale) = _norms(rows), _norms(cands)
        if not normalize:
            row_inverse, col_scale = torch.ones_like(row_norms), torch.ones_like(cand_norms)
        row_scale = row_inverse / tau
        positive = row_scale * col_scale[positives] * _positive_dot(rows, cands, positives)
        fused = getattr(engine, "row_lse_and_grad", None)
        ctx.precomputed = None
        if as_sum and want_grad and fused is not None:
            lse, gq, gc = fused(rows_eng, cands_eng, row_scale, col_scale, torch.ones_like(row_scale))
            ctx.precomputed = gq, gc
        else:
            lse = engine.row_lse(rows_eng, cands_eng, row_scale, col_scale)
        ctx.engine, ctx.as_sum, ctx.normalize, ctx.positives = engine, as_sum, normalize, positives
        ctx.save_for_backward(
            rows, cands, tau, rows_eng, cands_eng, row_scale, col_scale, lse, row_norms, cand_norms
        )
        # 0 * norm is NaN for a row holding Inf/NaN: without normalisation an Inf candidate can give
        # s = -Inf everywhere, which the LSE rightly ignores, but the loss must not look finite.
        losses = (lse - positive).add_((row_norms + cand_norms.sum()).mul_(0))
        return losses.sum() if as_sum else losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        rows, cands, tau, rows_eng, cands_eng, row_scale, col_scale, lse, row_norms, cand_norms = (
            ctx.saved_tensors
        )
        weight = grad_out.to(lse.dtype)
        weight = weight.expand(lse.shape).contiguous() if ctx.as_sum else weight.contiguous()
        precomputed, ctx.precomputed = ctx.precomputed, None
        if precomputed is not None:
            gq, gc = (g.mul_(grad_out) for g in precomputed)
        else:
            gq, gc = ctx.engine.softmax_grad(rows_eng, cands_eng, row_scale, col_scale, lse, weight)
        _subtract_positive_(gq, gc, rows, cands, ctx.positives, weight, row_scale, col_scale)
        need_rows, need_cands, need_tau = ctx.needs_input_grad[:3]
        d_row_scale = _row_dot(gq, rows) if need_rows and ctx.normalize or need_tau else None
        d_tau = -(d_row_scale * row_scale).sum() / tau if need_tau else None
        d_rows = d_cands = None
        if need_rows:
            d_inverse = d_row_scale / tau if ctx.normalize else None
            d_rows = _input_grad_(gq, rows, row_scale, row_norms if ctx.normalize else None, d_inverse)
        if need_cands:
            d_inverse = _row_dot(gc, cands) if ctx.normalize else None
            d_cands = _input_grad_(gc, cands, col_scale, cand_norms if ctx.normalize else None, d_inverse)
        return d_rows, d_cands, d_tau, None, None, None, None, None, None, None


def _directional_loss(
    rows: Tensor,
    cands: Tensor,
    tau: Tensor,
    positives: Positives,
    *,
    normalize: bool,
    engine: ModuleType,
    engine_dtype: torch.dtype,
    as_sum: bool,
    originals: tuple[Tensor | None, Tensor | None],
) -> Tensor:
    """Calls _DirectionalInfoNCE, handing the engine `originals` (the caller's tensors) when they
    already hold the values in the engine dtype, else a cast of the accumulation-dtype tensors."""

    def for_engine(x: Tensor, original: Tensor | None) -> Tensor:
        if x.dtype == engine_dtype:
            x = x.detach()
        elif original is not None:
            x = original.detach()
        else:
            x = x.detach().to(engine_dtype)
        return x if engine is torch_ref else x.contiguous()

    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, cands, tau))
    rows_eng, cands_eng = for_engine(rows, originals[0]), for_engine(cands, originals[1])
    return _DirectionalInfoNCE.apply(
        rows, cands, tau, positives, rows_eng, cands_eng, normalize, engine, as_sum, want_grad
    )


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
        temperature: positive float, or a one-element tensor (a learnable temperature gets its gradient;
            its value is checked, which reads it back from the device once per call).
        normalize: L2-normalise both sides first (eps 1e-12, as F.normalize).
        targets: int [Bq], index of each query's positive among this rank's `candidates` (overrides
            the default layout; Bc is then free, and several queries may share a positive).
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
            Every rank must call this with the same options (it runs collectives, forward and backward).
        backend: "auto" (Triton for CUDA tensors, chunked torch otherwise), "triton" (CPU only under
            TRITON_INTERPRET=1), "torch" (chunked), "reference" (float64, full matrix; for tests).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [Bq] for reduction="none". Sums and the
        positive logit run in fp32; input gradients come back in the input dtype, rounded once.
        Non-finite embeddings give a non-finite loss. Extra memory beyond the returned gradients:
        one chunk of logits (torch engine: <= 2**22 fp32 = 16 MiB) + O(B) vectors; fp16/bf16 inputs
        add their fp32 copies, `group` the gathered rows, `symmetric` the positives' rows.

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
    targets = _checked_targets(targets, query, candidates)
    acc = _accumulation_dtype(query.dtype)
    if backend == "reference":
        if group is not None:
            raise ValueError("backend='reference' is single-process; group must be None")
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
    engine_dtype = acc if engine is torch_ref else query.dtype
    if isinstance(tau, Tensor):
        tau = tau.to(device=query.device, dtype=acc)
    else:
        tau = torch.tensor(tau, dtype=acc, device=query.device)

    q, c = query.to(acc), candidates.to(acc)
    n_q, n_c = q.shape[0], c.shape[0]
    if symmetric:  # the positives, as rows of the reverse direction: a strided view when possible
        if targets is None:
            c_pos, c_pos_original = c[:: n_c // n_q], candidates[:: n_c // n_q]
        else:
            c_pos, c_pos_original = c.index_select(0, targets), candidates.index_select(0, targets)

    world, q_offset, c_offset = 1, 0, 0
    if group is None:
        global_n_q, c_all, q_all = n_q, c, q
        originals = (query, candidates), (c_pos_original if symmetric else None, query)
    else:
        world, rank = world_and_rank(group)
        sizes = gather_sizes([n_q, n_c, q.shape[1]], group, q.device)
        if len({s[2] for s in sizes}) != 1:
            raise ValueError(f"embedding size D differs across ranks: {[s[2] for s in sizes]}")
        counts_q, counts_c = [s[0] for s in sizes], [s[1] for s in sizes]
        global_n_q, q_offset, c_offset = sum(counts_q), sum(counts_q[:rank]), sum(counts_c[:rank])
        c_all = gather_rows(c, counts_c, group)
        q_all = gather_rows(q, counts_q, group) if symmetric else None
        originals = (query, None), (c_pos_original if symmetric else None, None)

    options = dict(normalize=normalize, engine=engine, engine_dtype=engine_dtype, as_sum=reduction != "none")
    if targets is None:  # default layout: positives at c_offset, c_offset + (1 + K), ...
        stride = n_c // n_q
        positives = slice(c_offset, c_offset + n_q * stride, stride)
    else:
        positives = targets + c_offset
    loss = _directional_loss(q, c_all, tau, positives, originals=originals[0], **options)
    if symmetric:
        reverse_positives = slice(q_offset, q_offset + n_q)
        reverse = _directional_loss(c_pos, q_all, tau, reverse_positives, originals=originals[1], **options)
        loss = 0.5 * (loss + reverse)
    if reduction == "mean":
        return loss * (world / global_n_q)
    if reduction == "sum" and world != 1:
        return loss * world
    return loss


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
