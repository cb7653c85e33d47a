"""MMEB-V2 (VLM2Vec-V2): the 78-task table as the reference evaluates it, and reading a task from disk.

    image  36  the MMEB eval sets, each query ranked against its own candidates, Hit@1
    video  18  classification 5, QA 5, retrieval 5, moment retrieval 3, Hit@1
    visdoc 24  ViDoRe v1 10, ViDoRe v2 4, VisRAG 6, out-of-domain 4 (ViDoSeek / MMLongBench), NDCG@5

Task names, parsers, ranking (global / local), media folders and frame counts are those of the
reference's eval configs (VLM2Vec experiments/public/eval/{image,video,visdoc}.yaml); the data each task
reads is the hub dataset the reference loads (src/constant/dataset_hf_path.py; image tasks:
ziyjiang/MMEB_Test_Instruct), kept locally in a folder named as the hub repo:

    ROOT/image-tasks/MMEB_Test_Instruct/<Task>/...        annotations (hub snapshot, save_to_disk, parquet)
    ROOT/image-tasks/<qry_img_path / tgt_img_path>         images (TIGER-Lab/MMEB-V2 image-tasks)
    ROOT/video-tasks/<repo>/...                            annotations, e.g. video-tasks/Kinetics-700
    ROOT/video-tasks/frames/<group>/<Task>/<video>/        extracted frames (TIGER-Lab/MMEB-V2)
    ROOT/video-tasks/videos/<group>/<Task>/<video>.mp4     raw videos, extracted as the reference does
    ROOT/visdoc-tasks/<repo>/{queries,corpus,qrels}/       BEIR configs, e.g. visdoc-tasks/ViDoSeek-page-fixed

The readers (mmeb_v2_image / _video / _doc) build queries, candidates and instructions as the reference
does; docs/mmeb_v2_parity.md lists, per difference found, what is done and why.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vlm2vec.data.errors import DataError
from vlm2vec.mmeb_tables import MMEB_EVAL_DATASETS
from vlm2vec.mmeb_v2_doc import read_beir
from vlm2vec.mmeb_v2_image import read_image_task
from vlm2vec.mmeb_v2_rows import CandidatePool, V2Row, V2Set, V2Task, Visual
from vlm2vec.mmeb_v2_video import (
    read_moment,
    read_momentseeker,
    read_video_cls,
    read_video_qa,
    read_video_ret,
)

__all__ = [
    "MMEB_V2_TASKS",
    "TASKS",
    "V2Row",
    "V2Set",
    "V2Task",
    "Visual",
    "available_tasks",
    "get_task",
    "load_task",
]

MODALITIES = ("image", "video", "visdoc")
GROUPS: dict[str, tuple[str, ...]] = {
    "image": ("Classification", "VQA", "Retrieval", "Grounding"),
    "video": ("Video-CLS", "Video-QA", "Video-RET", "Video-MRET"),
    "visdoc": ("ViDoRe-V1", "ViDoRe-V2", "VisRAG", "VisDoc-OOD"),
}
# video_classification_utils.py DATASET_INSTRUCTION (keyed by the hub repo name)
_CLS = {
    "K700": ("Kinetics-700", "Recognize the category of the video content."),
    "SmthSmthV2": ("SmthSmthV2",
                   "What actions or object interactions are being performed by the person in the video?"),
    "UCF101": ("UCF101", "What activities or sports are being performed by the person in the video?"),
    "HMDB51": ("HMDB51", "What actions or objects interactions are the person in the video doing?"),
    "Breakfast": ("Breakfast", "Recognize the breakfast type that the person is cooking in the video. "),
}  # fmt: skip
_CLS_DIR = {
    "K700": "K700",
    "SmthSmthV2": "SSv2",
    "UCF101": "UCF101",
    "HMDB51": "HMDB51",
    "Breakfast": "Breakfast",
}
_RET = {  # task: (hub repo, config, split, TASK_INST_QRY)
    "MSR-VTT": ("VLM2Vec/MSR-VTT", "test_1k", "test",
                "Find a video that contains the following visual content:"),
    "MSVD": ("VLM2Vec/MSVD", None, "test", "Find the video snippet that corresponds to the given summary:"),
    "DiDeMo": ("VLM2Vec/DiDeMo", None, "test", "Find a video that includes the following described scenes:"),
    "YouCook2": ("lmms-lab/YouCook2", None, "val",
                 "Find a video that demonstrates the following action while making a recipe:"),
    "VATEX": ("VLM2Vec/VATEX", None, "test", "Select a video that fits the description provided:"),
}  # fmt: skip
_QA = {  # task: (config, split)
    "Video-MME": (None, "test"), "NExTQA": ("MC", "test"), "EgoSchema": ("Subset", "test"),
    "MVBench": (None, "train"), "ActivityNetQA": (None, "test"),
}  # fmt: skip
_MRET = {"QVHighlight": "QVHighlight", "Charades-STA": "Charades_STA", "MomentSeeker": "MomentSeeker"}
_VIDORE_V1 = (
    "arxivqa_test_subsampled_beir", "docvqa_test_subsampled_beir", "infovqa_test_subsampled_beir",
    "tabfquad_test_subsampled_beir", "tatdqa_test_beir", "shiftproject_test_beir",
    "syntheticDocQA_artificial_intelligence_test_beir", "syntheticDocQA_energy_test_beir",
    "syntheticDocQA_government_reports_test_beir", "syntheticDocQA_healthcare_industry_test_beir",
)  # fmt: skip
# task: hub repo (the multilingual ViDoRe-V2 tasks read every language: config None)
_VIDORE_V2 = {
    "ViDoRe_esg_reports_human_labeled_v2": "vidore/esg_reports_human_labeled_v2",
    "ViDoRe_biomedical_lectures_v2_multilingual": "vidore/biomedical_lectures_v2",
    "ViDoRe_economics_reports_v2_multilingual": "vidore/economics_reports_v2",
    "ViDoRe_esg_reports_v2_multilingual": "vidore/esg_reports_v2",
}
_OOD = {  # the *-page-fixed sets: the reference's changelog of 2025-11-03
    "ViDoSeek-page": "VLM2Vec/ViDoSeek-page-fixed", "ViDoSeek-doc": "VLM2Vec/ViDoSeek",
    "MMLongBench-page": "VLM2Vec/MMLongBench-page-fixed", "MMLongBench-doc": "VLM2Vec/MMLongBench-doc",
}  # fmt: skip
# data the reference no longer reads for a task, and what replaced it
SUPERSEDED = {"ViDoSeek-page": "ViDoSeek-page", "MMLongBench-page": "MMLongBench-page"}


def _video(name: str, group: str, parser: str, eval_type: str, hub: str, sub: str, folder: str,
           **kw) -> V2Task:  # fmt: skip
    return V2Task(
        name, "video", group, parser, eval_type, "hit@1", hub, f"video-tasks/{hub.split('/')[1]}",  # type: ignore[arg-type]
        frame_root=f"video-tasks/frames/{sub}/{folder}",
        video_root=f"video-tasks/videos/{sub}/{folder}", **kw,
    )  # fmt: skip


def _doc(name: str, group: str, hub: str, split: str = "test") -> V2Task:
    return V2Task(name, "visdoc", group, "beir", "global", "ndcg@5", hub, f"visdoc-tasks/{hub.split('/')[1]}",
                  split=split)  # fmt: skip


MMEB_V2_TASKS: tuple[V2Task, ...] = (
    tuple(
        V2Task(
            d.name,
            "image",
            d.meta_task,
            "image",
            "local",
            "hit@1",
            "ziyjiang/MMEB_Test_Instruct",
            "image-tasks/MMEB_Test_Instruct",
            config=d.name,
            image_root="image-tasks",
        )  # fmt: skip
        for d in MMEB_EVAL_DATASETS
    )
    + tuple(
        _video(
            n,
            "Video-CLS",
            "video_cls",
            "local" if n == "SmthSmthV2" else "global",
            f"VLM2Vec/{hub}",
            "video_cls",
            _CLS_DIR[n],
            instruction=inst,
            extractor="ffmpeg",
            max_rows=1000 if n == "SmthSmthV2" else None,
        )  # fmt: skip
        for n, (hub, inst) in _CLS.items()
    )
    + tuple(
        _video(
            n,
            "Video-QA",
            "video_qa",
            "local",
            f"VLM2Vec/{n}",
            "video_qa",
            n,
            config=c,
            split=s,
            extractor="cv2",
        )  # fmt: skip
        for n, (c, s) in _QA.items()
    )
    + tuple(
        _video(
            n,
            "Video-RET",
            "video_ret",
            "global",
            hub,
            "video_ret",
            n,
            config=c,
            split=s,
            instruction=inst,
            extractor="ffmpeg",
        )  # fmt: skip
        for n, (hub, c, s, inst) in _RET.items()
    )
    + tuple(
        _video(
            n,
            "Video-MRET",
            "moment",
            "local",
            f"VLM2Vec/{n}",
            "video_mret",
            f,
            num_frames=None if n == "MomentSeeker" else 8,
        )  # fmt: skip
        for n, f in _MRET.items()
    )
    + tuple(_doc(f"ViDoRe_{f.split('_test')[0]}", "ViDoRe-V1", f"vidore/{f}") for f in _VIDORE_V1)
    + tuple(_doc(n, "ViDoRe-V2", hub) for n, hub in _VIDORE_V2.items())
    + tuple(
        _doc(f"VisRAG_{n}", "VisRAG", f"openbmb/VisRAG-Ret-Test-{n}", "train")
        for n in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")
    )
    + tuple(_doc(n, "VisDoc-OOD", hub) for n, hub in _OOD.items())
)
TASKS: dict[str, V2Task] = {t.name: t for t in MMEB_V2_TASKS}


def get_task(name: str) -> V2Task:
    try:
        return TASKS[name]
    except KeyError:
        hint = " (the reference names it K700)" if name == "Kinetics-700" else ""
        raise ValueError(f"unknown MMEB-V2 task {name!r}{hint}; known: {sorted(TASKS)}") from None


READERS: dict[str, Callable[[Path, V2Task, CandidatePool], list[V2Row]]] = {
    "image": read_image_task,
    "video_cls": read_video_cls,
    "video_ret": read_video_ret,
    "video_qa": read_video_qa,
    "moment": read_moment,
    "beir": read_beir,
}


def load_task(root: str | os.PathLike, task: str | V2Task, *, max_rows: int | None = None) -> V2Set:
    """Read one MMEB-V2 task from a local copy (layout in the module docstring). max_rows: the first N
    queries (the candidate pool of a global task stays whole)."""
    task = get_task(task) if isinstance(task, str) else task
    root = Path(root).expanduser()
    old = SUPERSEDED.get(task.name)
    if old is not None and not (root / task.data).is_dir() and (root / "visdoc-tasks" / old).is_dir():
        raise DataError(
            f"{task.name}: found {root / 'visdoc-tasks' / old}, the data before the reference's fix of "
            f"2025-11-03; the reference reads {task.hub} (expected at {root / task.data})"
        )
    pool = CandidatePool()
    reader = read_momentseeker if task.name == "MomentSeeker" else READERS[task.parser]
    rows = reader(root, task, pool)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{task.name}: no queries in {root / task.data}")
    return V2Set(task, rows, pool.items, pool.collisions)


def task_present(root: Path, task: V2Task) -> bool:
    """Whether the task's data folder (image tasks: its config inside MMEB_Test_Instruct) exists."""
    if task.parser == "image":
        folder = root / task.data
        return (folder / task.name).is_dir() or any(
            (folder / f"{task.name}{s}").is_file() for s in (".parquet", ".jsonl", ".arrow")
        )
    return (root / task.data).is_dir() or (
        task.name in SUPERSEDED and (root / "visdoc-tasks" / SUPERSEDED[task.name]).is_dir()
    )


def available_tasks(root: str | os.PathLike, requested: Sequence[str] | None = None) -> list[V2Task]:
    """The requested tasks (unknown names are an error; a requested task without data fails when read),
    else every task whose data folder exists under root (missing_tasks lists the others)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"MMEB-V2 data folder not found: {root}")
    if requested:
        return [get_task(n) for n in requested]
    found = [t for t in MMEB_V2_TASKS if task_present(root, t)]
    if not found:
        raise DataError(
            f"{root}: no MMEB-V2 task data found (expected image-tasks/MMEB_Test_Instruct/<Task>/, "
            "video-tasks/<repo>/ or visdoc-tasks/<repo>/; see vlm2vec/mmeb_v2.py)"
        )
    return found


def missing_tasks(root: str | os.PathLike) -> list[str]:
    """Tasks of the 78 without a data folder under root (reported beside the scores, never silently)."""
    return [t.name for t in MMEB_V2_TASKS if not task_present(Path(root).expanduser(), t)]
