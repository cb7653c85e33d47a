"""Finding a hub dataset's rows on disk by config and split, as `load_dataset(repo, config, split=...)`
would give them, and refusing when they are not there.

A dataset folder may hold the data in any of the forms the hub and `datasets` write:

    <folder>/<config>/<split>-00000-of-00001.parquet     a hub snapshot (huggingface-cli download)
    <folder>/<config>/[<split>/]data-00000-of-00001.arrow  `save_to_disk` of a Dataset / DatasetDict
    <folder>/<config>.parquet|jsonl, <folder>/<split>.jsonl  single files

Without a config every table file under the folder is a candidate. Files are then narrowed to those
naming the split (a folder or a file-name prefix); files that name no split at all are taken as the
split's. A missing folder, config or split is a DataError naming the task and what was looked for,
never a fallback to other files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vlm2vec.data.errors import DataError
from vlm2vec.data.tables import iter_records

TABLE_SUFFIXES = (".parquet", ".jsonl", ".arrow")
SPLIT_NAMES = ("train", "test", "val", "validation", "dev")


def _split_of(rel: Path) -> str | None:
    for part in [*rel.parent.parts, rel.stem]:
        for split in SPLIT_NAMES:
            if part == split or part.startswith(f"{split}-"):
                return split
    return None


def locate(folder: Path, what: str, config: str | None, split: str) -> list[Path]:
    """The table files of `config` / `split` under `folder` (sorted); DataError when there are none."""
    if not folder.is_dir():
        raise DataError(f"{what}: data folder not found: {folder}")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in TABLE_SUFFIXES
        and not p.name.startswith("cache-")  # `datasets` map caches beside save_to_disk files
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if config is not None:
        files = [p for p in files if config in p.relative_to(folder).parent.parts or p.stem == config]
        if not files:
            raise DataError(
                f"{what}: no files of config {config!r} under {folder} (looked for {folder}/{config}/... "
                f"or {folder}/{config}.parquet|jsonl)"
            )
    if not files:
        raise DataError(f"{what}: no {'/'.join(TABLE_SUFFIXES)} files under {folder}")
    rel = {p: p.relative_to(folder) for p in files}
    named = [p for p in files if _split_of(rel[p]) == split]
    if named:
        return named
    others = sorted({s for p in files if (s := _split_of(rel[p])) is not None})
    if others:
        raise DataError(
            f"{what}: no {split!r} split under {folder}{f' (config {config!r})' if config else ''}; "
            f"the files there name only {others}"
        )
    return files


def task_records(folder: Path, what: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    """(where, record) of every row of a config / split, files in sorted order."""
    for f in locate(folder, what, config, split):
        for where, record, problem in iter_records(f):
            if problem is not None:
                raise DataError(f"{where}: {problem}")
            yield where, record


def get(record: dict, column: str, where: str) -> object:
    """A column of a row; DataError naming the row and the columns it has otherwise."""
    if column not in record:
        raise DataError(f"{where}: missing column {column!r} (row has {sorted(record)})")
    return record[column]
