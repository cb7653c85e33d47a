"""Eval data: one MMEB-eval dataset from a local directory or the hub -> `EvalSet` (checked rows, ground
truth at candidate 0, images loaded on demand).

Eval directory: `<dataset>.jsonl`, `<dataset>.parquet`, `<dataset>.arrow` or a folder `<dataset>/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlm2vec.data.errors import BadRows, DataError
from vlm2vec.data.rows import EvalExample, collect_rows, parse_eval_row
from vlm2vec.data.tables import TABLE_SUFFIXES, gc_paused, hub_rows, is_hub_name, iter_records, table_files
from vlm2vec.media import load_image
from vlm2vec.mmeb_tables import EVAL_DATASET_INFO, EvalDatasetInfo


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


def find_eval_source(root: str | os.PathLike, name: str) -> list[Path]:
    """The file(s) of eval dataset `name` under `root`: <name>.jsonl|.parquet|.arrow or a folder <name>/."""
    root = Path(root)
    for suffix in TABLE_SUFFIXES:
        if (root / f"{name}{suffix}").is_file():
            return [root / f"{name}{suffix}"]
    if (root / name).is_dir() and table_files(root / name):
        return table_files(root / name)
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
        sources = [(str(f), iter_records(f)) for f in files]
    elif is_hub_name(str(source)):
        root = Path(image_root) if image_root is not None else None
        sources = [(f"{source}[{name}/{split}]", hub_rows(str(source), name, split, max_rows))]
    else:
        raise FileNotFoundError(f"eval data source {str(source)!r} is neither a local path nor a hub name")
    examples: list[EvalExample] = []
    checked: set[tuple[str, str | None]] = set()
    for src, records in sources:
        remaining = None if max_rows is None else max_rows - len(examples)
        if remaining == 0:
            break

        def parse(record: dict, where: str, row: int, _src: str = src) -> EvalExample:
            return parse_eval_row(
                record, dataset=name, source=_src, row=row, image_token=image_token, image_root=root,
                check_images=check_images, checked=checked,
            )  # fmt: skip

        with gc_paused():
            examples.extend(collect_rows(records, parse, remaining, skip_bad_rows, bad))
    if not examples:
        raise DataError(f"eval dataset {name!r} has no usable rows ({[s for s, _ in sources]})")
    return EvalSet(name, examples, root, EVAL_DATASET_INFO.get(name), bad)
