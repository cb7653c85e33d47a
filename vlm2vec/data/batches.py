"""Training batch n with its inputs loaded: `TrainBatches(data, B)[n]` -> `ContrastiveBatch` (query and
candidate texts, images and video frames; hard negatives kept, drawn or sampled per step)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vlm2vec.data.errors import DataError
from vlm2vec.data.rows import TrainExample
from vlm2vec.data.sampler import StepSampler
from vlm2vec.data.train_sets import TrainData
from vlm2vec.media import load_frames, load_image, load_visual


@dataclass
class ContrastiveBatch:
    """Queries and their candidates, laid out [pos_0, neg_0_1..neg_0_K, pos_1, ...]; target i*(K+1).

    `cand_counts[i]`: candidates of query i (1 + its negatives) when a row has fewer than K negatives
    (missing_negatives="mask": the row trains on the ones it has, nothing pads its group); empty means
    K + 1 for every query. Targets index the positive at the start of each group either way.
    Images are PIL images (RGB) or None. `sources` names the file and row of each query's example (for
    error messages); `skipped` lists bad rows replaced while building this batch."""

    query_texts: list[str]
    query_images: list[Image.Image | None]
    cand_texts: list[str]
    cand_images: list[Image.Image | None]
    targets: torch.Tensor
    subsets: list[str]
    num_negatives: int = 0
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    query_videos: list[list[Image.Image] | None] = field(default_factory=list)  # [] = no videos
    cand_videos: list[list[Image.Image] | None] = field(default_factory=list)
    cand_counts: list[int] = field(default_factory=list)

    def group_sizes(self) -> list[int]:
        """Candidates per query (positive first, then its negatives)."""
        return list(self.cand_counts) if self.cand_counts else [self.num_negatives + 1] * len(self)

    def group_starts(self) -> list[int]:
        """Index of each query's positive among the candidates."""
        starts, at = [], 0
        for n in self.group_sizes():
            starts.append(at)
            at += n
        return starts

    def __len__(self) -> int:
        return len(self.query_texts)

    def videos(self, side: str) -> list[list[Image.Image] | None]:
        """Per-row sampled video frames of `side` ("query" / "cand"), None where a row has none."""
        texts, videos = (
            (self.query_texts, self.query_videos) if side == "query" else (self.cand_texts, self.cand_videos)
        )
        return list(videos) if videos else [None] * len(texts)

    def select(self, keep: Sequence[int]) -> ContrastiveBatch:
        """The batch restricted to the queries `keep` (with their candidate groups), targets rebuilt."""
        sizes, starts = self.group_sizes(), self.group_starts()
        cands = [c for i in keep for c in range(starts[i], starts[i] + sizes[i])]
        kept_sizes = [sizes[i] for i in keep]
        return ContrastiveBatch(
            query_texts=[self.query_texts[i] for i in keep],
            query_images=[self.query_images[i] for i in keep],
            cand_texts=[self.cand_texts[c] for c in cands],
            cand_images=[self.cand_images[c] for c in cands],
            targets=torch.tensor([sum(kept_sizes[:j]) for j in range(len(keep))], dtype=torch.long),
            subsets=[self.subsets[i] for i in keep],
            num_negatives=self.num_negatives,
            sources=[self.sources[i] for i in keep] if self.sources else [],
            skipped=list(self.skipped),
            query_videos=[self.query_videos[i] for i in keep] if self.query_videos else [],
            cand_videos=[self.cand_videos[c] for c in cands] if self.cand_videos else [],
            cand_counts=kept_sizes if self.cand_counts else [],
        )


