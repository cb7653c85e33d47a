"""`contrastive_loss`: argument checks, the choice of engine and path, nothing else.

Two engines implement `engine.py`'s interface: `torch_engine` (the CPU product) and `triton_engine`
(CUDA). Two paths use them: `fused.py` computes the gradients during the forward (scalar mean/sum
losses in one direction, what training uses), `recompute.py` keeps the log-sum-exp and recomputes
the logits in the backward (symmetric losses, per-row losses with arbitrary upstream gradients).

No host syncs on a GPU: value checks that would read a device tensor back (a tensor temperature's
sign, targets' range) run only for CPU tensors, where they raise a clear ValueError. On a GPU the bad
values are folded into the result instead: an invalid temperature (<= 0, Inf, NaN) or an
out-of-range target makes the loss and the gradients NaN, as non-finite embeddings already do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import torch_engine
from .distributed import gather_sizes, world_and_rank
from .engine import Layout, LossCall
from .extended import extended_loss, fits_one_pass
from .fused import fused_loss
from .recompute import recompute_loss

REDUCTIONS = ("mean", "sum", "none")
POSITIVES = ("mask", "any", "each")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _checked_targets(targets: Tensor | None, query: Tensor, candidates: Tensor) -> tuple[Tensor | None, bool]:
    """(int64 targets or None for the default layout, whether their range was checked).

    Out-of-range values raise a ValueError where the targets can be read for free (CPU); on a GPU the
    paths make those rows' losses NaN instead (no host sync)."""
    n_q, n_c = query.shape[0], candidates.shape[0]
    if targets is None:
        if n_c % n_q:
            raise ValueError(
                f"candidates rows ({n_c}) must be a multiple of query rows ({n_q}) for the default layout "
                f"[pos_0, neg_0_1..neg_0_K, pos_1, ...]; pass targets otherwise (query {tuple(query.shape)}, "
                f"candidates {tuple(candidates.shape)})"
            )
        return None, True
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be an integer torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != (n_q,):
        raise ValueError(f"targets must have shape ({n_q},) (one per query row), got {tuple(targets.shape)}")
    if targets.device != query.device:
        raise ValueError(f"targets is on {targets.device} but query is on {query.device}")
    targets = targets.long()
    if not _reads_values_on_host(targets):
        return targets, False
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= n_c:
        raise ValueError(f"targets must index candidates rows [0, {n_c}), got values in [{low}, {high}]")
    return targets, True


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _checked_v3(
    query: Tensor,
    candidates: Tensor,
    dims: Sequence[int] | None,
    weights: Sequence[float] | None,
    ids: Tensor | None,
    positives: str | None,
    margin: float | None,
) -> dict:
    """The v3 options as LossCall fields (dims, dim_weights, candidate_ids, positives, margin,
    extended); every bad value raises here, before any work."""
    D = query.shape[1]
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims")
        dims_t, weights_t = (D,), (1.0,)
    else:
        if isinstance(dims, (str, bytes, Tensor)) or not isinstance(dims, Sequence) or not dims:
            raise TypeError(f"matryoshka_dims must be a non-empty sequence of ints, got {dims!r}")
        if not all(_is_int(d) for d in dims):
            raise TypeError(f"matryoshka_dims must hold ints, got {list(dims)!r}")
        dims_t = tuple(int(d) for d in dims)
        if any(b <= a for a, b in zip(dims_t, dims_t[1:])):
            raise ValueError(f"matryoshka_dims must be strictly increasing, got {list(dims_t)}")
        if dims_t[0] < 1 or dims_t[-1] > D:
            raise ValueError(f"matryoshka_dims must lie in [1, D={D}], got {list(dims_t)}")
        if weights is None:
            weights_t = (1.0,) * len(dims_t)
        else:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise TypeError(f"matryoshka_weights must be a sequence of floats, got {weights!r}")
            if len(weights) != len(dims_t):
                raise ValueError(
                    f"matryoshka_weights must have one weight per dim ({len(dims_t)}), got {len(weights)}"
                )
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                raise TypeError(f"matryoshka_weights must hold numbers, got {list(weights)!r}")
            weights_t = tuple(float(w) for w in weights)
            if any(not math.isfinite(w) or w < 0 for w in weights_t):
                raise ValueError(f"matryoshka_weights must be finite and >= 0, got {list(weights_t)}")
    if ids is not None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"candidate_ids must be an int64 torch.Tensor, got {type(ids).__name__}")
        if ids.dtype != torch.int64:
            raise TypeError(f"candidate_ids must have dtype torch.int64, got {ids.dtype}")
        if ids.shape != (candidates.shape[0],):
            raise ValueError(
                f"candidate_ids must have shape ({candidates.shape[0]},) (one per candidates row), "
                f"got {tuple(ids.shape)}"
            )
        if ids.device != candidates.device:
            raise ValueError(f"candidate_ids is on {ids.device} but candidates are on {candidates.device}")
    if positives is not None:
        _check_choice("positives", positives, POSITIVES)
        if ids is None:
            raise ValueError(f"positives={positives!r} needs candidate_ids")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise TypeError(f"false_negative_margin must be a float or None, got {type(margin).__name__}")
        if not math.isfinite(margin):
            raise ValueError(f"false_negative_margin must be finite, got {margin}")
    return {
        "dims": dims_t,
        "dim_weights": weights_t,
        "candidate_ids": ids,
        "positives": positives or "mask",
        "margin": None if margin is None else float(margin),
        "extended": dims is not None or ids is not None or margin is not None,
    }


