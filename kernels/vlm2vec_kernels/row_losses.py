"""The per-row loss of one logit chunk and its gradient, for the positive modes of `candidate_ids`.

Notation (one chunk of rows i, all columns j): l_ij the logits (similarity / tau), t_i the target
column, P_i the columns that are the same item as t_i (t_i included; {t_i} without ids), and the
denominator's negatives Neg_i = {j not in P_i} minus the false negatives the margin drops
(l_ij > l_it + margin / tau, no gradient through that choice):

    "mask": L_i = -l_it + log sum_{j in Neg_i or j = t_i} exp(l_ij)
    "any":  L_i = -log sum_{p in P_i} exp(l_ip) + log sum_{j in Neg_i or P_i} exp(l_ij)
    "each": L_i = mean_{p in P_i} [ -l_ip + log(exp(l_ip) + sum_{j in Neg_i} exp(l_ij)) ]

Without ids and margin "mask" is plain InfoNCE. `row_loss_grad` returns L [R] and E = dL_i/dl_ij
[R, N] (in place of nothing: the chunk `l` is left as it is). O(R*N) elementwise work, no GEMM.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MODES = ("mask", "any", "each")


def _lse(l: Tensor, keep: Tensor) -> Tensor:
    """log sum_{j in keep_i} exp(l_ij) [R] (-Inf for an empty set; NaN entries that are kept stay)."""
    return torch.logsumexp(l.masked_fill(~keep, -math.inf), dim=1)


def _softmax(l: Tensor, keep: Tensor, lse: Tensor) -> Tensor:
    """exp(l_ij - lse_i) on keep, 0 elsewhere."""
    return torch.where(keep, (l - lse[:, None]).exp(), 0.0)


def row_loss_grad(
    l: Tensor,
    target: Tensor,
    same: Tensor | None,
    mode: str,
    margin: float | Tensor | None,
    want_grad: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(L [R], E [R, N] or None) for logits l [R, N], target [R] columns, same [R, N] (the P_i mask, or
    None for {t_i}); margin in logit units (margin / tau) or None. `out`: a buffer for E (plain
    InfoNCE only; the masked modes allocate theirs)."""
    if same is None and margin is None:  # plain InfoNCE (every mode is): one fused softmax, no masks
        return _plain(l, target, want_grad, out)
    onehot = torch.zeros_like(l, dtype=torch.bool).scatter_(1, target[:, None], True)
    positives = onehot if same is None else same | onehot
    l_t = l.gather(1, target[:, None])
    negatives = ~positives
    if margin is not None:
        negatives &= ~(l > l_t + margin)
    if mode == "mask":
        keep = negatives | onehot
        lse = _lse(l, keep)
        loss = lse - l_t[:, 0]
        grad = _softmax(l, keep, lse).sub_(onehot.to(l.dtype)) if want_grad else None
        return loss, grad
    if mode == "any":
        keep = negatives | positives
        lse, lse_pos = _lse(l, keep), _lse(l, positives)
        loss = lse - lse_pos
        grad = _softmax(l, keep, lse).sub_(_softmax(l, positives, lse_pos)) if want_grad else None
        return loss, grad
    if mode == "each":
        count = positives.sum(1).to(l.dtype)
        lse_neg = _lse(l, negatives)  # -Inf where every negative is masked: then each term is 0
        x = lse_neg[:, None] - l  # log(sum_neg exp) - l_ip on the positives
        terms = torch.where(positives, torch.logaddexp(x, torch.zeros_like(x)), 0.0)
        loss = terms.sum(1) / count
        if not want_grad:
            return loss, None
        u = torch.where(positives, torch.sigmoid(x), 0.0).div_(count[:, None])
        grad = _softmax(l, negatives, lse_neg).mul_(u.sum(1, keepdim=True)).sub_(u)
        return loss, grad
    raise ValueError(f"positives must be one of {', '.join(map(repr, MODES))}, got {mode!r}")


def _plain(l: Tensor, target: Tensor, want_grad: bool, out: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """L_i = logsumexp_j l_ij - l_it and E = softmax(l) - Y. The lse comes from two row maxima, as in
    torch_engine.xent: the softmax's largest entry is 1 / sum_j exp(l_ij - max_j l_ij)."""
    l_t = l.gather(1, target[:, None])[:, 0]
    row_max = l.amax(1)
    probs = torch.softmax(l, 1) if out is None else torch.softmax(l, 1, out=out)
    # (max - l_t) first: exact when the positive is (near) the largest logit, and the small -log pmax is
    # added to it; max - log pmax first would round a small loss to the ulp of the logits (|l| ~ 1/tau)
    loss = row_max.sub_(l_t).sub_(probs.amax(1).log_())
    if not want_grad:
        return loss, None
    # E_it = -sum_{j != t} p_ij rather than p_it - 1: p_it ~ 1 rounds at 6e-8, which times l_it ~ 1/tau
    # swamps a small <E, l> (dL/dtau and the normalisations read it); the sum keeps p's relative error
    column = target[:, None]
    off_target = probs.scatter_(1, column, 0.0).sum(1, keepdim=True)
    return loss, probs.scatter_(1, column, off_target.neg_())
