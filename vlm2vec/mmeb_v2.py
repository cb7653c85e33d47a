"""MMEB-V2 (VLM2Vec-V2): the 78-task table, readers for the published local layouts, tiny local copies.

    image  36  the MMEB (V1) eval sets, each query ranked against its own candidates, Hit@1
    video  18  classification 5, QA 5, retrieval 5, moment retrieval 3, Hit@1
    visdoc 24  ViDoRe v1 10, ViDoRe v2 4, VisRAG 6, out-of-domain 4 (ViDoSeek / MMLongBench), NDCG@5

Every reader turns a task into the same shape, the reference's prepared rows: per query a text, an
optional visual input (image, several images, or a video), the names of its candidates, the
relevant name(s) and optional graded relevance; plus the candidate pool, name -> (text, visual).
`global` tasks rank each query against the whole deduplicated pool, `local` tasks against the row's
own candidates.

Local layout (the published one: TIGER-Lab/MMEB-V2 for media, one folder per annotation dataset as
the hub repos hold it, .parquet or .jsonl, searched recursively; paths are those of the reference's
eval configs)::

    ROOT/image-tasks/<Dataset>.parquet|jsonl + images   MMEB-eval rows (qry_text, qry_img_path, ...)
    ROOT/video-tasks/<Task>/...                          annotations (e.g. MSR-VTT: video_id, video, caption)
    ROOT/video-tasks/frames/<group>/<Task>/<video>/      extracted frames (frame_0001.jpg, ...)
    ROOT/video-tasks/videos/<group>/<Task>/<video>.mp4   raw videos, decoded when frames are missing
    ROOT/visdoc-tasks/<dir>/{queries,corpus,qrels}/      BEIR layout; corpus `image` holds the page

Videos are frame folders where present, else the video file; either is sampled to `num_frames`
(8; per task in the table) uniformly by index when embedded (media.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm2vec.data.errors import DataError
from vlm2vec.data.tables import iter_records
from vlm2vec.media import DEFAULT_NUM_FRAMES, VIDEO_SUFFIXES, frame_files
from vlm2vec.mmeb_tables import MMEB_EVAL_DATASETS

MODALITIES = ("image", "video", "visdoc")
GROUPS: dict[str, tuple[str, ...]] = {
    "image": ("Classification", "VQA", "Retrieval", "Grounding"),
    "video": ("Video-CLS", "Video-QA", "Video-RET", "Video-MRET"),
    "visdoc": ("ViDoRe-V1", "ViDoRe-V2", "VisRAG", "VisDoc-OOD"),
}
VIDEO_TARGET = "<|video_1|> Understand the content of the provided video."
DOC_QUERY = "Find a document image that matches the given query:"
DOC_TARGET = "<|image_1|> Understand the content of the provided document image."
QA_PROMPT = (
    "Given a video and a question, select the most accurate answer from the provided candidates. Return "
    "only the exact text of your chosen answer. Question: "
)


@dataclass(frozen=True)
class V2Task:
    """One MMEB-V2 task. parser: which reader; eval_type: global (whole pool) or local (own candidates);
    metric: hit@1 or ndcg@5; data: annotation folder (image tasks: the image-tasks folder); frame_root /
    video_root: where its videos are; columns: the reader's column names (differ per published set)."""

    name: str
    modality: str
    group: str
    parser: str
    eval_type: Literal["global", "local"]
    metric: Literal["hit@1", "ndcg@5"]
    data: str
    frame_root: str | None = None
    video_root: str | None = None
    num_frames: int = DEFAULT_NUM_FRAMES
    split: str | None = None
    subset: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    instruction: str = ""

    def column(self, key: str) -> str:
        return dict(self.columns)[key]


def _video(name: str, group: str, parser: str, eval_type: str, short: str, sub: str, **kw: Any) -> V2Task:
    return V2Task(
        name,
        "video",
        group,
        parser,
        eval_type,
        "hit@1",
        f"video-tasks/{name}",  # type: ignore[arg-type]
        frame_root=f"video-tasks/frames/{sub}/{short}",
        video_root=f"video-tasks/videos/{sub}/{short}",
        **kw,
    )


