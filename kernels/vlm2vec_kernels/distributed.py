"""Cross-rank pieces of the contrastive loss: gather rows forward, reduce-scatter their gradient back.

Every rank passes its own rows; `gather_rows` concatenates them over the process group in rank order
(ranks may hold different numbers of rows) and its backward sums the gradient of the gathered tensor
over ranks and hands each rank the slice of its own rows. That is the exact gradient of a loss that
each rank computes over the gathered rows: no world-size scaling happens here (contrastive.py applies
it once, in the reduction).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# all_gather_single / reduce_scatter_single replace the *_tensor names in torch 2.13; older torch has
# only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world_and_rank(group: dist.ProcessGroup) -> tuple[int, int]:
    """(world size, this process's rank) inside `group`."""
    return dist.get_world_size(group), dist.get_rank(group)


def gather_sizes(sizes: list[int], group: dist.ProcessGroup, device: torch.device) -> list[list[int]]:
    """All ranks' `sizes` lists (same length everywhere), indexed [rank][k]."""
    world, _ = world_and_rank(group)
    local = torch.tensor(sizes, dtype=torch.int64, device=device)
    gathered = torch.empty(world * len(sizes), dtype=torch.int64, device=device)
    _all_gather(gathered, local, group=group)
    return gathered.view(world, len(sizes)).tolist()


def _padded(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


def all_gather_rows(x: Tensor, counts: list[int], group: dist.ProcessGroup) -> Tensor:
    """Every rank's rows [counts[rank], ...] concatenated in rank order (no autograd)."""
    most = max(counts)
    gathered = x.new_empty((len(counts) * most, *x.shape[1:]))
    _all_gather(gathered, _padded(x, most), group=group)
    if all(n == most for n in counts):
        return gathered
    blocks = gathered.view(len(counts), most, *x.shape[1:])
    return torch.cat([blocks[r, :n] for r, n in enumerate(counts)])


def reduce_scatter_rows(grad: Tensor, counts: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:
    """The sum over ranks of `grad` [sum(counts), ...], this rank's rows only (no autograd)."""
    most = max(counts)
    if all(n == most for n in counts):
        stacked = grad.contiguous()
    else:
        stacked = grad.new_zeros((len(counts), most, *grad.shape[1:]))
        for r, piece in enumerate(torch.split(grad, counts)):
            stacked[r, : counts[r]] = piece
        stacked = stacked.view(len(counts) * most, *grad.shape[1:])
    local = grad.new_empty((most, *grad.shape[1:]))
    _reduce_scatter(local, stacked, op=dist.ReduceOp.SUM, group=group)
    return local[: counts[rank]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.counts, ctx.group = counts, group
        return all_gather_rows(x, counts, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        _, rank = world_and_rank(ctx.group)
        return reduce_scatter_rows(grad, ctx.counts, rank, ctx.group), None, None


def gather_rows(x: Tensor, counts: list[int], group: dist.ProcessGroup) -> Tensor:
    """Concatenate every rank's `x` [counts[rank], ...] along dim 0, in rank order.

    Differentiable: the backward reduce-scatters (SUM) the gradient so each rank receives the total
    gradient of its own rows. Every rank must call it (collectives), forward and backward.
    """
    return _GatherRows.apply(x, counts, group)