# ----------------------------------------------------------------------------------------------------
# engines


def _select_engine(backend: str, query: Tensor) -> ModuleType:
    """The engine module for this backend and these tensors."""
    on_cuda = query.device.type == "cuda"
    if backend == "torch" or (backend == "auto" and (not on_cuda or query.dtype == torch.float64)):
        return torch_engine
    if query.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32, float16 and bfloat16 inputs, got torch.float64")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {query.device}) or TRITON_INTERPRET=1 set before "
            "triton is first imported; use backend='torch' on the CPU"
        )
    try:
        from . import triton_engine
    except Exception as error:  # a broken triton install must not break the torch path
        if backend == "auto":
            warnings.warn(f"Triton engine unavailable ({error}); using the torch engine", stacklevel=4)
            return torch_engine
        raise ImportError(f"backend='triton' could not import the Triton engine: {error}") from error
    return triton_engine


def _checked(
    query, candidates, temperature, normalize, targets, symmetric, reduction, group, backend
) -> tuple[float | Tensor, LossCall]:
    """All argument checks and the row layout; returns (temperature, the call for a path)."""
    _check_embeddings(query, candidates)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
    _check_flag("normalize", normalize)
    _check_flag("symmetric", symmetric)
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    tau = _checked_temperature(temperature, query.device)
    targets, targets_checked = _checked_targets(targets, query, candidates)
    call = LossCall(
        engine=_select_engine(backend, query),
        normalize=normalize,
        targets=targets,
        targets_checked=targets_checked,
        tau_checked=not isinstance(tau, Tensor) or _reads_values_on_host(tau),
        symmetric=symmetric,
        reduction=reduction,
        layout=_layout(query, candidates, group),
    )
    return tau, call


