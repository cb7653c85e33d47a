"""Training data: a local train file or directory, or a hub dataset -> `TrainData` (checked rows per
subset, caps applied); several sources mixed with weights (`load_train_mix`).

Local layout of a train directory (one file or one folder per subset; subset name = file stem or
folder name; folders are searched recursively, files read in sorted order)::

    train/
      CIRR.jsonl                          # subset "CIRR"
      MSCOCO_i2t.parquet                  # subset "MSCOCO_i2t"
      VOC2007/                            # subset "VOC2007" (e.g. the hub mirror layout)
        original-00000-of-00001.parquet   #   split "original"
        diverse_instruction-00000-of-00001.parquet
      images/...                          # image paths are relative to `image_root` (default: train/)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from vlm2vec.data.errors import BadRows, DataError
from vlm2vec.data.rows import TrainExample, collect_rows, parse_train_row
from vlm2vec.data.tables import gc_paused, hub_rows, is_hub_name, iter_records, subset_files
from vlm2vec.mmeb_tables import MMEB_TRAIN_SUBSETS


@dataclass
class TrainData:
    """Validated training rows per subset, plus what batches need to load images and pick negatives."""

    subsets: dict[str, list[TrainExample]]
    image_root: Path | None
    num_negatives: int = 0
    missing_negatives: Literal["mask", "error", "sample"] = "mask"
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
    missing_negatives: Literal["mask", "error", "sample"] = "mask",
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
        return parse_train_row(
            record, subset=subset, source=str(path), row=row, image_token=image_token,
            num_negatives=num_negatives, missing_negatives=missing_negatives, image_root=root,
            check_images=check_images,
        )  # fmt: skip

    with gc_paused():
        return collect_rows(iter_records(path), parse, max_rows, skip_bad_rows, bad_rows or BadRows())


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
    missing_negatives: Literal["mask", "error", "sample"] = "mask",
    skip_bad_rows: bool = False,
    check_images: bool = False,
    num_frames: int | None = 8,
) -> TrainData:
    """Read MMEB-train rows from a local file/directory (layout in the module docstring) or, when
    `source` is not a local path, a hub dataset name (e.g. "TIGER-Lab/MMEB-train", split "original").

    num_sample_per_subset: keep the first N valid rows of each subset (int, or per-subset dict).
    num_negatives: K hard negatives per query; a row with fewer trains on the ones it has
      (missing_negatives="mask": a shorter candidate group, never padded), raises ("error") or is
      filled at batch time with positives of other rows of the same subset ("sample").
    image_root: where image paths are relative to (default: the source directory / file's folder).
    check_images: test at read time that every image file exists (otherwise found when loaded).
    num_frames: frames sampled per video row (uniformly by index; None: every frame).
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    if missing_negatives not in ("mask", "error", "sample"):
        raise ValueError(f"missing_negatives must be 'mask', 'error' or 'sample', got {missing_negatives!r}")
    bad = BadRows()
    path = Path(source).expanduser()
    if path.exists():
        files = subset_files(path, split)
        root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
        wanted = list(subsets) if subsets is not None else list(files)
        unknown = [s for s in wanted if s not in files]
        if unknown:
            raise ValueError(f"subsets {unknown} not found in {path}; found: {sorted(files)}")
        sources = {name: [(str(f), iter_records(f)) for f in files[name]] for name in wanted}
    elif is_hub_name(str(source)):
        root = Path(image_root) if image_root is not None else None
        wanted = list(subsets) if subsets is not None else list(MMEB_TRAIN_SUBSETS)
        hub_split = split or "original"
        sources = {
            name: [
                (f"{source}[{name}/{hub_split}]",
                 hub_rows(str(source), name, hub_split, _cap_for(num_sample_per_subset, name)))
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
                return parse_train_row(
                    record, subset=_name, source=_src, row=row, image_token=image_token,
                    num_negatives=num_negatives, missing_negatives=missing_negatives, image_root=root,
                    check_images=check_images,
                )  # fmt: skip

            with gc_paused():
                rows.extend(collect_rows(records, parse, remaining, skip_bad_rows, bad))
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
