"""MMEB-V2 video tasks (18) as the reference reads them (VLM2Vec src/data/eval_dataset/*_dataset.py):
classification (video_classification_datasets.py, ssv2_dataset.py), retrieval (msrvtt, msvd, didemo,
youcook2, vatex), QA (videomme, nextqa, egoschema, mvbench, activitynetqa) and moment retrieval
(moment_retrieval_datasets.py, momentseeker_dataset.py).

A video is its frame folder (frame_root/<id>) when that holds frames, as the reference uses frames it
extracted earlier; otherwise its video file under video_root, reduced to the reference's 64 extracted
frames (ffmpeg indices for classification / retrieval, cv2 indices for QA; media.extract_frames) and
then sampled to 8. `<|video_1|>` stands for the backbone's video token, `<|image_1|>` for its image token.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlm2vec.data.errors import DataError
from vlm2vec.media import IMAGE_SUFFIXES, frame_files
from vlm2vec.mmeb_tables import IMAGE_PLACEHOLDER as IMG
from vlm2vec.mmeb_v2_files import get, task_records
from vlm2vec.mmeb_v2_labels import VIDEO_CLS_LABELS
from vlm2vec.mmeb_v2_rows import CandidatePool, V2Row, V2Task, Visual

VID = "<|video_1|>"
VIDEO_TARGET = f"{VID} Understand the content of the provided video."
QA_PROMPT = (
    "Given a video and a question, select the most accurate answer from the provided candidates. Return "
    "only the exact text of your chosen answer. Question: "
)
MRET_QUERY = "Find the clip that corresponds to the described scene in the given video:"
# mvbench_dataset.py subset_meta: the 20 configs, in the reference's order, and where their videos are
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


def _has_frames(folder: Path) -> bool:
    return folder.is_dir() and bool(frame_files(folder))


def video(root: Path, task: V2Task, frame_dir: str, video_file: str | None, where: str) -> Visual:
    """frame_root/<frame_dir> when it holds frames, else video_root/<video_file> (a file, extracted as
    the task's reader extracts, or a folder of frames: MVBench's frame subsets). DataError naming both."""
    frames = root / (task.frame_root or "") / frame_dir
    if _has_frames(frames):
        return Visual("video", (str(frames),), task.num_frames)
    source = root / task.video_root / video_file if task.video_root and video_file else None
    if source is not None and source.is_file():
        return Visual("video", (str(source),), task.num_frames, task.extractor)
    if source is not None and _has_frames(source):
        return Visual("video", (str(source),), task.num_frames)
    raise DataError(
        f"{where}: video {frame_dir!r} not found: no frames ({'/'.join(IMAGE_SUFFIXES)}) in {frames} "
        f"and no video {source if source is not None else '(no video root)'}"
    )


def _rows(root: Path, task: V2Task, config: str | None = None):
    records = task_records(root / task.data, task.name, config or task.config, task.split)
    for k, item in enumerate(records):
        if task.max_rows is not None and k >= task.max_rows:  # num_sample_per_subset: the first N
            return
        yield item


# ------------------------------------------------------------------------------------ classification
def read_video_cls(root: Path, task: V2Task, pool: CandidatePool) -> list[V2Row]:
    """Query: video token + the task's instruction. SmthSmthV2 (local): candidates are the row's
    neg_text list; the others (global): the row's label, then the full label list kept in the
    reference's code (the pool the reference ranks against)."""
    rows = []
    text = f"{VID} {task.instruction}"
    for where, rec in _rows(root, task):
        video_id, label = str(get(rec, "video_id", where)), str(get(rec, "pos_text", where))
        if task.eval_type == "local":
            names = [str(n) for n in get(rec, "neg_text", where)]  # type: ignore[union-attr]
            if label not in names:
                raise DataError(f"{where}: pos_text {label!r} is not among its candidates neg_text")
        else:
            names = [label]
        for n in names:
            pool.add(n, n, None)
        visual = video(root, task, video_id, video_id + ".mp4", where)
        rows.append(V2Row(text, visual, names, [label], where=where))
    if task.eval_type == "global":
        for label in VIDEO_CLS_LABELS[task.hub.split("/")[1]]:
            pool.add(label, label, None)
    return rows


