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
import torch.nn.functional as F
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
        return plain_loss_grad(l, target, want_grad, out)
    onehot = torch.zeros_like(l, dtype=torch.bool).scatter_(1, target[:, None], True)
    positives = onehot if same is None else same | onehot
    l_t = l.gather(1, target[:, None])
    negatives = ~positives
    if margin is not None:
        negatives &= ~(l > l_t + margin)
    if mode not in MODES:
        raise ValueError(f"positives must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    # Every mode as softplus / sigmoid of x = lse_neg - lse_pos: L = log(1 + exp(x)) and the positives'
    # share of E is -sigmoid(x), never p - 1 (p ~ 1 rounds at 6e-8, the whole gradient of a confident
    # row), and the loss never lse - l_t (two numbers ~1/tau whose difference is small)
    lse_neg = _lse(l, negatives)  # -Inf where every negative is masked: then the loss and E are 0
    if mode == "each":
        count = positives.sum(1).to(l.dtype)
        x = lse_neg[:, None] - l  # one term per positive p: lse_neg - l_ip
        loss = torch.where(positives, F.softplus(x), 0.0).sum(1) / count
        if not want_grad:
            return loss, None
        u = torch.where(positives, torch.sigmoid(x), 0.0).div_(count[:, None])
        return loss, _softmax(l, negatives, lse_neg).mul_(u.sum(1, keepdim=True)).sub_(u)
    pos = onehot if mode == "mask" else positives  # "mask": the other members of P_i are simply gone
    lse_pos = l_t[:, 0] if mode == "mask" else _lse(l, pos)
    x = lse_neg - lse_pos
    loss = F.softplus(x)
    if not want_grad:
        return loss, None
    neg_share = torch.sigmoid(x)[:, None]  # sum_{j in Neg_i} p_ij = 1 - sum_{P} p, without the 1
    grad = _softmax(l, negatives, lse_neg).mul_(neg_share)
    return loss, grad.sub_(_softmax(l, pos, lse_pos).mul_(neg_share))


def plain_loss_grad(
    l: Tensor, target: Tensor, want_grad: bool, out: Tensor | None
) -> tuple[Tensor, Tensor | None]:
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