def _doc(name: str, group: str, folder: str, **kw: Any) -> V2Task:
    return V2Task(name, "visdoc", group, "beir", "global", "ndcg@5", f"visdoc-tasks/{folder}", **kw)


_CLS = {
    "Kinetics-700": "Recognize the category of the video content.",
    "SmthSmthV2": "What actions or object interactions are being performed by the person in the video?",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video. ",
}
_RET = {  # task: (id column, video column or "", caption column, instruction)
    "MSR-VTT": ("video_id", "video", "caption", "Find a video that contains the following visual content:"),
    "MSVD": ("video_id", "video", "caption", "Find the video snippet that corresponds to the given summary:"),
    "DiDeMo": ("", "video", "caption", "Find a video that includes the following described scenes:"),
    "YouCook2": (
        "id",
        "video_path",
        "sentence",
        "Find a video that demonstrates the following action while making a recipe:",
    ),
    "VATEX": ("videoID", "", "enCap", "Select a video that fits the description provided:"),
}

MMEB_V2_TASKS: tuple[V2Task, ...] = (
    tuple(
        V2Task(d.name, "image", d.meta_task, "image", "local", "hit@1", "image-tasks")
        for d in MMEB_EVAL_DATASETS
    )
    + (
        _video(
            "SmthSmthV2",
            "Video-CLS",
            "video_cls",
            "local",
            "SSv2",
            "video_cls",
            instruction=_CLS["SmthSmthV2"],
        ),
    )
    + tuple(
        _video(n, "Video-CLS", "video_cls", "global", s, "video_cls", instruction=_CLS[n])
        for n, s in (
            ("HMDB51", "HMDB51"),
            ("UCF101", "UCF101"),
            ("Kinetics-700", "K700"),
            ("Breakfast", "Breakfast"),
        )
    )
    + tuple(
        _video(n, "Video-QA", "video_qa", "local", n, "video_qa")
        for n in ("Video-MME", "NExTQA", "EgoSchema", "MVBench", "ActivityNetQA")
    )
    + tuple(
        _video(
            n,
            "Video-RET",
            "video_ret",
            "global",
            n,
            "video_ret",
            columns=(("id", c[0]), ("video", c[1]), ("text", c[2])),
            instruction=c[3],
        )
        for n, c in _RET.items()
    )
    + tuple(
        _video(
            n,
            "Video-MRET",
            "moment",
            "local",
            s,
            "video_mret",
            instruction="Find the clip that corresponds to the described scene in the given video:",
        )
        for n, s in (
            ("QVHighlight", "QVHighlight"),
            ("Charades-STA", "Charades_STA"),
            ("MomentSeeker", "MomentSeeker"),
        )
    )
    + tuple(
        _doc(f"ViDoRe_{n}", "ViDoRe-V1", f)
        for n, f in (
            ("arxivqa", "arxivqa_test_subsampled_beir"),
            ("docvqa", "docvqa_test_subsampled_beir"),
            ("infovqa", "infovqa_test_subsampled_beir"),
            ("tabfquad", "tabfquad_test_subsampled_beir"),
            ("tatdqa", "tatdqa_test_beir"),
            ("shiftproject", "shiftproject_test_beir"),
            ("syntheticDocQA_artificial_intelligence", "syntheticDocQA_artificial_intelligence_test_beir"),
            ("syntheticDocQA_energy", "syntheticDocQA_energy_test_beir"),
            ("syntheticDocQA_government_reports", "syntheticDocQA_government_reports_test_beir"),
            ("syntheticDocQA_healthcare_industry", "syntheticDocQA_healthcare_industry_test_beir"),
        )
    )
    + tuple(
        _doc(f"ViDoRe_{n}", "ViDoRe-V2", n)
        for n in (
            "esg_reports_human_labeled_v2",
            "biomedical_lectures_v2_multilingual",
            "economics_reports_v2_multilingual",
            "esg_reports_v2_multilingual",
        )
    )
    + tuple(
        _doc(f"VisRAG_{n}", "VisRAG", f"VisRAG-Ret-Test-{n}")
        for n in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")
    )
    + tuple(
        _doc(n, "VisDoc-OOD", f)
        for n, f in (
            ("ViDoSeek-page", "ViDoSeek-page"),
            ("ViDoSeek-doc", "ViDoSeek"),
            ("MMLongBench-page", "MMLongBench"),
            ("MMLongBench-doc", "MMLongBench-doc"),
        )
    )
)
# published splits / configs that differ from split "test" and no config (the reference's hub paths)
_SPLITS = {"YouCook2": ("val", None), "MVBench": ("train", None), "MSR-VTT": ("test", "test_1k"),
           "NExTQA": ("test", "MC"), "EgoSchema": ("test", "Subset")}  # fmt: skip
