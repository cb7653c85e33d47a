"""MMEB data: train/eval row readers, a step-indexed batch sampler, and the per-chunk collator.

Path of one training batch::

    load_train_data(dir)          -> TrainData: validated TrainExample rows per subset (caps applied)
    TrainBatches(data, B)[step]   -> ContrastiveBatch: rows chosen by (seed, step) only, images loaded
    ChunkCollator(model, ...)(b)  -> PreparedBatch: model.prepare per GradCache chunk (own padding)

Batch n is a pure function of (seed, n, the data), so a checkpoint only needs the step number
(`TrainBatches.state_dict()`), and DataLoader workers may build batches in any order
(`DataLoader(batches, batch_size=None, sampler=range(start, stop), collate_fn=collator)`).

Hard negatives: `neg_text` / `neg_image_path` may each hold one item or a list ("", None, [] = none).
With `num_negatives=K` a row with more keeps K (drawn per step); a row with fewer is a bad row at read
time, unless `missing_negatives="sample"` fills it at batch time with positives of other rows of the
same subset (never one equal to its own positive). Every batch then has exactly K per query.

Bad input (unreadable file or image, missing column, empty query, placeholder/image mismatch, too few
hard negatives, image tokens cut by max_len) raises `DataError` naming the file and row; with
`skip_bad_rows=True` the row is skipped and counted in a `BadRows` (warned, never silent).

Local layout of a train directory (one file or one folder per subset; subset name = file stem or
folder name; folders are searched recursively, files read in sorted order)::

    train/
      CIRR.jsonl                          # subset "CIRR"
      MSCOCO_i2t.parquet                  # subset "MSCOCO_i2t"
      VOC2007/                            # subset "VOC2007" (e.g. the hub mirror layout)
        original-00000-of-00001.parquet   #   split "original"
        diverse_instruction-00000-of-00001.parquet
      images/...                          # image paths are relative to `image_root` (default: train/)

Eval directory: `<dataset>.jsonl`, `<dataset>.parquet`, `<dataset>.arrow` or a folder `<dataset>/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlm2vec.mmeb_tables import EVAL_DATASET_INFO, IMAGE_PLACEHOLDER, MMEB_TRAIN_SUBSETS, EvalDatasetInfo

VIDEO_PLACEHOLDER = "<|video_1|>"

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
TABLE_SUFFIXES = (".jsonl", ".parquet", ".arrow")

__all__ = [
    "IMAGE_PLACEHOLDER", "TRAIN_COLUMNS", "EVAL_COLUMNS", "DataError", "BadRows", "TrainExample",
    "TrainData", "load_train_data", "read_train_file", "StepSampler", "ContrastiveBatch", "TrainBatches",
    "ChunkCollator", "PreparedBatch", "EvalExample", "EvalSet", "load_eval_dataset", "find_eval_source",
    "load_image", "replace_image_token", "estimate_length",
]  # fmt: skip


class DataError(ValueError):
    """A bad file or row; the message starts with `<file>, row <i>` (or the hub source)."""


class _RowProblem(Exception):
    """Internal: what is wrong with one row, before the caller adds where it is."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class BadRows:
    """Rows skipped under `skip_bad_rows=True`: counted (by kind), the first few warned about, none silent.

    A trainer logs `count`. DataLoader workers hold their own copies of the objects, so batches also list
    the rows they skipped (`ContrastiveBatch.skipped`, `PreparedBatch.skipped`)."""

    max_warnings = 10

    def __init__(self) -> None:
        self.count = 0
        self.by_kind: Counter[str] = Counter()
        self.messages: list[str] = []  # the first `max_warnings` messages

    def add(self, message: str, kind: str) -> None:
        self.count += 1
        self.by_kind[kind] += 1
        if self.count <= self.max_warnings:
            self.messages.append(message)
            warnings.warn(f"skipping bad row ({self.count} so far): {message}", stacklevel=3)
        elif self.count == self.max_warnings + 1:
            warnings.warn("more bad rows are being skipped; they are counted in BadRows.count", stacklevel=3)

    def __repr__(self) -> str:
        return f"BadRows(count={self.count}, by_kind={dict(self.by_kind)})"


# --------------------------------------------------------------------------------------------- text


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
        if p is not None and not _resolve(p, image_root).is_file():
            raise _RowProblem("image", f"{label} image not found: {_resolve(p, image_root)}")


