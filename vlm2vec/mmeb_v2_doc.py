"""MMEB-V2 visual-document tasks (24) as the reference reads them (VLM2Vec src/data/eval_dataset/
vidore_dataset.py, visrag_dataset.py, src/utils/dataset_utils.py:load_qrels_mapping): the hub dataset's
BEIR configs `queries` (query-id, query), `corpus` (corpus-id, image) and `qrels` (query-id, corpus-id,
score), one split. Every corpus page is a candidate (global ranking); a query's relevant pages are its
qrels with score > 0 (the higher score where a pair repeats), in qrels order, with the score as graded
relevance. The pool is ordered as the reference's: the pages the queries name first, then the corpus.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from vlm2vec.data.errors import DataError
from vlm2vec.mmeb_tables import IMAGE_PLACEHOLDER as IMG
from vlm2vec.mmeb_v2_files import get, task_records
from vlm2vec.mmeb_v2_rows import CandidatePool, V2Row, V2Task, Visual

DOC_QUERY = "Find a document image that matches the given query:"
DOC_TARGET = f"{IMG} Understand the content of the provided document image."


def _page_path(root: Path, task: V2Task, corpus_id: str, image: object, where: str) -> str:
    """A corpus page as an image file: a path is used as is; bytes (the hub's Image feature) are written
    once to <data>/pages/<corpus-id>.png (temp file + rename: never half-written)."""
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


def read_beir(root: Path, task: V2Task, pool: CandidatePool) -> list[V2Row]:
    base = root / task.data
    pages: dict[str, Visual] = {}
    for where, rec in task_records(base, f"{task.name} corpus", "corpus", task.split):
        cid = str(get(rec, "corpus-id", where))
        pages[cid] = Visual("images", (_page_path(root, task, cid, get(rec, "image", where), where),))
    qrels: dict[str, dict[str, float]] = {}
    for where, rec in task_records(base, f"{task.name} qrels", "qrels", task.split):
        score = float(get(rec, "score", where))  # type: ignore[arg-type]
        cid = str(get(rec, "corpus-id", where))
        if score > 0:
            if cid not in pages:
                raise DataError(f"{where}: corpus-id {cid!r} is not in the corpus")
            q = qrels.setdefault(str(get(rec, "query-id", where)), {})
            q[cid] = max(q.get(cid, 0.0), score)
    rows = []
    for k, (where, rec) in enumerate(task_records(base, f"{task.name} queries", "queries", task.split)):
        if task.max_rows is not None and k >= task.max_rows:
            break
        qid = str(get(rec, "query-id", where))
        if qid not in qrels:  # the reference fails here too (a KeyError in data_prepare)
            raise DataError(f"{where}: query-id {qid!r} has no qrels with score > 0")
        labels = [pool.add(c, DOC_TARGET, pages[c]) for c in qrels[qid]]
        text = f"{DOC_QUERY} {get(rec, 'query', where)}"
        rows.append(V2Row(text, None, labels, labels, [qrels[qid][c] for c in labels], where))
    for cid, visual in pages.items():
        pool.add(cid, DOC_TARGET, visual)
    return rows