MMEB_V2_TASKS = tuple(
    t if t.parser == "image" else dataclasses.replace(
        t, split=_SPLITS.get(t.name, ("train" if t.group == "VisRAG" else "test", None))[0],
        subset=_SPLITS.get(t.name, (None, None))[1],
    )
    for t in MMEB_V2_TASKS
)  # fmt: skip
TASKS: dict[str, V2Task] = {t.name: t for t in MMEB_V2_TASKS}


def get_task(name: str) -> V2Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown MMEB-V2 task {name!r}; known: {sorted(TASKS)}") from None


# ------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Visual:
    """A row's visual input by reference: one image path, several image paths (kind "images"), or a
    video (kind "video": one frame folder / video file, or its frame files), sampled to num_frames."""

    kind: Literal["image", "images", "video"]
    paths: tuple[str, ...]
    num_frames: int | None = None

    def key(self) -> str:
        return json.dumps([self.kind, self.paths, self.num_frames])

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
    """One task's rows and its candidate pool (name -> (text, visual)), pool in first-seen order."""

    task: V2Task
    rows: list[V2Row]
    pool: dict[str, tuple[str, Visual | None]] = field(default_factory=dict)

    def input_kinds(self) -> set[str]:
        visuals = [r.query_visual for r in self.rows] + [v for _, v in self.pool.values()]
        return {v.input_kind for v in visuals if v is not None}


class _Pool:
    def __init__(self) -> None:
        self.items: dict[str, tuple[str, Visual | None]] = {}

    def add(self, name: str, text: str, visual: Visual | None, where: str) -> str:
        old = self.items.setdefault(name, (text, visual))
        if old != (text, visual):
            raise DataError(f"{where}: candidate {name!r} is defined twice with different content")
        return name


# ---------------------------------------------------------------------------------------- readers
def _records(
    folder: Path, what: str, split: str | None = None, subset: str | None = None
) -> Iterator[tuple[str, dict]]:
    """(where, record) of every annotation file under `folder` (parquet/jsonl/arrow, sorted), only the
    files of config `subset` / of `split` when any file path names them (the hub's
    <config>/<split>-00000-of-00001.parquet)."""
    if not folder.is_dir():
        raise DataError(f"{what}: annotation folder not found: {folder}")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl", ".arrow") and p.is_file()
    )
    if subset is not None:
        files = [p for p in files if subset in p.relative_to(folder).parts] or files
    if split is not None:
        named = [
            p
            for p in files
            if any(
                part == split or part.startswith(f"{split}-")
                for part in [*p.relative_to(folder).parent.parts, p.stem]
            )
        ]
        files = named or files
    if not files:
        raise DataError(f"{what}: no .parquet/.jsonl/.arrow annotation files in {folder}")
    for f in files:
        for where, record, problem in iter_records(f):
            if problem is not None:
                raise DataError(f"{where}: {problem}")
            yield where, record


def _get(record: dict, column: str, where: str) -> Any:
    if column not in record:
        raise DataError(f"{where}: missing column {column!r} (row has {sorted(record)})")
    return record[column]


