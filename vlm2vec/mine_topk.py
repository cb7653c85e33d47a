"""Block-wise top-k of a candidate pool per query, with candidates excluded or capped per query: the
ranking step of hard-negative mining (vlm2vec/mine.py), a pure function of its tensors.

Why blocks: a queries x pool score matrix of 1M x 1M does not fit anywhere; scoring `query_block`
queries against `pool_block` candidates at a time and merging each block's top-k into a running top-k
needs (query_block x pool_block) scores plus (query_block x k) kept, a few hundred MB at the defaults
whatever the pool size.

Determinism: every score is packed with its pool index into one int64 key (order-preserving float bits
in the high 32 bits, the complement of the index in the low 32), so keys are distinct and `topk` on them
orders by score, then lower index first, exactly as a full stable sort would, on any device and for any
blocking. Equal scores -> lower pool index first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_LOW = (1 << 32) - 1
_DROPPED = torch.iinfo(torch.int64).min  # the key of an excluded / capped candidate: never selected


@dataclass
class TopK:
    """Per query the `k` best surviving candidates, best first: `indices` (-1 where fewer than k
    survive), `scores` (NaN there); `removed[f][q]`: candidates of query q dropped by ceiling f (counted
    for the first ceiling that drops them; excluded indices are never counted)."""

    indices: torch.Tensor  # [Q, k] long
    scores: torch.Tensor  # [Q, k] float32
    removed: list[torch.Tensor]  # per ceiling, [Q] long

    @property
    def found(self) -> torch.Tensor:
        """[Q] how many of the k slots hold a candidate."""
        return (self.indices >= 0).sum(1)


def score_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (score descending, index ascending) as plain integers descending."""
    s = scores.float() + 0.0  # -0.0 -> +0.0: equal scores get equal high bits
    bits = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float's value
    return ordered * (1 << 32) + (_LOW - index.to(torch.int64))


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of keys made by `score_keys`: the exact float32 scores that were ranked."""
    ordered = keys >> 32
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32), _LOW - (keys & _LOW)


def block_topk(
    queries: torch.Tensor,
    pool: torch.Tensor,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    ceilings: Sequence[torch.Tensor] = (),
    query_block: int = 1024,
    pool_block: int = 65536,
) -> TopK:
    """Top-k pool rows by dot product for each query, block by block (never a Q x N matrix).

    exclude[q]: pool indices query q never gets (its own positive, the same item).
    ceilings: [Q] score limits; a candidate scoring above ceiling f for its query is dropped and
      counted in `removed[f]` (the first ceiling that drops it), e.g. ratio x the positive's score.
    """
    if queries.ndim != 2 or pool.ndim != 2 or queries.shape[1] != pool.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and pool {tuple(pool.shape)} must be [*, D] alike")
    if k < 0 or query_block < 1 or pool_block < 1:
        raise ValueError(f"k >= 0 and positive block sizes required, got {k}, {query_block}, {pool_block}")
    if pool.shape[0] >= _LOW:
        raise ValueError(f"pool of {pool.shape[0]} rows: at most {_LOW - 1}")
    n_q, n_pool = queries.shape[0], pool.shape[0]
    k_eff = min(k, n_pool)
    if exclude is not None and len(exclude) != n_q:
        raise ValueError(f"exclude has {len(exclude)} entries for {n_q} queries")
    for f, c in enumerate(ceilings):
        if c.shape != (n_q,):
            raise ValueError(f"ceiling {f} has shape {tuple(c.shape)}, expected ({n_q},)")
    device = queries.device
    keys_out = torch.full((n_q, k_eff), _DROPPED, dtype=torch.int64, device=device)
    removed = [torch.zeros(n_q, dtype=torch.long, device=device) for _ in ceilings]
    pool_f = pool.float()
    for q0 in range(0, n_q, query_block):
        q1 = min(q0 + query_block, n_q)
        qs = queries[q0:q1].float()
        best = torch.full((q1 - q0, 0), _DROPPED, dtype=torch.int64, device=device)
        caps = [c[q0:q1].float().to(device).unsqueeze(1) for c in ceilings]
        excl = _exclusions(exclude, q0, q1, device)
        for p0 in range(0, n_pool, pool_block):
            p1 = min(p0 + pool_block, n_pool)
            s = qs @ pool_f[p0:p1].T
            index = torch.arange(p0, p1, device=device)
            keep = torch.ones_like(s, dtype=torch.bool)
            if excl is not None:
                rows, cols = excl
                inside = (cols >= p0) & (cols < p1)
                keep[rows[inside], cols[inside] - p0] = False
            for f, cap in enumerate(caps):
                over = keep & (s > cap)
                removed[f][q0:q1] += over.sum(1)
                keep &= ~over
            keys = torch.where(keep, score_keys(s, index.expand_as(s)), _DROPPED)
            merged = torch.cat([best, keys], dim=1)
            best = merged.topk(min(k_eff, merged.shape[1]), dim=1).values
        keys_out[q0:q1, : best.shape[1]] = best
    dropped = keys_out == _DROPPED
    scores, indices = decode_keys(torch.where(dropped, 0, keys_out))
    return TopK(torch.where(dropped, -1, indices), torch.where(dropped, float("nan"), scores), removed)


def _exclusions(
    exclude: Sequence[Sequence[int]] | None, q0: int, q1: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row in block, pool index) pairs of the excluded candidates of queries q0..q1-1."""
    if exclude is None:
        return None
    rows = [r for r in range(q1 - q0) for _ in exclude[q0 + r]]
    cols = [int(c) for r in range(q0, q1) for c in exclude[r]]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(
        cols, dtype=torch.long, device=device
    )
