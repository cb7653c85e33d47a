"""One table row -> a checked `TrainExample` / `EvalExample` (columns, image placeholders, hard
negatives), and `collect_rows`, which applies the bad-row policy over many rows: raise a `DataError`
naming the file and row, or skip and count the row in a `BadRows`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm2vec.data.errors import BadRows, DataError
from vlm2vec.media import resolve_path
from vlm2vec.mmeb_tables import IMAGE_PLACEHOLDER

VIDEO_PLACEHOLDER = "<|video_1|>"

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


class _RowProblem(Exception):
    """Internal: what is wrong with one row, before the caller adds where it is."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def replace_image_token(text: str, image_token: str | None) -> str:
    """`<|image_1|>` -> the backbone's image token; None keeps the placeholder (the encoder's prepare
    replaces it itself)."""
    return text if image_token is None else text.replace(IMAGE_PLACEHOLDER, image_token)


def _text_of(record: Mapping[str, Any], column: str) -> str:
    if column not in record:
        raise _RowProblem("missing_column", f"missing column {column!r} (row has {sorted(record)})")
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _RowProblem("bad_value", f"column {column!r} must be a string, got {type(value).__name__}")
    return value


def _path_of(record: Mapping[str, Any], column: str) -> str | None:
    return _text_of(record, column) or None


def _paths_of(record: Mapping[str, Any], column: str) -> str | tuple[str, ...] | None:
    """An image column holding one path, or a list of paths (several images, document pages: MMEB-V2
    rows); a one-item list is one path."""
    value = record.get(column) if column in record else _text_of(record, column)
    if isinstance(value, list | tuple | np.ndarray):
        paths = tuple(str(p) for p in value if p)
        return None if not paths else paths[0] if len(paths) == 1 else paths
    return _path_of(record, column)


def _video_of(record: Mapping[str, Any], column: str) -> str | None:
    """An optional video column (frame folder or video file); absent or empty = no video."""
    return _text_of(record, column) or None if column in record else None


def _list_of(record: Mapping[str, Any], column: str) -> list[str]:
    """A text/path column that may hold one item or a list; None and "" mean no items."""
    if column not in record:
        raise _RowProblem("missing_column", f"missing column {column!r} (row has {sorted(record)})")
    value = record[column]
    if value is None or (isinstance(value, str) and value == ""):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _RowProblem(
            "bad_value", f"column {column!r} must be a string or a list, got {type(value).__name__}"
        )
    out = []
    for item in value:
        if item is not None and not isinstance(item, str):
            raise _RowProblem("bad_value", f"column {column!r} holds a {type(item).__name__}, not a string")
        out.append(item or "")
    return out


_IMAGE_MARK = re.compile(r"<\|image_\d+\|>")


def _check_side(
    label: str,
    text: str,
    image: str | tuple[str, ...] | None,
    image_token: str | None,
    video: str | None = None,
) -> None:
    """A side (query/candidate) needs text or a visual input, one image placeholder per image
    (`<|image_1|>`, `<|image_2|>`, ...) and `<|video_1|>` iff it has a video."""
    if not text.strip() and image is None and video is None:
        raise _RowProblem("empty", f"{label} has empty text and no image")
    n_images = 0 if image is None else len(image) if isinstance(image, tuple) else 1
    n_tokens = len(_IMAGE_MARK.findall(text))
    if image_token and image_token != IMAGE_PLACEHOLDER:
        n_tokens += text.count(image_token)
    if n_images and n_tokens != n_images:
        raise _RowProblem(
            "placeholder",
            f"{label} has {'an image' if n_images == 1 else f'{n_images} images'} but {n_tokens} "
            f"{IMAGE_PLACEHOLDER!r} tokens in its text (need {n_images})",
        )
    if not n_images and n_tokens:
        raise _RowProblem("placeholder", f"{label} text has {IMAGE_PLACEHOLDER!r} but no image path")
    n_video = text.count(VIDEO_PLACEHOLDER)
    if (video is not None) != (n_video == 1) or n_video > 1:
        raise _RowProblem(
            "placeholder",
            f"{label} has {'a' if video else 'no'} video but {n_video} {VIDEO_PLACEHOLDER!r} in its text",
        )


def _check_image_exists(path: str | tuple[str, ...] | None, image_root: Path | None, label: str) -> None:
    for p in path if isinstance(path, tuple) else (path,):
        if p is not None and not resolve_path(p, image_root).is_file():
            raise _RowProblem("image", f"{label} image not found: {resolve_path(p, image_root)}")


@dataclass(slots=True)
class TrainExample:
    """One MMEB-train row. Images are paths relative to the image root (loaded per batch)."""

    subset: str
    query_text: str
    query_image: str | None
    pos_text: str
    pos_image: str | None
    neg_texts: list[str] = field(default_factory=list)
    neg_images: list[str | None] = field(default_factory=list)
    source: str = ""  # file (or hub split) the row came from
    row: int = -1  # row index in that file
    query_video: str | None = None  # frame folder or video file (MMEB-V2 rows), relative to the root
    pos_video: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"