# ----------------------------------------------------------------------------------------- retrieval
def _ret_fields(task: V2Task, rec: dict, where: str) -> tuple[str, str, str]:
    """(candidate name = frame folder, video file under video_root, caption) per the task's reader."""
    if task.name == "MSR-VTT":
        return (
            str(get(rec, "video_id", where)),
            str(get(rec, "video", where)),
            str(get(rec, "caption", where)),
        )
    if task.name == "MSVD":
        caps = get(rec, "caption", where)
        return str(get(rec, "video_id", where)), str(get(rec, "video", where)), str(caps[0])  # type: ignore[index]
    if task.name == "DiDeMo":
        base = os.path.basename(str(get(rec, "video", where)))
        return os.path.splitext(base)[0], base, str(get(rec, "caption", where))
    if task.name == "YouCook2":
        base = os.path.basename(str(get(rec, "video_path", where)))
        return str(get(rec, "id", where)), base, str(get(rec, "sentence", where))
    if task.name == "VATEX":
        name, caps = str(get(rec, "videoID", where)), get(rec, "enCap", where)
        return name, name + ".mp4", str(caps[0])  # type: ignore[index]
    raise DataError(f"{task.name}: no video-retrieval reader for this task")


def read_video_ret(root: Path, task: V2Task, pool: CandidatePool) -> list[V2Row]:
    rows = []
    for where, rec in _rows(root, task):
        name, video_file, caption = _ret_fields(task, rec, where)
        pool.add(name, VIDEO_TARGET, video(root, task, name, video_file, where))
        rows.append(V2Row(f"{task.instruction} {caption}", None, [name], [name], where=where))
    return rows


# ----------------------------------------------------------------------------------------------- QA
def _lettered(question: str, options: list[str], answer: str, where: str) -> tuple[str, list[str], str]:
    """vision_utils.qa_template: question + "\\nOptions:\\n" + "(A) ..." lines; lettered candidates."""
    if answer not in options:
        raise DataError(f"{where}: answer {answer!r} is not one of the candidates {options}")
    lettered = [f"({chr(ord('A') + k)}) {o}" for k, o in enumerate(options)]
    return question + "\nOptions:\n" + "\n".join(lettered), lettered, lettered[options.index(answer)]


def _strip_letter(option: str) -> str:
    """videomme / egoschema: `o[o.find('. '):].strip('. ')` (kept as written, also when '. ' is absent)."""
    return option[option.find(". ") :].strip(". ")


def _qa_fields(
    task: V2Task, rec: dict, where: str
) -> tuple[str, str | None, str, list[tuple[str, str]], str]:
    """(frame folder, video file, question text, candidates as (name, text), label name)."""
    q = str(get(rec, "question", where))
    if task.name == "Video-MME":
        options = [str(o) for o in get(rec, "options", where)]  # type: ignore[union-attr]
        vid, letter = str(get(rec, "videoID", where)), str(get(rec, "answer", where))
        if letter not in "ABCD" or len(letter) != 1 or "ABCD".index(letter) >= len(options):
            raise DataError(f"{where}: answer {letter!r} is not one of the option letters")
        cands = [(o, _strip_letter(o)) for o in options]
        return vid, vid + ".mp4", q + "\n" + "\n".join(options), cands, options["ABCD".index(letter)]
    if task.name == "EgoSchema":  # question and options joined as given, no separator before the first
        options = [str(o) for o in get(rec, "option", where)]  # type: ignore[union-attr]
        vid, answer = str(get(rec, "video_idx", where)), int(get(rec, "answer", where))  # type: ignore[arg-type]
        cands = [(o, _strip_letter(o)) for o in options]
        return vid, vid + ".mp4", q + " ".join(options), cands, options[answer]
    if task.name == "NExTQA":  # lettered options in the query; the raw options are the candidates
        options = [str(get(rec, f"a{k}", where)) for k in range(5)]
        vid, answer = str(get(rec, "video", where)), int(get(rec, "answer", where))  # type: ignore[arg-type]
        query = q + "\nOptions:\n" + "\n".join(f"({chr(ord('A') + k)}) {o}" for k, o in enumerate(options))
        return vid, vid + ".mp4", query, [(o, o) for o in options], options[answer]
    if task.name == "ActivityNetQA":
        vid = f"v_{get(rec, 'video_name', where)}"
        return (
            vid,
            vid + ".mp4",
            f"{q}? (A) yes; (B) no.",
            [("yes", "yes"), ("no", "no")],
            str(get(rec, "answer", where)),
        )
    if task.name == "MVBench":
        subset, name = str(get(rec, "subset", where)), str(get(rec, "video", where))
        options = [str(o) for o in get(rec, "candidates", where)]  # type: ignore[union-attr]
        query, lettered, label = _lettered(q, options, str(get(rec, "answer", where)), where)
        return (
            f"{subset}/{name}",
            f"{MVBENCH_VIDEOS[subset]}/{name}",
            query,
            [(c, c) for c in lettered],
            label,
        )
    raise DataError(f"{task.name}: no video-QA reader for this task")


