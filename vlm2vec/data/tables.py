"""Row records from files and the hub: .jsonl/.parquet/.arrow tables (.arrow: what
`datasets.save_to_disk` writes), the subset files of a train directory, and hub datasets.

Records come as (where, record, problem), so a bad row is reported with its file and row."""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlm2vec.data.errors import DataError

TABLE_SUFFIXES = (".jsonl", ".parquet", ".arrow")


def iter_records(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
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


def table_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES)


def _matches_split(rel: Path, split: str) -> bool:
    parts = [*rel.parent.parts, rel.name[: -len(rel.suffix)]]
    return any(part == split or part.startswith(split + "-") for part in parts)


def subset_files(root: Path, split: str | None) -> dict[str, list[Path]]:
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
            files = table_files(entry)
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


def is_hub_name(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def hub_rows(name: str, config: str, split: str, limit: int | None) -> Iterator[tuple[str, dict, None]]:
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
def gc_paused() -> Iterator[None]:
    """Reading builds millions of small objects; the cyclic GC rescanning them doubles the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