def _negatives_of(
    record: Mapping[str, Any], image_token: str | None, image_root: Path | None, check_images: bool
) -> tuple[list[str], list[str | None]]:
    """(texts, image paths) of a row's hard negatives, checked like its other sides; _RowProblem when
    malformed."""
    neg_texts, neg_images = _list_of(record, "neg_text"), _list_of(record, "neg_image_path")
    if neg_texts and neg_images and len(neg_texts) != len(neg_images):
        raise _RowProblem(
            "negatives", f"{len(neg_texts)} neg_text but {len(neg_images)} neg_image_path items"
        )
    n_neg = max(len(neg_texts), len(neg_images))
    neg_texts = neg_texts or [""] * n_neg
    negs_img: list[str | None] = [p or None for p in neg_images] if neg_images else [None] * n_neg
    for k, (t, p) in enumerate(zip(neg_texts, negs_img)):
        _check_side(f"negative {k}", t, p, image_token)
        if check_images:
            _check_image_exists(p, image_root, "negative")
    return neg_texts, negs_img


def parse_train_row(
    record: Mapping[str, Any], *, subset: str, source: str, row: int, image_token: str | None,
    num_negatives: int, missing_negatives: str, image_root: Path | None, check_images: bool,
) -> TrainExample:  # fmt: skip
    query, query_image = _text_of(record, "qry"), _paths_of(record, "qry_image_path")
    pos, pos_image = _text_of(record, "pos_text"), _paths_of(record, "pos_image_path")
    query_video, pos_video = _video_of(record, "qry_video_path"), _video_of(record, "pos_video_path")
    _check_side("query", query, query_image, image_token, query_video)
    _check_side("positive", pos, pos_image, image_token, pos_video)
    if check_images:
        for label, v in (("query", query_video), ("positive", pos_video)):
            if v is not None and not resolve_path(v, image_root).exists():
                raise _RowProblem("image", f"{label} video not found: {resolve_path(v, image_root)}")
        for label, p in (("query", query_image), ("positive", pos_image)):
            _check_image_exists(p, image_root, label)
    try:
        neg_texts, negs_img = _negatives_of(record, image_token, image_root, check_images)
    except _RowProblem:
        if num_negatives:
            raise
        neg_texts, negs_img = [], []  # unused: the reference trains the row whatever its negatives hold
    n_neg = len(neg_texts)
    if n_neg < num_negatives and missing_negatives == "error":
        raise _RowProblem(
            "negatives",
            f"has {n_neg} hard negatives but num_negatives={num_negatives} "
            "(pass missing_negatives='mask' to train it on the ones it has, or 'sample' to fill with other "
            "rows' positives)",
        )
    return TrainExample(
        subset=subset,
        query_text=replace_image_token(query, image_token),
        query_image=query_image,
        pos_text=replace_image_token(pos, image_token),
        pos_image=pos_image,
        neg_texts=[replace_image_token(t, image_token) for t in neg_texts],
        neg_images=negs_img,
        source=source,
        row=row,
        query_video=query_video,
        pos_video=pos_video,
    )


@dataclass(slots=True)
class EvalExample:
    """One MMEB-eval row: a query and its candidates, ground truth at index 0 (image paths unloaded)."""

    dataset: str
    query_text: str
    query_image: str | None
    cand_texts: list[str]
    cand_images: list[str | None]
    source: str = ""
    row: int = -1

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"


def parse_eval_row(
    record: Mapping[str, Any], *, dataset: str, source: str, row: int, image_token: str | None,
    image_root: Path | None, check_images: bool, checked: set[tuple[str, str | None]],
) -> EvalExample:  # fmt: skip
    """One eval row, checked. `checked`: candidates (text, image) already found valid in this dataset;
    MMEB rows repeat their candidate lists (every query of a retrieval task may rank the same 1,000),
    so each distinct candidate is checked once, not once per row."""
    query, query_image = _text_of(record, "qry_text"), _path_of(record, "qry_img_path")
    texts, images = _list_of(record, "tgt_text"), _list_of(record, "tgt_img_path")
    if not texts and not images:
        raise _RowProblem("empty", "no candidates (tgt_text and tgt_img_path are empty)")
    if texts and images and len(texts) != len(images):
        raise _RowProblem("bad_value", f"{len(texts)} tgt_text but {len(images)} tgt_img_path items")
    n = max(len(texts), len(images))
    texts = texts or [""] * n
    cand_images: list[str | None] = [p or None for p in images] if images else [None] * n
    _check_side("query", query, query_image, image_token)
    if check_images:
        _check_image_exists(query_image, image_root, "query")
    for j, (t, p) in enumerate(zip(texts, cand_images)):
        if (t, p) not in checked:
            _check_side(f"candidate {j}", t, p, image_token)
            if check_images:
                _check_image_exists(p, image_root, "candidate")
            checked.add((t, p))
    return EvalExample(
        dataset=dataset,
        query_text=replace_image_token(query, image_token),
        query_image=query_image,
        cand_texts=[replace_image_token(t, image_token) for t in texts],
        cand_images=cand_images,
        source=source,
        row=row,
    )


def collect_rows(
    records: Iterable[tuple[str, dict | None, str | None]],
    parse: Callable[[dict, str, int], Any],
    cap: int | None,
    skip_bad_rows: bool,
    bad_rows: BadRows,
) -> list[Any]:
    """Parse rows until `cap` good rows; bad rows raise, or are counted when skipping."""
    out: list[Any] = []
    for row, (where, record, problem) in enumerate(records):
        if cap is not None and len(out) >= cap:
            break
        try:
            if problem is not None:
                raise _RowProblem("unreadable", problem)
            assert record is not None
            out.append(parse(record, where, row))
        except _RowProblem as p:
            if not skip_bad_rows:
                raise DataError(f"{where}: {p}") from None
            bad_rows.add(f"{where}: {p}", p.kind)
    return out