def video_visual(
    root: Path, task: V2Task, video_id: str, where: str, video_file: str | None = None
) -> Visual:
    """The video `video_id` of a task: its frame folder when it holds frames, else its video file
    (`video_file`, or <video_id>.mp4/.webm/... under the task's video root). DataError naming the row and
    both places otherwise."""
    frames = root / task.frame_root / video_id if task.frame_root else None
    if frames is not None and frames.is_dir() and frame_files(frames):
        return Visual("video", (str(frames),), task.num_frames)
    videos = root / task.video_root if task.video_root else None
    candidates = []
    if videos is not None:
        names = [video_file] if video_file else [f"{video_id}{s}" for s in VIDEO_SUFFIXES]
        candidates = [videos / n for n in names]
        for c in candidates:  # a video file, or a folder of frames where the source ships frames
            if c.is_file() or (c.is_dir() and frame_files(c)):
                return Visual("video", (str(c),), task.num_frames)
    raise DataError(
        f"{where}: video {video_id!r} not found: no frames in {frames} and no video file "
        f"{candidates[0] if candidates else '(no video root)'}"
    )


def _read_video_cls(root: Path, task: V2Task, pool: _Pool) -> list[V2Row]:
    rows = []
    labels_file = root / task.data / "labels.txt"  # the full label set, when the copy ships it
    if task.eval_type == "global" and labels_file.is_file():
        for label in labels_file.read_text(encoding="utf-8").splitlines():
            if label.strip():
                pool.add(label.strip(), label.strip(), None, str(labels_file))
    for where, rec in _records(root / task.data, task.name, task.split, task.subset):
        video_id, label = str(_get(rec, "video_id", where)), str(_get(rec, "pos_text", where))
        names = [label]
        if task.eval_type == "local":
            names = [str(n) for n in _get(rec, "neg_text", where)]  # SSv2: the full candidate list
            if label not in names:
                raise DataError(f"{where}: pos_text {label!r} is not among its candidates neg_text")
        for n in names:
            pool.add(n, n, None, where)
        rows.append(
            V2Row(
                f"<|video_1|> {task.instruction}",
                video_visual(root, task, video_id, where),
                names,
                [label],
                where=where,
            )
        )
    return rows


def _read_video_ret(root: Path, task: V2Task, pool: _Pool) -> list[V2Row]:
    id_col, video_col, text_col = task.column("id"), task.column("video"), task.column("text")
    rows = []
    for where, rec in _records(root / task.data, task.name, task.split, task.subset):
        video_file = os.path.basename(str(_get(rec, video_col, where))) if video_col else None
        video_id = str(_get(rec, id_col, where)) if id_col else Path(video_file or "").stem
        caption = _get(rec, text_col, where)
        caption = caption[0] if isinstance(caption, list | tuple) else str(caption)
        visual = video_visual(root, task, video_id, where, video_file)
        name = pool.add(video_id, VIDEO_TARGET, visual, where)
        rows.append(V2Row(f"{task.instruction} {caption}", None, [name], [name], where=where))
    return rows


def _read_moment(root: Path, task: V2Task, pool: _Pool) -> list[V2Row]:
    """QVHighlight / Charades-STA: `query`, `video_path`; frames/<video>/query/ is the query video, the
    other sub-folders its clips (`positive*` the relevant one)."""
    if task.name == "MomentSeeker":
        return _read_momentseeker(root, task, pool)
    rows = []
    for where, rec in _records(root / task.data, task.name, task.split, task.subset):
        video = Path(str(_get(rec, "video_path", where))).stem
        folder = root / task.frame_root / video
        query_frames = folder / "query"
        if not query_frames.is_dir() or not frame_files(query_frames):
            raise DataError(f"{where}: no query frames in {query_frames}")
        clips = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "query")
        positives = [c for c in clips if c.name.startswith("positive")]
        if not positives:
            raise DataError(f"{where}: no positive* clip folder in {folder}")
        names = [
            pool.add(
                str(c.relative_to(root)), VIDEO_TARGET, Visual("video", (str(c),), task.num_frames), where
            )
            for c in clips
        ]
        text = f"<|video_1|> {task.instruction} {_get(rec, 'query', where)}"
        query = Visual("video", (str(query_frames),), task.num_frames)
        rows.append(V2Row(text, query, names, [str(p.relative_to(root)) for p in positives], where=where))
    return rows


