"""Gradients in the forward: the contrastive loss for scalar (mean/sum) one-directional losses.

Under GradCache (and in most training) the loss is a scalar of leaf embeddings whose gradient is
wanted at once, so the forward computes the loss and both input gradients in one pass over the
logits, the way Liger-Kernel's fused linear cross-entropy does:

    per chunk of query rows R:  S_R = (a q_R) c^T              one GEMM, fp32 accumulate
                                (candidate_ids: s_ij = -Inf where id_j = id_t(i), j != t(i))
                                P_R - Y_R, row lse and loss     in place (engine: fused torch ops or
                                                                one Triton kernel)
                                dq_R = (P_R - Y_R) c,  dc += (P_R - Y_R)^T q_R     two GEMMs
    once:                       the normalisation's Jacobian and dL/dtau (`finish`)

6 B^2 D FLOPs (eager's useful work), chunk * N logits of working memory, never B x B. The backward
only multiplies the stored gradients by grad_output (a scalar). A repeated backward (retain_graph)
recomputes them. Cross-device: the candidates are all-gathered once, their gradients (summed over
the ranks' queries) reduce-scattered once, before the Jacobian, which needs the whole sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .distributed import all_gather_rows, reduce_scatter_rows
from .engine import LossCall, Targets, accumulation_dtype


@dataclass(frozen=True)
class FusedCall:
    """Everything about one call that is not a tensor input.

    weight: d loss / d (sum of the local row losses); counts: candidate rows per rank (with `group`).
    """

    engine: ModuleType
    normalize: bool
    targets: Targets
    weight: float
    temperature: float | None  # None: the temperature is the tensor input
    group: dist.ProcessGroup | None
    rank: int
    counts: list[int] | None
    needs: tuple[bool, bool, bool]  # gradients wanted for (query, candidates, temperature)
    ids: Tensor | None = None  # int64 [Bc] local candidate ids: the target's copies leave the softmax


def _run(q: Tensor, c: Tensor, tau: Tensor | None, call: FusedCall):
    """(loss, [dq, dc, dtau] in the accumulation dtype, None where not wanted)."""
    engine, (need_q, need_c, need_tau) = call.engine, call.needs
    temperature = call.temperature if tau is None else tau
    c_all = c if call.group is None else all_gather_rows(c, call.counts, call.group)
    ids = call.ids
    if ids is not None and call.group is not None:
        ids = all_gather_rows(ids, call.counts, call.group)
    rq, rc = engine.inverse_norms(q, c_all) if call.normalize else (None, None)
    loss, dq, dc = engine.xent(
        q, c_all, rq, rc, temperature, call.targets, call.weight, need_q or need_tau, need_c, ids
    )
    if call.group is not None:
        if dc is not None:
            dc = reduce_scatter_rows(dc, call.counts, call.rank, call.group)
        if rc is not None:
            start = sum(call.counts[: call.rank])
            rc = rc[start : start + c.shape[0]]
    dq, dc, dtau = engine.finish(dq, q, rq, dc, c, rc, temperature, need_tau)
    return loss, [dq if need_q else None, dc, dtau]


class FusedInfoNCE(torch.autograd.Function):
    """loss = weight * sum_i (lse_i - s_i,t(i)); its gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, query: Tensor, candidates: Tensor, tau: Tensor | None, call: FusedCall) -> Tensor:
        loss, grads = _run(query, candidates, tau, call)
        ctx.call, ctx.grads = call, grads
        ctx.save_for_backward(query, candidates, tau)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, candidates, tau = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None  # the buffers become the returned gradients
        if grads is None:  # a repeated backward (retain_graph): recompute
            grads = _run(query, candidates, tau, ctx.call)[1]
        dtypes = [query.dtype, candidates.dtype, grads[2].dtype if grads[2] is not None else None]
        return *ctx.call.engine.scale_grads(grads, grad_out, dtypes), None


def fused_loss(query: Tensor, candidates: Tensor, tau: float | Tensor, call: LossCall) -> Tensor:
    """The loss of one checked call (scalar, one direction) through `FusedInfoNCE`."""
    layout = call.layout
    tau_input = tau.to(query.device, accumulation_dtype(query.dtype)) if isinstance(tau, Tensor) else None
    grad = torch.is_grad_enabled()
    needs = tuple(grad and x is not None and x.requires_grad for x in (query, candidates, tau_input))
    stride = candidates.shape[0] // query.shape[0] if call.targets is None else 0
    fused = FusedCall(
        engine=call.engine,
        normalize=call.normalize,
        targets=Targets(call.targets, layout.c_offset, stride, checked=call.targets_checked),
        weight=layout.scale(call.reduction),
        temperature=None if tau_input is not None else tau,
        group=layout.group,
        rank=layout.rank,
        counts=layout.counts_c,
        needs=needs,
        ids=call.candidate_ids,
    )
    return FusedInfoNCE.apply(query, candidates, tau_input, fused)
