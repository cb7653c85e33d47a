"""Which rows make training batch n: a pure function of (seed, n, subset sizes, weights), so a
checkpoint needs only the step number and batches can be built in any order."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np


class StepSampler:
    """Which (subset, row) pairs make batch `step`: a pure function of (seed, step, sizes, weights).

    Rows come in groups of `homogeneous_size` rows from one subset (1 = fully mixed batches,
    batch_size = one subset per batch). Each group's subset is drawn by weight; within a subset rows
    are consumed along a per-epoch permutation, so every row is used once before any repeats.
    """

    block = 8192  # groups per block of subset draws (batch n needs only its blocks and cumulative counts)

    def __init__(
        self,
        sizes: Mapping[str, int],
        batch_size: int,
        *,
        weights: Mapping[str, float] | Literal["size", "uniform"] | None = None,
        homogeneous_size: int | None = None,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        group = homogeneous_size or 1
        if group < 1 or batch_size % group:
            raise ValueError(f"homogeneous_size must divide batch_size={batch_size}, got {homogeneous_size}")
        if not sizes or any(n < 1 for n in sizes.values()):
            raise ValueError(f"sizes must name subsets with >= 1 row each, got {dict(sizes)}")
        self.names = sorted(sizes)
        self.sizes = np.array([sizes[n] for n in self.names], dtype=np.int64)
        self.batch_size, self.group, self.seed = batch_size, group, int(seed)
        self.probs = self._probabilities(weights)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cum = [np.zeros(len(self.names), dtype=np.int64)]  # counts of each subset before block k
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _probabilities(self, weights: Mapping[str, float] | str | None) -> np.ndarray:
        if weights is None or weights == "size":
            w = self.sizes.astype(np.float64)
        elif weights == "uniform":
            w = np.ones(len(self.names))
        elif isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.names))
            if unknown:
                raise ValueError(f"weights name unknown subsets {unknown}; subsets: {self.names}")
            w = np.array([float(weights.get(n, 0.0)) for n in self.names])
        else:
            raise ValueError(f"weights must be a dict, 'size' or 'uniform', got {weights!r}")
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {dict(zip(self.names, w))}")
        return w / w.sum()

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved step to mean the same batch after a restart."""
        return {
            "seed": self.seed, "batch_size": self.batch_size, "homogeneous_size": self.group,
            "block": self.block, "sizes": dict(zip(self.names, self.sizes.tolist())),
            "probs": [round(float(p), 12) for p in self.probs],
        }  # fmt: skip

    def _block(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Subset of each group in block k, and how many earlier groups of the block share it."""
        if k not in self._blocks:
            rng = np.random.default_rng([self.seed, 1, k])
            assign = rng.choice(len(self.names), size=self.block, p=self.probs)
            occ = np.empty(self.block, dtype=np.int64)
            for s in range(len(self.names)):
                where = np.flatnonzero(assign == s)
                occ[where] = np.arange(len(where))
            self._blocks[k] = (assign, occ)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[k]

    def _counts_before(self, k: int) -> np.ndarray:
        while len(self._cum) <= k:
            assign, _ = self._block(len(self._cum) - 1)
            self._cum.append(self._cum[-1] + np.bincount(assign, minlength=len(self.names)))
        return self._cum[k]

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        """Row order of subset s in one epoch: a fresh seeded permutation per (subset, epoch)."""
        key = (s, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, 2, s, epoch]).permutation(int(self.sizes[s]))
            if len(self._perms) > 2 * len(self.names) + 2:
                self._perms.popitem(last=False)
        return self._perms[key]

    def positions(self, rank: int = 0, world_size: int = 1, spread: bool = False) -> np.ndarray:
        """Positions in the global batch that make this rank's batch: a contiguous slice, or with `spread`
        this rank's 1/world_size share of every group (VLM2Vec V2.0's task-wise batching: a global run of
        homogeneous_size rows from one subset split across the processes, each getting homogeneous_size /
        world_size consecutive rows of it)."""
        if world_size < 1 or not 0 <= rank < world_size or self.batch_size % world_size:
            raise ValueError(f"rank={rank}, world_size={world_size} must split batch_size={self.batch_size}")
        local = self.batch_size // world_size
        if not spread:
            return np.arange(rank * local, (rank + 1) * local)
        if self.group % world_size:
            raise ValueError(f"homogeneous_size={self.group} must split into world_size={world_size} shares")
        share = self.group // world_size
        starts = np.arange(0, self.batch_size, self.group) + rank * share
        return (starts[:, None] + np.arange(share)[None]).reshape(-1)

    def rows(
        self, step: int, rank: int = 0, world_size: int = 1, spread: bool = False
    ) -> list[tuple[str, int]]:
        """(subset, row index) of each example of batch `step`; with world_size > 1, this rank's share of
        the global batch (`positions`)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.positions(rank, world_size, spread)  # checks rank / world_size
        per_batch = self.batch_size // self.group
        blocks, offsets = np.divmod(np.arange(step * per_batch, (step + 1) * per_batch), self.block)
        subset = np.empty(per_batch, dtype=np.int64)
        used = np.empty(per_batch, dtype=np.int64)  # earlier groups of the same subset
        for k in np.unique(blocks).tolist():
            here = blocks == k
            assign, occ = self._block(k)
            subset[here] = assign[offsets[here]]
            used[here] = self._counts_before(k)[subset[here]] + occ[offsets[here]]
        subset = np.repeat(subset, self.group)
        j = np.repeat(used, self.group) * self.group + np.tile(np.arange(self.group), per_batch)
        epoch, within = np.divmod(j, self.sizes[subset])
        row = np.empty_like(j)
        for s, e in np.unique(np.stack([subset, epoch], 1), axis=0).tolist():
            here = (subset == s) & (epoch == e)
            row[here] = self._perm(s, e)[within[here]]
        mine = self.positions(rank, world_size, spread)
        return [(self.names[s], r) for s, r in zip(subset[mine].tolist(), row[mine].tolist())]