def _mvbench_records(root: Path, task: V2Task):
    """load_hf_dataset_multiple_subset: the 20 configs in order, each with a `subset` column added."""
    for subset in MVBENCH_VIDEOS:
        for where, rec in task_records(root / task.data, f"{task.name} ({subset})", subset, task.split):
            yield where, {**rec, "subset": subset}


def read_video_qa(root: Path, task: V2Task, pool: CandidatePool) -> list[V2Row]:
    rows = []
    records = _mvbench_records(root, task) if task.name == "MVBench" else _rows(root, task)
    for where, rec in records:
        frame_dir, video_file, question, cands, label = _qa_fields(task, rec, where)
        names = [pool.add(n, t, None) for n, t in cands]
        if label not in names:
            raise DataError(f"{where}: answer {label!r} is not one of the candidates {names}")
        text = f"{VID} {QA_PROMPT} {question}"  # the prompt ends in a space: "Question:  <q>"
        rows.append(V2Row(text, video(root, task, frame_dir, video_file, where), names, [label], where=where))
    return rows


# --------------------------------------------------------------------------------- moment retrieval
def read_moment(root: Path, task: V2Task, pool: CandidatePool) -> list[V2Row]:
    """QVHighlight / Charades-STA: frames/<video>/query/ is the query video, every other sub-folder a
    candidate clip (sorted by name; the reference takes os.listdir order), the last `positive*` one the
    label (the reference keeps only the last it meets)."""
    rows = []
    for where, rec in _rows(root, task):
        name = os.path.splitext(os.path.basename(str(get(rec, "video_path", where))))[0]
        folder = root / task.frame_root / name
        query_frames = folder / "query"
        if not _has_frames(query_frames):
            raise DataError(f"{where}: no query frames in {query_frames}")
        clips = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "query")
        positives = [c for c in clips if c.name.startswith("positive")]
        if not positives:
            raise DataError(f"{where}: no positive* clip folder in {folder}")
        names = []
        for c in clips:
            if not _has_frames(c):
                raise DataError(f"{where}: no frames in clip folder {c}")
            names.append(
                pool.add(str(c.relative_to(root)), VIDEO_TARGET, Visual("video", (str(c),), task.num_frames))
            )
        text = f"{VID} {MRET_QUERY} {get(rec, 'query', where)}"
        query = Visual("video", (str(query_frames),), task.num_frames)
        rows.append(V2Row(text, query, names, [str(positives[-1].relative_to(root))], where=where))
    return rows


def read_momentseeker(root: Path, task: V2Task, pool: CandidatePool) -> list[V2Row]:
    """`query`, `input_frames` (a video .mp4, an image .jpg, or empty for a text query),
    `positive_frames` / `negative_frames` ({output_path}); every frame of each query / clip folder
    (frame_root/video_frames/<output_path, / as _, without .mp4>), query images at frame_root/query_<x>."""
    base = root / task.frame_root
    target = f"{VID} Understand the content of the provided video clip."

    def clip(path: str, where: str) -> str:
        folder = base / "video_frames" / path.replace("/", "_").split(".mp4")[0]
        if not _has_frames(folder):
            raise DataError(f"{where}: no frames for clip {path!r} in {folder}")
        return pool.add(str(folder.relative_to(root)), target, Visual("video", (str(folder),), None))

    rows = []
    for where, rec in _rows(root, task):
        query, given = str(get(rec, "query", where)), str(rec.get("input_frames") or "")
        visual: Visual | None = None
        if given.endswith(".mp4"):
            text = f"{VID} Find the clip that corresponds to the given sentence and video segment: {query}"
            folder = base / "video_frames" / given.split(".mp4")[0].replace("/", "_")
            if not _has_frames(folder):
                raise DataError(f"{where}: no frames for the query video {given!r} in {folder}")
            visual = Visual("video", (str(folder),), None)
        elif given.endswith(".jpg"):
            text = f"{IMG} Select the video clip that aligns with the given text and image: {query}"
            image = base / f"query_{given}"
            if not image.is_file():
                raise DataError(f"{where}: query image not found: {image}")
            visual = Visual("images", (str(image),))
        else:
            text = f"Find the clip that corresponds to the given text: {query}"
        positives = [clip(e["output_path"], where) for e in get(rec, "positive_frames", where)]  # type: ignore[union-attr]
        negatives = [clip(e["output_path"], where) for e in get(rec, "negative_frames", where)]  # type: ignore[union-attr]
        if not positives:
            raise DataError(f"{where}: no positive clip")
        rows.append(V2Row(text, visual, positives + negatives, positives, where=where))
    return rows
