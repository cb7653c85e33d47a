"""The interface both engines implement (`torch_engine`, `triton_engine`) and what they share.

An engine is a module with these functions; `contrastive.py` picks one per call and never asks what
it can do. Notation: q [M, D] query rows, c [N, D] candidate rows,
s_ij = a_i rc_j <q_i, c_j> with a_i = rq_i / tau (rq, rc: inverse L2 norms, or 1 without
normalisation), P = softmax_j(s), Y_ij = 1 where j is row i's target.

Gradients in the forward (`fused.py`: scalar mean/sum losses, one direction):
    inverse_norms(q, c) -> (rq [M], rc [N])
    xent(q, c, rq, rc, tau, targets, weight, want_dq, want_dc) -> (loss, dq, dc)
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
from typing import Protocol, runtime_checkable

import torch
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