def _resolve(path: str, image_root: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or image_root is None else image_root / p


def load_visual(
    paths: str | tuple[str, ...] | None, image_root: str | os.PathLike | None, where: str
) -> Image.Image | list[Image.Image] | None:
    """A row's image column as encoder input: None, one image, or a list (several images / pages)."""
    if paths is None:
        return None
    if isinstance(paths, tuple):
        return [load_image(p, image_root, f"{where}[{k}]") for k, p in enumerate(paths)]
    return load_image(paths, image_root, where)


def load_frames(
    source: str | None, image_root: str | os.PathLike | None, num_frames: int | None, where: str
) -> list[Image.Image] | None:
    """A row's video (frame folder or video file) as sampled frames; a DataError naming `where`."""
    if source is None:
        return None
    from vlm2vec.media import MediaError, load_video

    try:
        return load_video(source, num_frames, root=image_root, where=where)
    except MediaError as err:
        raise DataError(str(err)) from err


def load_image(path: str, image_root: str | os.PathLike | None, where: str) -> Image.Image:
    """Open an image (relative to `image_root`), decoded in its own mode; a DataError naming `where` and the
    file on failure. The encoder resizes it to a resolution preset first and converts it to RGB after, as
    the reference does (a palette image resized as a palette: nearest neighbour)."""
    full = _resolve(path, Path(image_root) if image_root is not None else None)
    try:
        with Image.open(full) as img:
            return img.copy()  # decoded; a plain Image (palette and transparency kept)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: cannot read image {full}: {err}") from err


# ------------------------------------------------------------------------------------------ readers


def _iter_records(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, record, problem) per row of a .jsonl/.parquet/.arrow file, lazily (caps stop early)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            row = 0
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, row {row} (line {line_no})"
                row += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield where, None, f"invalid JSON: {err}"
                    continue
                if isinstance(record, dict):
                    yield where, record, None
                else:
                    yield where, None, f"expected a JSON object, got {type(record).__name__}"
        return
    import pyarrow as pa

    row = 0
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            batches: Iterable[Any] = pq.ParquetFile(path).iter_batches(batch_size=2048)
        elif suffix == ".arrow":
            batches = _arrow_batches(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {TABLE_SUFFIXES}")
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{path}, row {row}", record, None
                row += 1
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}, row {row}: cannot read the file: {err}") from err


def _arrow_batches(path: Path) -> Iterator[Any]:
    """Record batches of an Arrow IPC stream (what `datasets.save_to_disk` writes) or IPC file."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            yield from pa.ipc.open_stream(source)
        return
    except pa.ArrowInvalid:
        pass
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _table_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES)


def _matches_split(rel: Path, split: str) -> bool:
    parts = [*rel.parent.parts, rel.name[: -len(rel.suffix)]]
    return any(part == split or part.startswith(split + "-") for part in parts)


def _subset_files(root: Path, split: str | None) -> dict[str, list[Path]]:
    """subset name -> its files, for a single file, or a directory of files / subset folders."""
    if root.is_file():
        if root.suffix not in TABLE_SUFFIXES:
            raise DataError(f"{root}: unsupported file type {root.suffix!r}; use one of {TABLE_SUFFIXES}")
        return {root.stem: [root]}
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix in TABLE_SUFFIXES:
            found.setdefault(entry.stem, []).append(entry)
        elif entry.is_dir():
            files = _table_files(entry)
            if split is not None and files:
                chosen = [f for f in files if _matches_split(f.relative_to(entry), split)]
                if not chosen:
                    raise DataError(f"{entry}: no file of split {split!r} (files: {[f.name for f in files]})")
                files = chosen
            if files:
                found.setdefault(entry.name, []).extend(files)
    if not found:
        raise DataError(f"{root}: no {'/'.join(TABLE_SUFFIXES)} files found")
    return found


def _is_hub_name(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def _hub_rows(name: str, config: str, split: str, limit: int | None) -> Iterator[tuple[str, dict, None]]:
    """Rows of a hub dataset via `datasets` (imported only here: online use, never in tests)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, typo'd local path, unknown config: say what was tried
        raise DataError(
            f"{name!r} is not a local path and loading [{config}/{split}] from the hub failed: {err}"
        ) from err
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    for i, record in enumerate(ds):
        yield f"{name}[{config}/{split}], row {i}", record, None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Reading builds millions of small objects; the cyclic GC rescanning them doubles the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _collect(
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


# -------------------------------------------------------------------------------------------- train


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


def _parse_train_row(
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
            if v is not None and not _resolve(v, image_root).exists():
                raise _RowProblem("image", f"{label} video not found: {_resolve(v, image_root)}")
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
            "(pass missing_negatives='sample' to fill with other rows' positives)",
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


@dataclass
class TrainData:
    """Validated training rows per subset, plus what batches need to load images and pick negatives."""

    subsets: dict[str, list[TrainExample]]
    image_root: Path | None
    num_negatives: int = 0
    missing_negatives: Literal["error", "sample"] = "error"
    bad_rows: BadRows = field(default_factory=BadRows)
    num_frames: int | None = 8  # frames sampled per training video (media.DEFAULT_NUM_FRAMES)
    weights: dict[str, float] | None = None  # per-subset sampling weights of a multi-source mix
    # (subset, index) of rows whose images failed to load under skip_bad_rows: counted once, then skipped
    known_bad: set[tuple[str, int]] = field(default_factory=set)

    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.subsets.items()}

    def __len__(self) -> int:
        return sum(self.sizes().values())


def read_train_file(
    path: str | os.PathLike,
    subset: str | None = None,
    *,
    image_token: str | None = None,
    max_rows: int | None = None,
    num_negatives: int = 0,
    missing_negatives: Literal["error", "sample"] = "error",
    skip_bad_rows: bool = False,
    bad_rows: BadRows | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
) -> list[TrainExample]:
    """Rows of one .jsonl/.parquet/.arrow file (subset name defaults to the file stem)."""
    path = Path(path)
    subset = subset or path.stem
    root = Path(image_root) if image_root is not None else None

    def parse(record: dict, where: str, row: int) -> TrainExample:
        return _parse_train_row(
            record, subset=subset, source=str(path), row=row, image_token=image_token,
            num_negatives=num_negatives, missing_negatives=missing_negatives, image_root=root,
            check_images=check_images,
        )  # fmt: skip

    with _gc_paused():
        return _collect(_iter_records(path), parse, max_rows, skip_bad_rows, bad_rows or BadRows())


def _cap_for(num_sample_per_subset: int | Mapping[str, int] | None, name: str) -> int | None:
    cap = (
        num_sample_per_subset.get(name)
        if isinstance(num_sample_per_subset, Mapping)
        else num_sample_per_subset
    )
    if cap is not None and cap < 1:
        raise ValueError(f"num_sample_per_subset must be >= 1, got {cap} for subset {name!r}")
    return cap


def load_train_data(
    source: str | os.PathLike,
    *,
    subsets: Sequence[str] | None = None,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    image_token: str | None = None,
    num_sample_per_subset: int | Mapping[str, int] | None = None,
    num_negatives: int = 0,
    missing_negatives: Literal["error", "sample"] = "error",
    skip_bad_rows: bool = False,
    check_images: bool = False,
    num_frames: int | None = 8,
) -> TrainData:
    """Read MMEB-train rows from a local file/directory (layout in the module docstring) or, when
    `source` is not a local path, a hub dataset name (e.g. "TIGER-Lab/MMEB-train", split "original").

    num_sample_per_subset: keep the first N valid rows of each subset (int, or per-subset dict).
    num_negatives: K hard negatives per query; a row with fewer raises (missing_negatives="error") or
      is filled at batch time with positives of other rows of the same subset ("sample").
    image_root: where image paths are relative to (default: the source directory / file's folder).
    check_images: test at read time that every image file exists (otherwise found when loaded).
    num_frames: frames sampled per video row (uniformly by index; None: every frame).
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    if missing_negatives not in ("error", "sample"):
        raise ValueError(f"missing_negatives must be 'error' or 'sample', got {missing_negatives!r}")
    bad = BadRows()
    path = Path(source).expanduser()
    if path.exists():
        files = _subset_files(path, split)
        root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
        wanted = list(subsets) if subsets is not None else list(files)
        unknown = [s for s in wanted if s not in files]
        if unknown:
            raise ValueError(f"subsets {unknown} not found in {path}; found: {sorted(files)}")
        sources = {name: [(str(f), _iter_records(f)) for f in files[name]] for name in wanted}
    elif _is_hub_name(str(source)):
        root = Path(image_root) if image_root is not None else None
        wanted = list(subsets) if subsets is not None else list(MMEB_TRAIN_SUBSETS)
        hub_split = split or "original"
        sources = {
            name: [
                (f"{source}[{name}/{hub_split}]",
                 _hub_rows(str(source), name, hub_split, _cap_for(num_sample_per_subset, name)))
            ]
            for name in wanted
        }  # fmt: skip
    else:
        raise FileNotFoundError(f"train data source {str(source)!r} is neither a local path nor a hub name")

    out: dict[str, list[TrainExample]] = {}
    for name in tqdm(
        wanted, desc="reading train subsets", unit="subset", disable=len(wanted) < 4, leave=False
    ):
        cap = _cap_for(num_sample_per_subset, name)
        rows: list[TrainExample] = []
        for src, records in sources[name]:
            remaining = None if cap is None else cap - len(rows)
            if remaining == 0:
                break

            def parse(record: dict, where: str, row: int, _src: str = src, _name: str = name) -> TrainExample:
                return _parse_train_row(
                    record, subset=_name, source=_src, row=row, image_token=image_token,
                    num_negatives=num_negatives, missing_negatives=missing_negatives, image_root=root,
                    check_images=check_images,
                )  # fmt: skip

            with _gc_paused():
                rows.extend(_collect(records, parse, remaining, skip_bad_rows, bad))
        if not rows:
            raise DataError(f"subset {name!r} has no usable rows ({[s for s, _ in sources[name]]})")
        out[name] = rows
    return TrainData(out, root, num_negatives, missing_negatives, bad, num_frames=num_frames)


def parse_sources(spec: str) -> list[tuple[str, float | None]]:
    """`SRC[=WEIGHT][,SRC[=WEIGHT]...]` -> [(source, weight or None)]: several training sources (local
    paths or hub names) mixed with weights, e.g. `mmeb_train=0.6,video_caption=0.2,visdoc=0.2`."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        source, _, weight = part.rpartition("=") if "=" in part else (part, "", "")
        try:
            w = float(weight) if weight else None
        except ValueError:
            raise ValueError(f"dataset source {part!r}: the weight after '=' must be a number") from None
        if w is not None and (w < 0 or not np.isfinite(w)):
            raise ValueError(f"dataset source {part!r}: the weight must be finite and >= 0")
        out.append((source, w))
    if not out:
        raise ValueError(f"no dataset source in {spec!r}")
    return out


def load_train_mix(spec: str, *, weights: Literal["size", "uniform"] = "size", **kwargs: Any) -> TrainData:
    """One or several training sources (`parse_sources`) as one TrainData. With several, subsets are named
    `<source name>/<subset>` and `TrainData.weights` gives each source its weight (equal when not
    written), split over its subsets by size or uniformly (`weights`); a single source keeps its
    subset names and weights None (the sampler's `weights` apply)."""
    sources = parse_sources(spec)
    if len(sources) == 1 and sources[0][1] is None:
        return load_train_data(sources[0][0], **kwargs)
    merged: dict[str, list[TrainExample]] = {}
    mix: dict[str, float] = {}
    first = None
    names = [Path(src).name or src for src, _ in sources]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    for (src, weight), name in zip(sources, names):
        data = load_train_data(src, **kwargs)
        first = first or data
        sizes = data.sizes()
        total = sum(sizes.values()) if weights == "size" else len(sizes)
        for subset, rows in data.subsets.items():
            if data.image_root != first.image_root:  # rows keep paths relative to their own root
                rows = [_rooted(ex, data.image_root) for ex in rows]
            merged[f"{name}/{subset}"] = [dataclasses.replace(ex, subset=f"{name}/{subset}") for ex in rows]
            share = sizes[subset] if weights == "size" else 1
            mix[f"{name}/{subset}"] = (1.0 if weight is None else weight) * share / total
    assert first is not None
    out = TrainData(
        merged, first.image_root, first.num_negatives, first.missing_negatives, first.bad_rows,
        num_frames=first.num_frames,
    )  # fmt: skip
    out.weights = mix
    return out


def _rooted(ex: TrainExample, root: Path | None) -> TrainExample:
    """The row with its relative image/video paths made absolute under `root`."""
    if root is None:
        return ex

    def fix(p: Any) -> Any:
        if p is None:
            return None
        if isinstance(p, tuple):
            return tuple(fix(q) for q in p)
        return p if Path(p).is_absolute() else str(root / p)

    return dataclasses.replace(
        ex, query_image=fix(ex.query_image), pos_image=fix(ex.pos_image), query_video=fix(ex.query_video),
        pos_video=fix(ex.pos_video), neg_images=[fix(p) for p in ex.neg_images],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ sampling


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


@dataclass
class ContrastiveBatch:
    """Queries and their candidates, laid out [pos_0, neg_0_1..neg_0_K, pos_1, ...]; target i*(K+1).

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
        g = self.num_negatives + 1
        cands = [c for i in keep for c in range(i * g, (i + 1) * g)]
        return ContrastiveBatch(
            query_texts=[self.query_texts[i] for i in keep],
            query_images=[self.query_images[i] for i in keep],
            cand_texts=[self.cand_texts[c] for c in cands],
            cand_images=[self.cand_images[c] for c in cands],
            targets=torch.arange(len(keep), dtype=torch.long) * g,
            subsets=[self.subsets[i] for i in keep],
            num_negatives=self.num_negatives,
            sources=[self.sources[i] for i in keep] if self.sources else [],
            skipped=list(self.skipped),
            query_videos=[self.query_videos[i] for i in keep] if self.query_videos else [],
            cand_videos=[self.cand_videos[c] for c in cands] if self.cand_videos else [],
        )


class TrainBatches(torch.utils.data.Dataset):
    """Step-indexed training batches: `batches[n]` is batch n; iterating resumes from `state_dict()`.

    Hard negatives: a row with more than K keeps K drawn by (seed, step, position); with
    missing_negatives="sample", a row with fewer gets positives of other rows of its subset (never one
    equal to its own positive). A row whose image cannot be loaded raises DataError naming file and row,
    or with skip_bad_rows is counted and replaced by the next good row of its subset (deterministic).
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
            for text, img, vid in cands:
                batch.cand_texts.append(text)
                batch.cand_images.append(img)
                batch.cand_videos.append(vid)
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
        if len(cands) < k + 1:  # missing_negatives == "sample" (read time rejected it otherwise)
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


# ------------------------------------------------------------------------------------------ collate


def estimate_length(text: str, image: Image.Image | None) -> int:
    """Rough token count used only to order rows by length: ~4 characters per text token, one token per
    28x28 pixels of image (Qwen2-VL's merged patch). Pass your own `length_fn` for exact counts."""
    n = len(text) // 4 + 1
    if image is not None:
        n += (image.width * image.height) // (28 * 28) + 1
    return n


@dataclass
class PreparedBatch:
    """Model inputs, one dict per GradCache chunk, each padded only to its own longest row.

    Rows may be reordered (sort_by_length) or dropped (skip_bad_rows): `query_order[i]` / `cand_order[j]`
    give the index in the collated ContrastiveBatch of prepared row i / j, and `targets[i]` indexes the
    concatenated candidate chunks (the positive of prepared query i)."""

    query_chunks: list[dict[str, torch.Tensor]]
    cand_chunks: list[dict[str, torch.Tensor]]
    targets: torch.Tensor
    query_order: torch.Tensor
    cand_order: torch.Tensor
    subsets: list[str]
    num_negatives: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return len(self.query_order)

    @property
    def num_candidates(self) -> int:
        return len(self.cand_order)


class ChunkCollator:
    """Turns a ContrastiveBatch into per-chunk model inputs by calling `model.prepare(texts, images)`
    once per chunk, so each chunk carries only its own longest row (never the whole batch's).

    model: anything with `prepare(texts, images)` (a VLM2Vec); it must raise ValueError for a row it
      cannot encode (e.g. image tokens cut by max_len). The failing rows are found, and the error re-raised
      naming the example's file and row, or with skip_bad_rows their queries are dropped and counted.
    sort_by_length: order queries and candidates (separately) by `length_fn` so similar lengths share a
      chunk; targets follow the new order.
    packed: ask prepare for padding-free packed sequences (`prepare(..., packed=True)`).
    max_tokens: size chunks by tokens instead of rows: consecutive rows (in the sorted order) fill a
      chunk while the chunk's tokens stay within the budget. A chunk's tokens are what the model sees:
      rows x its longest row when padded, the sum of row lengths when packed; a row's length is its
      prepared length (visual + text tokens, from `model.count_tokens` when the model has it), so a
      video row (~5,000 tokens) goes nearly alone while text rows (~20) share a chunk by the hundred.
      A row longer than the budget gets a chunk of its own; when padded, a row less than half as long as
      its chunk's longest starts a new chunk (videos, images and text rows do not pad each other).
      Chunk sizes then only bound rows per chunk
      when given explicitly (`query_chunk_size` / `cand_chunk_size` act as caps; None: no cap).
    group_size: task-wise batching: every `group_size` consecutive queries (drawn from one subset by
      `StepSampler(homogeneous_size=...)`) and their candidates are sorted and chunked on their own, so
      no GradCache chunk mixes two groups.
    """

    def __init__(
        self,
        model: Any,
        *,
        query_chunk_size: int | None,
        cand_chunk_size: int | None = None,
        sort_by_length: bool = False,
        length_fn: Callable[[str, Image.Image | None], int] = estimate_length,
        skip_bad_rows: bool = False,
        packed: bool = False,
        max_tokens: int | None = None,
        group_size: int | None = None,
    ):
        if not callable(getattr(model, "prepare", None)):
            raise TypeError(f"model must have a prepare(texts, images) method, got {type(model).__name__}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if query_chunk_size is None and max_tokens is None:
            raise ValueError("query_chunk_size is required unless chunks are sized by max_tokens")
        if cand_chunk_size is None and max_tokens is None:
            cand_chunk_size = query_chunk_size
        for size in (query_chunk_size, cand_chunk_size):
            if size is not None and size < 1:
                raise ValueError(f"chunk sizes must be >= 1, got {query_chunk_size} and {cand_chunk_size}")
        self.model, self.query_chunk_size, self.cand_chunk_size = model, query_chunk_size, cand_chunk_size
        self.sort_by_length, self.length_fn = sort_by_length, length_fn
        self.skip_bad_rows, self.packed, self.max_tokens = skip_bad_rows, packed, max_tokens
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.bad_rows = BadRows()

    def _prepare(self, texts: list[str], images: list, videos: list) -> dict[str, torch.Tensor]:
        imgs = images if any(i is not None for i in images) else None
        kwargs: dict[str, Any] = {"packed": True} if self.packed else {}
        if any(v is not None for v in videos):
            kwargs["videos"] = videos
        return self.model.prepare(texts, imgs, **kwargs)

    def _lengths(self, texts: list[str], images: list, videos: list) -> list[int] | None:
        """Per-row lengths: exact prepared token counts under a token budget (`model.count_tokens`),
        `length_fn` estimates for sorting otherwise (None when neither is needed)."""
        count = getattr(self.model, "count_tokens", None)
        if self.max_tokens is not None and callable(count):
            return [int(count(t, i, v)) for t, i, v in zip(texts, images, videos)]
        if self.max_tokens is None and not self.sort_by_length:
            return None
        out = []
        for t, i, v in zip(texts, images, videos):
            if v is None and not isinstance(i, list | tuple):  # one image or none: length_fn as given
                out.append(self.length_fn(t, i))
                continue
            ims = list(i) if isinstance(i, list | tuple) else [i] if i is not None else []
            out.append(self.length_fn(t, None) + sum(self.length_fn("", im) for im in ims + list(v or [])))
        return out

    def _order(self, lengths: list[int] | None) -> list[int]:
        if not self.sort_by_length or lengths is None:
            return list(range(len(lengths))) if lengths is not None else []
        return sorted(range(len(lengths)), key=lambda r: -lengths[r])  # stable: ties keep batch order

    def _groups(self, order: list[int], lengths: list[int] | None, size: int | None) -> list[list[int]]:
        """Rows of each chunk: `size` rows at a time, or filled up to the token budget."""
        if self.max_tokens is None:
            assert size is not None
            return [order[s : s + size] for s in range(0, len(order), size)]
        assert lengths is not None
        groups: list[list[int]] = []
        current: list[int] = []
        longest = total = 0
        for r in order:
            n = lengths[r]
            grown = (total + n) if self.packed else (len(current) + 1) * max(longest, n)
            # padded: a row less than half as long as the chunk's longest would more than double its
            # cost in padding, so it starts a chunk of shorter rows (rows come sorted by length)
            mismatched = not self.packed and 2 * n < longest
            full = grown > self.max_tokens or (size is not None and len(current) == size)
            if current and (full or mismatched):
                groups.append(current)
                current, longest, total = [], 0, 0
            current.append(r)
            longest, total = max(longest, n), total + n
        if current:
            groups.append(current)
        return groups

    def _chunks(
        self,
        texts: list[str],
        images: list,
        videos: list,
        size: int | None,
        segment: int | None = None,
        min_chunks: int = 0,
    ) -> tuple[list[int], list[dict[str, torch.Tensor]], list[tuple[int, ValueError]]]:
        """(row order, prepared chunks) or the rows (batch indices) that prepare rejects. `segment`: rows
        per group that chunks never cross (task-wise batching). `min_chunks`: split the chunks with the
        most rows in two until there are at least this many (GradCache is exact for any chunking)."""
        try:
            lengths = self._lengths(texts, images, videos)
        except ValueError:  # a row cannot even be measured: find it row by row below
            lengths, size = None, 1
        segment = segment or max(1, len(texts))
        order, groups = [], []
        for start in range(0, len(texts), segment):
            rows = list(range(start, min(start + segment, len(texts))))
            if lengths is not None:
                part = (
                    [rows[i] for i in self._order([lengths[r] for r in rows])]
                    if self.sort_by_length
                    else rows
                )
                groups += self._groups(part, lengths, size)
            else:
                part = rows
                groups += (
                    [[r] for r in part] if self.max_tokens is not None else self._groups(part, None, size)
                )
            order += part
        while len(groups) < min_chunks and max(map(len, groups), default=0) > 1:
            k = max(range(len(groups)), key=lambda i: len(groups[i]))  # in place: groups still tile order
            half = len(groups[k]) // 2
            groups[k : k + 1] = [groups[k][:half], groups[k][half:]]
        chunks, failures = [], []
        for rows in groups:
            try:
                chunks.append(
                    self._prepare(
                        [texts[r] for r in rows], [images[r] for r in rows], [videos[r] for r in rows]
                    )
                )
            except ValueError as err:
                bad = []
                for r in rows:
                    try:
                        self._prepare([texts[r]], [images[r]], [videos[r]])
                    except ValueError as row_err:
                        bad.append((r, row_err))
                failures.extend(bad or [(r, err) for r in rows])
        return order, chunks, failures

    def __call__(self, batch: ContrastiveBatch, min_chunks: tuple[int, int] = (0, 0)) -> PreparedBatch:
        """`min_chunks`: at least this many (query, candidate) chunks where the rows allow it (ZeRO-3
        needs the same number of forward passes on every process, see `train.align_processes`)."""
        g = batch.num_negatives + 1
        skipped = list(batch.skipped)
        kept = list(range(len(batch)))  # original index of each remaining query
        while True:
            if len(batch) == 0:
                raise DataError(f"every row of the batch was bad: {skipped[:3]}")
            q_seg = self.group_size if self.group_size and len(batch) % self.group_size == 0 else None
            q_order, q_chunks, q_fail = self._chunks(
                batch.query_texts,
                batch.query_images,
                batch.videos("query"),
                self.query_chunk_size,
                q_seg,
                min_chunks[0],
            )
            c_order, c_chunks, c_fail = self._chunks(
                batch.cand_texts,
                batch.cand_images,
                batch.videos("cand"),
                self.cand_chunk_size,
                q_seg and q_seg * g,
                min_chunks[1],
            )
            if not q_fail and not c_fail:
                break
            bad_queries: dict[int, str] = {}
            for side, fails in (("query", q_fail), ("candidate", c_fail)):
                for r, err in fails:
                    q = r if side == "query" else r // g
                    label = side if side == "query" else ("positive" if r % g == 0 else f"negative {r % g}")
                    where = batch.sources[q] if batch.sources else f"batch row {q}"
                    msg = f"{where} [{batch.subsets[q]}] {label}: {err}"
                    if not self.skip_bad_rows:
                        raise DataError(msg) from err
                    bad_queries.setdefault(q, msg)
            for msg in bad_queries.values():
                self.bad_rows.add(msg, "prepare")
                skipped.append(msg)
            keep = [q for q in range(len(batch)) if q not in bad_queries]
            batch, kept = batch.select(keep), [kept[q] for q in keep]
        cand_pos = torch.empty(len(c_order), dtype=torch.long)
        cand_pos[torch.tensor(c_order, dtype=torch.long)] = torch.arange(len(c_order))
        targets = cand_pos[torch.tensor(q_order, dtype=torch.long) * g]
        return PreparedBatch(
            query_chunks=q_chunks,
            cand_chunks=c_chunks,
            targets=targets,
            query_order=torch.tensor([kept[q] for q in q_order], dtype=torch.long),
            cand_order=torch.tensor([kept[c // g] * g + c % g for c in c_order], dtype=torch.long),
            subsets=[batch.subsets[q] for q in q_order],
            num_negatives=batch.num_negatives,
            skipped=skipped,
        )


# --------------------------------------------------------------------------------------------- eval


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


@dataclass
class EvalSet:
    """The rows of one MMEB-eval dataset, the image root they refer to, and its table entry (if known)."""

    name: str
    examples: list[EvalExample]
    image_root: Path | None
    info: EvalDatasetInfo | None
    bad_rows: BadRows = field(default_factory=BadRows)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> EvalExample:
        return self.examples[i]

    def query_image(self, i: int) -> Image.Image | None:
        ex = self.examples[i]
        return (
            load_image(ex.query_image, self.image_root, f"{ex.where} qry_img_path")
            if ex.query_image
            else None
        )

    def cand_image(self, i: int, j: int) -> Image.Image | None:
        ex = self.examples[i]
        path = ex.cand_images[j]
        return load_image(path, self.image_root, f"{ex.where} tgt_img_path[{j}]") if path else None


def _parse_eval_row(
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


def find_eval_source(root: str | os.PathLike, name: str) -> list[Path]:
    """The file(s) of eval dataset `name` under `root`: <name>.jsonl|.parquet|.arrow or a folder <name>/."""
    root = Path(root)
    for suffix in TABLE_SUFFIXES:
        if (root / f"{name}{suffix}").is_file():
            return [root / f"{name}{suffix}"]
    if (root / name).is_dir() and _table_files(root / name):
        return _table_files(root / name)
    raise FileNotFoundError(f"no {name}.jsonl / .parquet / .arrow or folder {name}/ in {root}")


def load_eval_dataset(
    source: str | os.PathLike,
    name: str,
    *,
    image_root: str | os.PathLike | None = None,
    image_token: str | None = None,
    max_rows: int | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = False,
    split: str = "test",
) -> EvalSet:
    """Read one MMEB-eval dataset (`qry_text, qry_img_path, tgt_text[], tgt_img_path[]`, ground truth
    at candidate 0) from a local directory, or a hub dataset (e.g. "TIGER-Lab/MMEB-eval") when `source`
    is not a local path. image_root defaults to the local directory."""
    bad = BadRows()
    path = Path(source).expanduser()
    if path.exists():
        root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
        files = [path] if path.is_file() else find_eval_source(path, name)
        sources = [(str(f), _iter_records(f)) for f in files]
    elif _is_hub_name(str(source)):
        root = Path(image_root) if image_root is not None else None
        sources = [(f"{source}[{name}/{split}]", _hub_rows(str(source), name, split, max_rows))]
    else:
        raise FileNotFoundError(f"eval data source {str(source)!r} is neither a local path nor a hub name")
    examples: list[EvalExample] = []
    checked: set[tuple[str, str | None]] = set()
    for src, records in sources:
        remaining = None if max_rows is None else max_rows - len(examples)
        if remaining == 0:
            break

        def parse(record: dict, where: str, row: int, _src: str = src) -> EvalExample:
            return _parse_eval_row(
                record, dataset=name, source=_src, row=row, image_token=image_token, image_root=root,
                check_images=check_images, checked=checked,
            )  # fmt: skip

        with _gc_paused():
            examples.extend(_collect(records, parse, remaining, skip_bad_rows, bad))
    if not examples:
        raise DataError(f"eval dataset {name!r} has no usable rows ({[s for s, _ in sources]})")
    return EvalSet(name, examples, root, EVAL_DATASET_INFO.get(name), bad)