def _read_momentseeker(root: Path, task: V2Task, pool: _Pool) -> list[V2Row]:
    """MomentSeeker: `query`, `input_frames` (a video .mp4, an image .jpg, or empty for a text query),
    `positive_frames` / `negative_frames` (lists of {output_path}); clip frames at
    <frame_root>/video_frames/<output_path with / as _, without .mp4>/, query images at
    <frame_root>/query_<input_frames>."""
    base = root / task.frame_root
    target = "<|video_1|> Understand the content of the provided video clip."

    def clip(path: str, where: str) -> str:
        folder = base / "video_frames" / path.replace("/", "_").split(".mp4")[0]
        if not folder.is_dir() or not frame_files(folder):
            raise DataError(f"{where}: no frames for clip {path!r} in {folder}")
        return pool.add(
            str(folder.relative_to(root)), target, Visual("video", (str(folder),), task.num_frames), where
        )

    rows = []
    for where, rec in _records(root / task.data, task.name, task.split, task.subset):
        query, given = str(_get(rec, "query", where)), str(rec.get("input_frames") or "")
        visual: Visual | None = None
        if given.endswith(".mp4"):
            text = (
                f"<|video_1|> Find the clip that corresponds to the given sentence and video segment: {query}"
            )
            folder = base / "video_frames" / given.split(".mp4")[0].replace("/", "_")
            if not folder.is_dir() or not frame_files(folder):
                raise DataError(f"{where}: no frames for the query video {given!r} in {folder}")
            visual = Visual("video", (str(folder),), task.num_frames)
        elif given.endswith(".jpg"):
            text = f"<|image_1|> Select the video clip that aligns with the given text and image: {query}"
            image = base / f"query_{given}"
            if not image.is_file():
                raise DataError(f"{where}: query image not found: {image}")
            visual = Visual("images", (str(image),))
        else:
            text = f"Find the clip that corresponds to the given text: {query}"
        positives = [clip(e["output_path"], where) for e in _get(rec, "positive_frames", where)]
        negatives = [clip(e["output_path"], where) for e in _get(rec, "negative_frames", where)]
        if not positives:
            raise DataError(f"{where}: no positive clip")
        rows.append(V2Row(text, visual, positives + negatives, positives, where=where))
    return rows


_LETTERS = "ABCDEFGHIJ"
# MVBench: where each subset's videos are under the task's video root (the reference's subset table)
MVBENCH_VIDEOS = {
    "episodic_reasoning": "tvqa/frames_fps3_hq", "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480", "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation", "object_interaction": "star/Charades_v1_480",
    "object_shuffle": "perception/videos", "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video", "scene_transition": "scene_qa/video",
    "action_count": "perception/videos", "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation", "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd", "character_order": "perception/videos", "egocentric_navigation": "vlnqa",
    "counterfactual_inference": "clevrer/video_validation",
}  # fmt: skip


def _lettered(question: str, options: list[str], answer: str, where: str) -> tuple[str, list[str], str]:
    """The reference's multiple-choice template: question + "Options:" + "(A) ..." lines; the
    candidates are the lettered options."""
    if answer not in options:
        raise DataError(f"{where}: answer {answer!r} is not one of the options {options}")
    lettered = [f"({_LETTERS[k]}) {o}" for k, o in enumerate(options)]
    return f"{question}\nOptions:\n" + "\n".join(lettered), lettered, lettered[options.index(answer)]


