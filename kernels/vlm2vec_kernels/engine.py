"""The interface both engines implement (`torch_engine`, `triton_engine`) and what they share.

An engine is a module with these functions and one constant; `contrastive.py` picks one per call and
never asks which it is. OPERANDS_IN_INPUT_DTYPE: the engine runs its GEMMs in the operands' dtype, so
the recompute path hands it rows in the input dtype (not the fp32 copies it gathers across ranks).

Notation: q [M, D] query rows, c [N, D] candidate rows,
s_ij = a_i rc_j <q_i, c_j> with a_i = rq_i / tau (rq, rc: inverse L2 norms, or 1 without
normalisation), P = softmax_j(s), Y_ij = 1 where j is row i's target.

Gradients in the forward (`fused.py`: scalar mean/sum losses, one direction):
    inverse_norms(q, c) -> (rq [M], rc [N])
    xent(q, c, rq, rc, tau, targets, weight, want_dq, want_dc, ids=None) -> (loss, dq, dc)
        loss = weight * sum_i (lse_i - s_i,t(i)), and the gradients of that loss with the scales held
        fixed: dq = weight * diag(a) (P - Y) diag(rc) c, dc = weight * diag(rc) (P - Y)^T diag(a) q, fp32
    finish(dq, q, rq, dc, c, rc, tau, want_dtau) -> (dq, dc, dtau)
        adds the normalisation's Jacobian in place (g -= <g, x> rx^2 x per row) and
        dtau = -1/tau sum_i <dq_i, q_i> (every logit holds exactly one 1/tau)
    scale_grads(grads, grad_out, dtypes) -> grads * grad_out rounded once to `dtypes` (the backward)

Recompute (`recompute.py`: symmetric, reduction="none"):
    row_lse(q, c, row_scale, col_scale) -> lse [M]
    softmax_grad(q, c, row_scale, col_scale, lse, row_weight) -> (gq [M, D], gc [N, D])
        P_ij = row_weight_i exp(s_ij - lse_i), s_ij = row_scale_i col_scale_j <q_i, c_j>,
        gq = (P diag(col_scale)) c, gc = (diag(row_scale) P)^T q
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

NORM_EPS = 1e-12  # as torch.nn.functional.normalize


@dataclass(frozen=True)
class Targets:
    """The column of each query row's positive among the (gathered) candidates:
    t_i = index_i + offset, or offset + i * stride when `index` is None (the default layout).
    `checked`: the values were range-checked on the host; otherwise an engine turns a row whose
    target falls outside [0, N) into a NaN loss (no host sync)."""

    index: Tensor | None
    offset: int
    stride: int
    checked: bool

    def columns(self, n_rows: int, device: torch.device) -> Tensor:
        if self.index is None:
            stop = self.offset + n_rows * self.stride
            return torch.arange(self.offset, stop, self.stride, device=device)
        return self.index + self.offset if self.offset else self.index


@dataclass(frozen=True)
class Layout:
    """Where this rank's rows sit in the batch the loss scores: the rows gathered over `group` in rank
    order (ranks may hold different counts), or the local rows alone (group None, world 1)."""

    group: dist.ProcessGroup | None
    world: int
    rank: int
    q_offset: int  # this rank's first query row in the gathered queries
    c_offset: int  # this rank's first candidate row in the gathered candidates
    global_n_q: int
    counts_q: list[int]
    counts_c: list[int]

    def scale(self, reduction: str) -> float:
        """d(returned loss) / d(sum of this rank's row losses): averaging the returned value over the
        ranks gives the global loss."""
        return {"mean": self.world / self.global_n_q, "sum": float(self.world), "none": 1.0}[reduction]


@dataclass(frozen=True)
class LossCall:
    """Everything about one checked `contrastive_loss` call except the tensors it differentiates."""

    engine: ModuleType
    normalize: bool
    targets: Tensor | None  # int64 [Bq] local candidate rows, or None for the default layout
    targets_checked: bool  # their range was checked on the host (else folded into NaN rows)
    tau_checked: bool  # a tensor temperature's value was checked on the host
    symmetric: bool
    reduction: str
    layout: Layout
    # the v3 options (extended.py); `extended` says whether any of them is in use
    dims: tuple[int, ...] = ()  # Matryoshka prefix lengths, increasing (D alone without them)
    dim_weights: tuple[float, ...] = (1.0,)
    candidate_ids: Tensor | None = None  # int64 [Bc] local candidate ids
    positives: str = "mask"
    margin: float | None = None
    extended: bool = False


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse(tau: float, dtype: torch.dtype) -> float:
    """1 / tau, Inf where it overflows `dtype` (a tiny temperature then gives a NaN loss, as a tensor
    division would, rather than a conversion error)."""
    value = 1 / tau
    return value if value <= torch.finfo(dtype).max else math.inf


@runtime_checkable
class Engine(Protocol):
    """See the module docstring for the math of each function."""

    OPERANDS_IN_INPUT_DTYPE: bool

    def inverse_norms(self, q: Tensor, c: Tensor) -> tuple[Tensor, Tensor]: ...

    def xent(
        self,
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
    ) -> tuple[Tensor, Tensor | None, Tensor | None]: ...

    def finish(
        self,
        dq: Tensor | None,
        q: Tensor,
        rq: Tensor | None,
        dc: Tensor | None,
        c: Tensor,
        rc: Tensor | None,
        tau: float | Tensor,
        want_dtau: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]: ...

    def scale_grads(
        self, grads: list[Tensor | None], grad_out: Tensor, dtypes: list[torch.dtype]
    ) -> list[Tensor | None]: ...

    def row_lse(self, q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor) -> Tensor: ...

    def softmax_grad(
        self, q: Tensor, c: Tensor, row_scale: Tensor, col_scale: Tensor, lse: Tensor, row_weight: Tensor
    ) -> tuple[Tensor, Tensor]: ...
