"""Which negatives each training row gets, given embeddings: the pure part of hard-negative mining
(vlm2vec/mine.py embeds and writes; vlm2vec/mine_topk.py ranks).

Per row, in this order:
1. the pool: the distinct positives (text, image, video) of its subset, or of every subset;
2. never its own positive, any other positive of the same query (a query repeated with several
   positives, e.g. one image with five captions), or a candidate that is the query itself;
3. the false-negative filters, both relative to the row's positive score p: `max_score_ratio` r drops
   candidates scoring above r * p (NV-Retriever's positive-aware mining), `margin` m drops those above
   p - m (sentence-transformers' margin); a filter set to None is off;
4. the rank window [lo, hi) over the candidates that survive 1-3, best first (equal scores: lower pool
   index first), from which K are taken: the first K ("top") or K drawn without replacement by
   (seed, subset, row) ("random"), kept in rank order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vlm2vec.mine_topk import block_topk

ItemKey = tuple[str, object, object]  # (text, image path or tuple of paths or None, video or None)

FILTERS = ("max_score_ratio", "margin")


@dataclass(frozen=True)
class MineSettings:
    num_negatives: int
    rank_range: tuple[int, int] = (0, 100)
    max_score_ratio: float | None = 0.95
    margin: float | None = 0.0
    sampling: str = "top"
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.rank_range
        if self.num_negatives < 1:
            raise ValueError(f"--num_negatives must be >= 1, got {self.num_negatives}")
        if not 0 <= lo < hi:
            raise ValueError(f"--rank_range {lo}:{hi}: need 0 <= lo < hi")
        if hi - lo < self.num_negatives:
            raise ValueError(
                f"--rank_range {lo}:{hi} holds {hi - lo} ranks, "
                f"fewer than --num_negatives {self.num_negatives}"
            )
        if self.sampling not in ("top", "random"):
            raise ValueError(f"--sampling must be top or random, got {self.sampling!r}")


@dataclass
class Mined:
    """One pool's result: per row the chosen pool indices (rank order) and their scores, the row's
    positive score, and how many candidates each step removed (summed over rows)."""

    negatives: list[list[int]]
    neg_scores: list[list[float]]
    pos_scores: list[float]
    removed: dict[str, int] = field(default_factory=dict)
    window_short: int = 0  # rows whose window held fewer than K survivors


def exclusions(query_keys: Sequence[ItemKey], pos_index: Sequence[int], pool_index: dict) -> list[list[int]]:
    """Per row, the pool indices it never gets: every positive of its query (over all rows with the
    same query) and the query itself when it is also a candidate."""
    by_query: dict[ItemKey, set[int]] = {}
    for key, pos in zip(query_keys, pos_index):
        by_query.setdefault(key, set()).add(pos)
    out = []
    for key in query_keys:
        drop = set(by_query[key])
        if key in pool_index:
            drop.add(pool_index[key])
        out.append(sorted(drop))
    return out


def mine_pool(
    query_emb: torch.Tensor,
    pos_index: Sequence[int],
    pool_emb: torch.Tensor,
    exclude: Sequence[Sequence[int]],
    settings: MineSettings,
    *,
    row_ids: Sequence[tuple[int, int]] | None = None,
    query_block: int = 1024,
    pool_block: int = 65536,
    progress: object | None = None,
) -> Mined:
    """Negatives for each row (query_emb[i] with positive pool_emb[pos_index[i]]) from pool_emb.

    row_ids[i]: (subset number, row number), what the random sampling of row i is seeded with (with
    the seed), so the draw does not depend on which rows are mined together. progress: a tqdm-like
    object updated with the rows done."""
    n = query_emb.shape[0]
    lo, hi = settings.rank_range
    pos = torch.as_tensor(list(pos_index), dtype=torch.long)
    pos_scores = (query_emb.float() * pool_emb.float()[pos]).sum(1) if n else torch.zeros(0)
    ceilings, names = [], []
    if settings.max_score_ratio is not None:
        ceilings.append(settings.max_score_ratio * pos_scores)
        names.append("max_score_ratio")
    if settings.margin is not None:
        ceilings.append(pos_scores - settings.margin)
        names.append("margin")
    removed = {"own_positive_or_same_item": sum(len(e) for e in exclude), **{f: 0 for f in FILTERS}}
    out = Mined([], [], pos_scores.tolist(), removed)
    step = max(1, query_block)
    for start in range(0, n, step):
        stop = min(start + step, n)
        top = block_topk(
            query_emb[start:stop], pool_emb, hi, exclude=exclude[start:stop],
            ceilings=[c[start:stop] for c in ceilings], query_block=query_block, pool_block=pool_block,
        )  # fmt: skip
        for name, count in zip(names, top.removed):
            removed[name] += int(count.sum())
        for r in range(stop - start):
            row = start + r
            found = int(top.found[r])
            window = list(range(lo, min(hi, found)))
            if len(window) < settings.num_negatives:
                out.window_short += 1
                chosen = window
            elif settings.sampling == "top":
                chosen = window[: settings.num_negatives]
            else:
                sub, idx = row_ids[row] if row_ids is not None else (0, row)
                rng = np.random.default_rng([settings.seed, sub, idx])
                chosen = sorted(rng.choice(window, size=settings.num_negatives, replace=False).tolist())
            out.negatives.append([int(top.indices[r, j]) for j in chosen])
            out.neg_scores.append([float(top.scores[r, j]) for j in chosen])
        if progress is not None:
            progress.update(stop - start)
    return out