class TrainBatches(torch.utils.data.Dataset):
    """Step-indexed training batches: `batches[n]` is batch n; iterating resumes from `state_dict()`.

    Hard negatives: a row with more than K keeps K drawn by (seed, step, position); a row with fewer
    keeps the ones it has (missing_negatives="mask": its group is shorter, `cand_counts`) or, with
    "sample", gets positives of other rows of its subset (never one equal to its own positive). A row
    whose image cannot be loaded raises DataError naming file and row, or with skip_bad_rows is counted
    and replaced by the next good row of its subset (deterministic).
    spread_groups: each process takes its share of every group of `homogeneous_size` rows instead of a
    contiguous slice of the global batch (`StepSampler.positions`).
    """

    def __init__(
        self,
        data: TrainData,
        batch_size: int,
        *,
        weights: Mapping[str, float] | Literal["size", "uniform"] | None = None,
        homogeneous_size: int | None = None,
        seed: int = 0,
        num_steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        skip_bad_rows: bool = False,
        spread_groups: bool = False,
    ):
        self.data = data
        self.spread = spread_groups
        self.sampler = StepSampler(
            data.sizes(), batch_size, weights=weights, homogeneous_size=homogeneous_size, seed=seed
        )
        self.seed, self.num_steps, self.rank, self.world_size = int(seed), num_steps, rank, world_size
        self.sampler.rows(0, rank, world_size, self.spread)  # validates rank/world_size early
        self.skip_bad_rows = skip_bad_rows
        self.bad_rows = data.bad_rows
        self.step = 0
        self._known_bad = data.known_bad

    @property
    def steps_per_epoch(self) -> int:
        """Batches that together hold about as many rows as the data (informational)."""
        return max(1, len(self.data) // self.sampler.batch_size)

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("TrainBatches has no length: pass num_steps")
        return self.num_steps

    def __iter__(self) -> Iterator[ContrastiveBatch]:
        while self.num_steps is None or self.step < self.num_steps:
            batch = self[self.step]
            self.step += 1  # before yielding: a checkpoint taken now resumes at the next batch
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": self.sampler.fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.sampler.fingerprint()
        if state.get("fingerprint") != mine:
            raise ValueError(f"data state was saved for {state.get('fingerprint')}, this data is {mine}")
        self.step = int(state["step"])

    def __getitem__(self, step: int) -> ContrastiveBatch:
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise IndexError(f"step {step} out of range (num_steps={self.num_steps})")
        k = self.data.num_negatives
        local = self.sampler.batch_size // self.world_size
        batch = ContrastiveBatch([], [], [], [], torch.arange(local, dtype=torch.long) * (k + 1), [], k)
        mine = self.sampler.positions(self.rank, self.world_size, self.spread).tolist()
        rows = self.sampler.rows(step, self.rank, self.world_size, self.spread)
        for global_pos, (subset, idx) in zip(mine, rows):
            ex, q_img, q_vid, cands = self._good_example(subset, idx, step, global_pos, batch.skipped)
            batch.query_texts.append(ex.query_text)
            batch.query_images.append(q_img)
            batch.query_videos.append(q_vid)
            batch.subsets.append(subset)
            batch.sources.append(ex.where)
            batch.cand_counts.append(len(cands))
            for text, img, vid in cands:
                batch.cand_texts.append(text)
                batch.cand_images.append(img)
                batch.cand_videos.append(vid)
        if all(n == k + 1 for n in batch.cand_counts):
            batch.cand_counts = []  # every group full: the fixed layout
        else:
            batch.targets = torch.tensor(batch.group_starts(), dtype=torch.long)
        if not any(v is not None for v in batch.query_videos + batch.cand_videos):
            batch.query_videos, batch.cand_videos = [], []  # image-only batches stay as before
        return batch

    def _good_example(self, subset: str, idx: int, step: int, pos: int, skipped: list[str]) -> tuple:
        rows = self.data.subsets[subset]
        for shift in range(len(rows)):
            j = (idx + shift) % len(rows)
            if (subset, j) in self._known_bad:
                skipped.append(f"{rows[j].where} (known bad)")
                continue
            try:
                return (rows[j], *self._materialize(rows[j], j, step, pos))
            except DataError as err:
                if not self.skip_bad_rows:
                    raise
                self._known_bad.add((subset, j))
                self.bad_rows.add(str(err), "image")
                skipped.append(str(err))
        raise DataError(f"subset {subset!r}: every row failed to load (first: {rows[0].where})")

    def _materialize(self, ex: TrainExample, idx: int, step: int, pos: int) -> tuple:
        root, k = self.data.image_root, self.data.num_negatives
        q_img = load_visual(ex.query_image, root, f"{ex.where} qry_image_path")
        p_img = load_visual(ex.pos_image, root, f"{ex.where} pos_image_path")
        frames = self.data.num_frames
        q_vid = load_frames(ex.query_video, root, frames, f"{ex.where} qry_video_path")
        cands = [(ex.pos_text, p_img, load_frames(ex.pos_video, root, frames, f"{ex.where} pos_video_path"))]
        if k == 0:
            return q_img, q_vid, cands
        rng = np.random.default_rng([self.seed, 3, step, pos])
        negs = list(range(len(ex.neg_texts)))
        if len(negs) > k:
            negs = sorted(rng.choice(len(negs), size=k, replace=False).tolist())
        for n in negs:
            img_path = ex.neg_images[n]
            img = load_image(img_path, root, f"{ex.where} neg_image_path[{n}]") if img_path else None
            cands.append((ex.neg_texts[n], img, None))
        if len(cands) < k + 1 and self.data.missing_negatives == "sample":  # "mask": the group stays short
            cands.extend(self._sampled_negatives(ex, idx, k + 1 - len(cands), rng))
        return q_img, q_vid, cands

    def _sampled_negatives(self, ex: TrainExample, idx: int, need: int, rng: np.random.Generator) -> list:
        rows = self.data.subsets[ex.subset]
        taken = {(ex.pos_text, ex.pos_image, ex.pos_video)}
        out = []
        for _ in range(50 * need + 50):
            if len(out) == need:
                return out
            j = int(rng.integers(len(rows)))
            other = rows[j]
            key = (other.pos_text, other.pos_image, other.pos_video)
            if j == idx or key in taken or (ex.subset, j) in self._known_bad:
                continue
            try:
                root = self.data.image_root
                img = load_visual(other.pos_image, root, f"{other.where} pos_image_path")
                vid = load_frames(
                    other.pos_video, root, self.data.num_frames, f"{other.where} pos_video_path"
                )
            except DataError as err:
                if not self.skip_bad_rows:
                    raise
                self._known_bad.add((ex.subset, j))
                self.bad_rows.add(str(err), "image")
                continue
            taken.add(key)
            out.append((other.pos_text, img, vid))
        if len(out) == need:
            return out
        raise DataError(
            f"{ex.where}: subset {ex.subset!r} has too few distinct positives to sample {need} negatives"
        )