def _qa_fields(task: V2Task, rec: dict, where: str) -> tuple[str, str, list[str], str, str | None]:
    """(video id, question text, candidate texts, answer text, video file or None) of a video-QA record
    in its published columns, worded as the reference words each task."""
    q = str(_get(rec, "question", where))
    if task.name == "Video-MME":  # options "A. text"; answer a letter; candidates without the letter
        options = [str(o) for o in _get(rec, "options", where)]
        texts = [o[o.find(". ") :].strip(". ") if ". " in o else o for o in options]
        answer = texts[_LETTERS.index(str(_get(rec, "answer", where)).strip())]
        return str(_get(rec, "videoID", where)), q + "\n" + "\n".join(options), texts, answer, None
    if task.name == "ActivityNetQA":
        video = f"v_{_get(rec, 'video_name', where)}"
        return video, f"{q}? (A) yes; (B) no.", ["yes", "no"], str(_get(rec, "answer", where)), None
    if task.name == "NExTQA":
        options = [str(_get(rec, f"a{k}", where)) for k in range(5)]
        video, answer = str(_get(rec, "video", where)), options[int(_get(rec, "answer", where))]
        return (video, *_lettered(q, options, answer, where), None)
    if task.name == "EgoSchema":
        options = [str(o) for o in _get(rec, "option", where)]
        a = _get(rec, "answer", where)
        answer = options[_LETTERS.index(a) if isinstance(a, str) and a in _LETTERS else int(a)]
        return (str(_get(rec, "video_idx", where)), *_lettered(q, options, answer, where), None)
    if task.name == "MVBench":
        subset, video = str(_get(rec, "subset", where)), str(_get(rec, "video", where))
        if subset not in MVBENCH_VIDEOS:
            raise DataError(f"{where}: unknown MVBench subset {subset!r}")
        options = [str(o) for o in _get(rec, "candidates", where)]
        lettered = _lettered(q, options, str(_get(rec, "answer", where)), where)
        return (f"{subset}/{video}", *lettered, f"{MVBENCH_VIDEOS[subset]}/{video}")
    raise DataError(f"{task.name}: no video-QA reader for this task")


def _read_video_qa(root: Path, task: V2Task, pool: _Pool) -> list[V2Row]:
    rows = []
    for where, rec in _records(root / task.data, task.name, task.split, task.subset):
        video_id, question, cands, answer, video_file = _qa_fields(task, rec, where)
        if answer not in cands:
            raise DataError(f"{where}: answer {answer!r} is not one of the candidates {cands}")
        names = [pool.add(c, c, None, where) for c in cands]
        text = f"<|video_1|> {QA_PROMPT} {question}"  # the reference's spacing (its prompt ends in a space)
        visual = video_visual(root, task, video_id, where, video_file)
        rows.append(V2Row(text, visual, names, [answer], where=where))
    return rows