def _layout(query: Tensor, candidates: Tensor, group: dist.ProcessGroup | None) -> Layout:
    """This rank's rows in the gathered batch; one host read of the row counts."""
    n_q, n_c = query.shape[0], candidates.shape[0]
    if group is None:
        return Layout(None, 1, 0, 0, 0, n_q, [n_q], [n_c])
    world, rank = world_and_rank(group)
    sizes = gather_sizes([n_q, n_c, query.shape[1]], group, query.device)
    if len({s[2] for s in sizes}) != 1:
        raise ValueError(f"embedding size D differs across ranks: {[s[2] for s in sizes]}")
    counts_q, counts_c = [s[0] for s in sizes], [s[1] for s in sizes]
    return Layout(
        group, world, rank, sum(counts_q[:rank]), sum(counts_c[:rank]), sum(counts_q), counts_q, counts_c
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
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
    candidate_ids: Tensor | None = None,
    positives: str | None = None,
    false_negative_margin: float | None = None,
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
        backend: "auto" (Triton for CUDA tensors, the torch engine otherwise), "triton" (CPU only
            under TRITON_INTERPRET=1), "torch". The float64 reference for tests is
            `vlm2vec_kernels.reference_contrastive_loss`.

    v3 options (they run the loss through `extended.py`, except ids alone in "mask" mode: see
    "Engines and paths"; docs/loss_v3.md has the math):
        matryoshka_dims: increasing prefix lengths d_k in [1, D]. The loss becomes
            sum_k w_k * L(q[:, :d_k], c[:, :d_k]), each prefix re-normalised when `normalize`, each L
            the loss the other options define, reduced as `reduction` says. D counts only if listed.
            All prefixes come from one pass over D (6 B^2 d_K FLOPs fwd+bwd).
        matryoshka_weights: w_k, one per dim, finite and >= 0 (default all 1.0).
        candidate_ids: int64 [Bc]; candidates with equal ids are the same item. P_i = the candidates
            sharing the id of query i's target (the target included). With `group`, ids are gathered
            with the candidates.
        positives: what P_i means (needs candidate_ids; default "mask"):
            "mask": the target is the one positive; the other members of P_i leave the denominator.
            "any": L_i = -log sum_{p in P_i} exp(s_ip) + log sum_j exp(s_ij).
            "each": L_i = mean_{p in P_i} [-s_ip + log(exp(s_ip) + sum_{j not in P_i} exp(s_ij))].
        false_negative_margin: candidates j outside P_i whose similarity (cosine, or dot without
            `normalize`; before the temperature) exceeds the target's by more than this leave row i's
            denominator (no gradient through the choice).
        With `symmetric`, the reverse direction scores each positive against every query; its
        positives are the queries whose targets share the positive's id. On one process it reads its
        logits from the forward ones (one chunk while B x Bc x len(dims) <= 2**28: 6 B^2 D FLOPs);
        larger batches and `group` run it as a second pass (12 B^2 D).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [Bq] for reduction="none". Logits,
        softmax, sums and the positive logit run in fp32; input gradients come back in the input
        dtype, rounded once. Non-finite embeddings give a non-finite loss.

    Engines and paths: a scalar one-directional loss (mean/sum, symmetric=False, the training case)
    computes its gradients during the forward (`fused.py`: 6 B^2 D FLOPs; the backward only scales
    them by grad_output). A scalar symmetric loss on one process whose logits fit 2**28 elements
    (B <= 16,384 at K = 0) computes both directions in one pass over all of them (`extended.py`:
    6 B^2 D FLOPs, the logits held once, torch ops on either backend). Other symmetric losses and
    reduction="none" take the recompute path (`recompute.py`: the backward recomputes the logits,
    8 B^2 D per direction); any v3 option runs `extended.py` for every reduction (on the Triton
    backend, Matryoshka alone runs its own kernels: `triton_prefix.py`, 11 launches); candidate_ids
    alone in "mask" mode for a scalar one-directional loss run the fused path, the target's copies
    masked in its row pass (Triton: the plain loss's launches). Extra memory
    beyond the returned gradients: one chunk of logits (torch engine: <= 2**22 fp32 on the CPU, most
    of it inside the not yet written query-gradient rows; Triton: chunk rows x Bc fp32) + fp32
    gradient buffers for 16-bit inputs + O(B) vectors; `group` adds the gathered candidates.

    Example::

        loss = contrastive_loss(q, c, 0.02)                  # c = [pos_0, neg_0_1, pos_1, neg_1_1, ...]
        loss = contrastive_loss(q, c, tau, targets=t, symmetric=True, group=dist.group.WORLD)
        loss = contrastive_loss(q, c, 0.02, matryoshka_dims=[64, 256, 1536], candidate_ids=item_ids,
                                positives="any", false_negative_margin=0.1)
    """
    tau, call = _checked(
        query, candidates, temperature, normalize, targets, symmetric, reduction, group, backend
    )
    margin = false_negative_margin
    v3 = _checked_v3(query, candidates, matryoshka_dims, matryoshka_weights, candidate_ids, positives, margin)
    call = dataclasses.replace(call, **v3)
    # ids alone in "mask" mode are plain InfoNCE with the target's copies dropped: the fused path masks
    # them (one comparison per logit) for the scalar one-direction loss, so a multi-GPU step keeps its
    # handful of launches; everything else is extended.py
    masked_only = (
        candidate_ids is not None
        and v3["positives"] == "mask"
        and matryoshka_dims is None
        and margin is None
        and not symmetric
        and reduction != "none"
    )
    if (v3["extended"] and not masked_only) or (
        symmetric and reduction != "none" and fits_one_pass(call, query, candidates)
    ):
        return extended_loss(query, candidates, tau, call)
    if symmetric or reduction == "none":
        return recompute_loss(query, candidates, tau, call)
    return fused_loss(query, candidates, tau, call)


class ContrastiveLoss(nn.Module):
    """nn.Module form of `contrastive_loss`; forward(query, candidates, targets=None, candidate_ids=None).

    With `learnable_temperature=True` the temperature is a parameter stored as its logarithm (so it
    stays positive under any optimizer step), initialised to `temperature`. The v3 options
    (`matryoshka_dims`, `matryoshka_weights`, `positives`, `false_negative_margin`) are fixed here and
    checked now (the dims against D at the first call); `candidate_ids` change per batch: forward takes
    them.
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
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
        positives: str | None = None,
        false_negative_margin: float | None = None,
    ) -> None:
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("backend", backend, BACKENDS)
        _checked_temperature(temperature, torch.device("cpu"))
        if positives is not None:
            _check_choice("positives", positives, POSITIVES)
        width = max(matryoshka_dims) if _is_int_sequence(matryoshka_dims) else 1
        dummy = torch.empty(0, width, device="meta")  # shapes only: the checks read no values
        _checked_v3(dummy, dummy, matryoshka_dims, matryoshka_weights, None, None, false_negative_margin)
        self.matryoshka_dims = None if matryoshka_dims is None else list(matryoshka_dims)
        self.matryoshka_weights = None if matryoshka_weights is None else list(matryoshka_weights)
        self.positives, self.false_negative_margin = positives, false_negative_margin
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

    def forward(
        self,
        query: Tensor,
        candidates: Tensor,
        targets: Tensor | None = None,
        candidate_ids: Tensor | None = None,
    ) -> Tensor:
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
            matryoshka_dims=self.matryoshka_dims,
            matryoshka_weights=self.matryoshka_weights,
            candidate_ids=candidate_ids,
            positives=self.positives if candidate_ids is not None else None,
            false_negative_margin=self.false_negative_margin,
        )

    def extra_repr(self) -> str:
        learnable = self.log_temperature is not None
        return (
            f"temperature={float(self.temperature):.4g}, learnable_temperature={learnable}, "
            f"normalize={self.normalize}, symmetric={self.symmetric}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
            + "".join(
                f", {name}={value!r}"
                for name in ("matryoshka_dims", "matryoshka_weights", "positives", "false_negative_margin")
                if (value := getattr(self, name)) is not None
            )
        )


def _is_int_sequence(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and bool(x) and all(map(_is_int, x))
