"""The float64 reference of the contrastive loss, written straight from the formula.

It holds the whole Bq x Bc logit matrix, so it is for tests and benchmarks only: every engine is
checked against it on the same (already rounded) inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
    candidate_ids: Tensor | None = None,
    positives: str = "mask",
    false_negative_margin: float | None = None,
) -> Tensor:
    """InfoNCE in float64: loss_i = logsumexp_j(s_ij) - s_i,t(i), s = q c^T / temperature.

    `targets` [Bq] holds the index of each query's positive in `candidates`. The symmetric direction
    scores each positive `candidates[targets[i]]` against all queries, with query i as its target.
    The v3 options (see `contrastive_loss`): sum_k w_k * the loss on the prefixes [:, :d_k] (each
    re-normalised); with `candidate_ids` the positives P_i of row i are the candidates sharing the id
    of its target (in the reverse direction: the queries whose targets share it), used as `positives`
    says; `false_negative_margin` drops j outside P_i with sim_ij > sim_it + margin. Written row by
    row with index lists, straight from the definitions.
    Returns a float64 scalar (mean/sum) or [Bq] vector (none); gradients flow to the inputs.
    """
    q = query.double()
    c = candidates.double()
    tau = temperature.double() if isinstance(temperature, Tensor) else float(temperature)
    dims = list(matryoshka_dims) if matryoshka_dims is not None else [q.shape[1]]
    weights = list(matryoshka_weights) if matryoshka_weights is not None else [1.0] * len(dims)
    targets = targets.cpu().tolist()
    ids = None if candidate_ids is None else candidate_ids.cpu().tolist()
    total = 0.0
    for d, w in zip(dims, weights):
        qd, cd = q[:, :d], c[:, :d]
        if normalize:
            qd = F.normalize(qd, dim=1)
            cd = F.normalize(cd, dim=1)
        sim = qd @ cd.T
        query_ids = None if ids is None else [ids[t] for t in targets]
        losses = _rows(sim / tau, sim.detach(), targets, query_ids, ids, positives, false_negative_margin)
        if symmetric:
            rows = list(range(q.shape[0]))
            reverse = sim[:, targets].T  # positive i against every query k
            reverse_losses = _rows(
                reverse / tau, reverse.detach(), rows, query_ids, query_ids, positives, false_negative_margin
            )
            losses = 0.5 * (losses + reverse_losses)
        total = total + w * losses
    losses = total
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _rows(logits, sim, targets, row_ids, col_ids, mode, margin) -> Tensor:
    """Per-row losses of a logit matrix, one row at a time."""
    out = []
    for i, t in enumerate(targets):
        l = logits[i]
        n = l.shape[0]
        if row_ids is None:
            pos = [t]
        else:
            pos = [j for j in range(n) if col_ids[j] == row_ids[i]]
        neg = [j for j in range(n) if j not in pos]
        if margin is not None:
            neg = [j for j in neg if not sim[i, j] > sim[i, t] + margin]
        if mode == "mask":
            out.append(torch.logsumexp(l[neg + [t]], 0) - l[t])
        elif mode == "any":
            out.append(torch.logsumexp(l[neg + pos], 0) - torch.logsumexp(l[pos], 0))
        elif mode == "each":
            terms = [torch.logsumexp(l[[p] + neg], 0) - l[p] for p in pos]
            out.append(torch.stack(terms).mean())
        else:
            raise ValueError(mode)
    return torch.stack(out)