def _page_path(root: Path, task: V2Task, corpus_id: str, image: Any, where: str) -> str:
    """A corpus page as an image file: a path column is used as is; bytes (the hub's Image feature) are
    written once to <data>/pages/<corpus-id>.png (temp file + rename: never half-written)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str):
        p = Path(image) if Path(image).is_absolute() else root / task.data / image
        if not p.is_file():
            raise DataError(f"{where}: page image not found: {p}")
        return str(p)
    if not isinstance(image, bytes | bytearray):
        raise DataError(
            f"{where}: corpus `image` must be bytes, a path or {{bytes, path}}, got {type(image).__name__}"
        )
    target = root / task.data / "pages" / f"{corpus_id.replace('/', '_')}.png"
    if not target.is_file():
        from PIL import Image

        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            img = Image.open(io.BytesIO(image)).convert("RGB")
        except OSError as err:
            raise DataError(
                f"{where}: cannot decode the page image of corpus-id {corpus_id!r}: {err}"
            ) from err
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        img.save(tmp, "PNG")
        tmp.replace(target)
    return str(target)


def _read_beir(root: Path, task: V2Task, pool: _Pool) -> list[V2Row]:
    """BEIR: queries (query-id, query[, language]), corpus (corpus-id, image), qrels (query-id, corpus-id,
    score); every corpus page is a candidate (global), qrels with score > 0 are the labels (graded)."""
    base = root / task.data
    for where, rec in _records(base / "corpus", f"{task.name} corpus", task.split):
        cid = str(_get(rec, "corpus-id", where))
        path = _page_path(root, task, cid, _get(rec, "image", where), where)
        pool.add(cid, DOC_TARGET, Visual("images", (path,)), where)
    qrels: dict[str, dict[str, float]] = {}
    for where, rec in _records(base / "qrels", f"{task.name} qrels", task.split):
        score = float(_get(rec, "score", where))
        cid = str(_get(rec, "corpus-id", where))
        if cid not in pool.items:
            raise DataError(f"{where}: corpus-id {cid!r} is not in the corpus")
        if score > 0:
            q = qrels.setdefault(str(_get(rec, "query-id", where)), {})
            q[cid] = max(q.get(cid, 0.0), score)
    rows = []
    for where, rec in _records(base / "queries", f"{task.name} queries", task.split):
        qid = str(_get(rec, "query-id", where))
        if qid not in qrels:
            continue  # the reference scores only queries with a relevant page
        labels = list(qrels[qid])
        rows.append(
            V2Row(
                f"{DOC_QUERY} {_get(rec, 'query', where)}",
                None,
                labels,
                labels,
                [qrels[qid][c] for c in labels],
                where,
            )
        )
    return rows


def _read_image(root: Path, task: V2Task, pool: _Pool, max_rows: int | None) -> list[V2Row]:
    from vlm2vec.data import load_eval_dataset

    data = root / task.data
    eval_set = load_eval_dataset(data, task.name, max_rows=max_rows, image_root=data)
    rows = []
    for ex in eval_set.examples:
        names = []
        for text, image in zip(ex.cand_texts, ex.cand_images):
            visual = Visual("images", (str(data / image),)) if image else None
            names.append(pool.add(json.dumps([text, image]), text, visual, ex.where))
        q = Visual("images", (str(data / ex.query_image),)) if ex.query_image else None
        rows.append(V2Row(ex.query_text, q, names, [names[0]], where=ex.where))
    return rows


READERS: dict[str, Callable[[Path, V2Task, _Pool], list[V2Row]]] = {
    "video_cls": _read_video_cls,
    "video_ret": _read_video_ret,
    "moment": _read_moment,
    "video_qa": _read_video_qa,
    "beir": _read_beir,
}


def load_task(root: str | os.PathLike, task: str | V2Task, *, max_rows: int | None = None) -> V2Set:
    """Read one MMEB-V2 task from a local copy (layout in the module docstring). max_rows: the first N
    queries (the candidate pool of a global task stays whole)."""
    task = get_task(task) if isinstance(task, str) else task
    root = Path(root).expanduser()
    pool = _Pool()
    if task.parser == "image":
        rows = _read_image(root, task, pool, max_rows)
    else:
        rows = READERS[task.parser](root, task, pool)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{task.name}: no queries in {root / task.data}")
    return V2Set(task, rows, pool.items)


def available_tasks(root: str | os.PathLike, requested: Sequence[str] | None = None) -> list[V2Task]:
    """The requested tasks (unknown names are an error), else every task whose data exists under root."""
    if requested:
        return [get_task(n) for n in requested]
    root = Path(root).expanduser()
    found = []
    for t in MMEB_V2_TASKS:
        if t.parser == "image":
            if (
                any((root / t.data / f"{t.name}{s}").is_file() for s in (".jsonl", ".parquet", ".arrow"))
                or (root / t.data / t.name).is_dir()
            ):
                found.append(t)
        elif (root / t.data).is_dir():
            found.append(t)
    if not found:
        raise FileNotFoundError(
            f"{root}: no MMEB-V2 task data found (image-tasks/, video-tasks/, visdoc-tasks/)"
        )
    return found
