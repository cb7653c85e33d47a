"""The float64 reference of the contrastive loss, written straight from the formula.

It holds the whole Bq x Bc logit matrix, so it is for tests and benchmarks only: every engine is
checked against it on the same (already rounded) inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_contrastive_loss(
    query: Tensor,
    candidates: Tensor,
    temperature: float | Tensor,
    *,
    normalize: bool,
    targets: Tensor,
    symmetric: bool,
    reduction: str,
) -> Tensor:
    """InfoNCE in float64: loss_i = logsumexp_j(s_ij) - s_i,t(i), s = q c^T / temperature.

    `targets` [Bq] holds the index of each query's positive in `candidates`. The symmetric direction
    scores each positive `candidates[targets[i]]` against all queries, with query i as its target.
    Returns a float64 scalar (mean/sum) or [Bq] vector (none); gradients flow to the inputs.
    """
    q = query.double()
    c = candidates.double()
    tau = temperature.double() if isinstance(temperature, Tensor) else float(temperature)
    if normalize:
        q = F.normalize(q, dim=1)
        c = F.normalize(c, dim=1)
    rows = torch.arange(q.shape[0], device=q.device)
    logits = q @ c.T / tau
    losses = torch.logsumexp(logits, dim=1) - logits[rows, targets]
    if symmetric:
        reverse = c[targets] @ q.T / tau
        reverse_losses = torch.logsumexp(reverse, dim=1) - reverse[rows, rows]
        losses = 0.5 * (losses + reverse_losses)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
