"""The shapes every MMEB-V2 reader produces: a task's description (V2Task), its visual inputs by
reference (Visual), its prepared rows (V2Row) and candidate pool (V2Set, CandidatePool).

These mirror the reference's prepared datasets (VLM2Vec src/data/eval_dataset/base_eval_dataset.py):
per query a text, an optional visual input, the names of its candidates and the relevant name(s) with
optional graded relevance; the candidate pool maps a name to (text, visual). The pool is built as the
reference's `generate_cand_dataset` builds it: the rows' candidates in first-seen order, then the extra
corpus; a name seen again keeps its first content (the reference embeds each name once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from vlm2vec.media import DEFAULT_NUM_FRAMES


@dataclass(frozen=True)
class V2Task:
    """One MMEB-V2 task, named as the reference's eval yaml (experiments/public/eval/*.yaml).

    parser: which reader; eval_type: global (rank against the whole pool) or local (the row's own
    candidates); metric: hit@1 or ndcg@5; hub: the dataset the reference loads
    (src/constant/dataset_hf_path.py, or ziyjiang/MMEB_Test_Instruct for image tasks); data: its local
    folder (<modality>-tasks/<hub repo name>); config / split: what the reference passes to
    load_dataset; frame_root / video_root / image_root: the yaml's media folders; num_frames: frames
    sampled per video (None: all, MomentSeeker); max_rows: the yaml's num_sample_per_subset (first N
    rows); extractor: how the reference extracts frames from a video file ("ffmpeg" / "cv2")."""

    name: str
    modality: str
    group: str
    parser: str
    eval_type: Literal["global", "local"]
    metric: Literal["hit@1", "ndcg@5"]
    hub: str
    data: str
    config: str | None = None
    split: str = "test"
    frame_root: str | None = None
    video_root: str | None = None
    image_root: str | None = None
    num_frames: int | None = DEFAULT_NUM_FRAMES
    max_rows: int | None = None
    extractor: str | None = None
    instruction: str = ""


@dataclass(frozen=True)
class Visual:
    """A row's visual input by reference: one image path, several image paths (kind "images"), or a
    video (kind "video": a frame folder or a video file), sampled to num_frames (None: every frame);
    extractor: a video file is first reduced to the reference's extracted frames (media.extract_frames)."""

    kind: Literal["image", "images", "video"]
    paths: tuple[str, ...]
    num_frames: int | None = None
    extractor: str | None = None

    def key(self) -> str:
        return json.dumps([self.kind, self.paths, self.num_frames, self.extractor])

    @property
    def input_kind(self) -> str:
        """The encoder's input kind (backbones.INPUT_KINDS)."""
        if self.kind == "images":
            return "multi_image" if len(self.paths) > 1 else "image"
        return self.kind


@dataclass
class V2Row:
    query_text: str
    query_visual: Visual | None
    cand_names: list[str]
    labels: list[str]
    rel_scores: list[float] | None = None
    where: str = ""


@dataclass
class V2Set:
    """One task's rows and its candidate pool (name -> (text, visual)) in the reference's order.
    name_collisions: names given again with other content (the first content is kept, as the
    reference keeps the first embedding per name)."""

    task: V2Task
    rows: list[V2Row]
    pool: dict[str, tuple[str, Visual | None]] = field(default_factory=dict)
    name_collisions: int = 0

    def input_kinds(self) -> set[str]:
        visuals = [r.query_visual for r in self.rows] + [v for _, v in self.pool.values()]
        return {v.input_kind for v in visuals if v is not None}


class CandidatePool:
    """The candidate pool in first-seen order; a name keeps its first content."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str, Visual | None]] = {}
        self.collisions = 0

    def add(self, name: str, text: str, visual: Visual | None) -> str:
        old = self.items.setdefault(name, (text, visual))
        self.collisions += old != (text, visual)
        return name
