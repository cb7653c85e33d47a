"""MMEB (V1) evaluation: the 36 image datasets, Precision@1 per dataset, meta-task, IND/OOD and overall.

Per dataset: read the rows (data.load_eval_dataset), check them and collect their *distinct* (text,
image) inputs (candidates repeat across queries), embed those once (embedding.py: resumable cache, rank
sharding), score each query against its own candidates (ground truth first) and write the metrics
(scoring.py): `scores.json` + `table.md` (paper layout, with the paper's VLM2Vec rows for reference),
rewritten after every dataset so partial results survive an interruption. Run from the command line
with `python -m vlm2vec.eval` (eval.py); `evaluate` is the library entry (also used in training).

Tie handling: see scoring.py (ties count against the ground truth; the reference's count, ties as
hits, is reported beside it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm2vec import distributed
from vlm2vec.data import TABLE_SUFFIXES, DataError, EvalSet, load_eval_dataset
from vlm2vec.embedding import Encoder, Inputs, cache_root_of, embed_dataset, write_scores
from vlm2vec.media import load_image
from vlm2vec.mmeb_tables import EVAL_DATASET_INFO, MMEB_EVAL_DATASETS
from vlm2vec.scoring import (
    Prefixes,
    aggregate,
    dataset_metrics,
    dims_table,
    markdown_table,
    per_dataset_table,
    rank_candidates,
)

HUB_EVAL_NAME = "TIGER-Lab/MMEB-eval"
DATASET_META_FILE = "datasets.json"
"""Optional file in a local eval directory: {"<dataset>": {"meta_task": ..., "ood": bool}} for datasets
that are not in the MMEB table (e.g. the emoji demo); MMEB names need nothing."""


def dataset_names(data: str, requested: Sequence[str] | None = None) -> list[str]:
    """The datasets to evaluate: `requested`, else every table file / dataset folder of a local
    directory (sorted), else the 36 MMEB datasets (hub name)."""
    if requested:
        return list(requested)
    path = Path(data).expanduser()
    if path.is_dir():
        names = sorted(
            {
                p.stem if p.is_file() else p.name
                for p in path.iterdir()
                if (p.is_file() and p.suffix in TABLE_SUFFIXES)
                or (p.is_dir() and any(f.suffix in TABLE_SUFFIXES for f in p.rglob("*")))
            }
        )
        if not names:
            raise FileNotFoundError(f"--data {data}: no <dataset>.jsonl / .parquet / .arrow files or folders")
        return names
    if path.is_file():
        return [path.stem]
    return [d.name for d in MMEB_EVAL_DATASETS]


def dataset_meta(data: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """meta_task and split (IND/OOD) per dataset: the MMEB table, overridden by a local datasets.json."""
    extra: dict[str, Any] = {}
    meta_file = Path(data).expanduser() / DATASET_META_FILE
    if meta_file.is_file():
        extra = json.loads(meta_file.read_text(encoding="utf-8"))
    out = {}
    for name in names:
        info = EVAL_DATASET_INFO.get(name)
        entry: dict[str, Any] = {"meta_task": info.meta_task, "ood": info.ood} if info else {}
        entry.update(extra.get(name, {}))
        out[name] = {"meta_task": entry.get("meta_task"), "ood": entry.get("ood")}
    return out


def collect_inputs(eval_set: EvalSet, *, allow_ragged: bool = False, check_images: bool = True) -> Inputs:
    """Deduplicate a dataset's query and candidate inputs by (text, image path) and check its rows:
    every row needs candidates, (unless allow_ragged) as many as row 0, and every image must exist
    (checked once per distinct path). Errors name the dataset and the row."""
    key_to_index: dict[tuple[str, str | None], int] = {}
    texts: list[str] = []
    images: list[str | None] = []
    root = Path(eval_set.image_root) if eval_set.image_root is not None else None

    def index_of(text: str, image: str | None, row: int, where: str, what: str) -> int:
        key = (text, image)
        if key not in key_to_index:
            if image is not None and check_images:
                path = Path(image) if root is None or Path(image).is_absolute() else root / image
                if not path.is_file():
                    raise ValueError(
                        f"dataset {eval_set.name!r}, row {row} ({where}): {what} image not found: {path}"
                    )
            key_to_index[key] = len(texts)
            texts.append(text)
            images.append(image)
        return key_to_index[key]

    query_index, cand_index = [], []
    expected = None
    for i, ex in enumerate(eval_set.examples):
        n = len(ex.cand_texts)
        if n == 0:
            raise ValueError(f"dataset {eval_set.name!r}, row {i} ({ex.where}): empty candidate list")
        if expected is None:
            expected = n
        elif n != expected and not allow_ragged:
            raise ValueError(
                f"dataset {eval_set.name!r}, row {i} ({ex.where}): {n} candidates, but row 0 has {expected}; "
                "MMEB rows of one dataset rank the same number of candidates (pass --allow-ragged-candidates "
                "if this dataset's label sets really differ in size)"
            )
        query_index.append(index_of(ex.query_text, ex.query_image, i, ex.where, "query"))
        cand_index.append(
            [
                index_of(t, p, i, ex.where, f"candidate {j}")
                for j, (t, p) in enumerate(zip(ex.cand_texts, ex.cand_images))
            ]
        )
    return Inputs(texts, images, query_index, cand_index)


def embedding_table(inputs: Inputs, emb: dict[int, torch.Tensor], name: str) -> torch.Tensor:
    """[n_inputs, D]: row i = the embedding of distinct input i."""
    missing = [i for i in range(len(inputs.texts)) if i not in emb]
    if missing:
        raise RuntimeError(
            f"dataset {name!r}: {len(missing)} inputs have no embedding (first: input {missing[0]})"
        )
    return torch.stack([emb[i] for i in range(len(inputs.texts))])


def score_dataset(inputs: Inputs, emb: dict[int, torch.Tensor] | torch.Tensor, name: str) -> dict[str, Any]:
    """The metrics of one dataset from its distinct inputs' embeddings (a table or index -> row)."""
    table = emb if isinstance(emb, torch.Tensor) else embedding_table(inputs, emb, name)
    ranks = rank_candidates(table[inputs.query_index], table, inputs.cand_index)
    return dataset_metrics(ranks)


def evaluate(
    encode: Encoder,
    data: str,
    datasets: Sequence[str] | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str = "unnamed-model",
    batch_size: int = 16,
    max_rows: int | None = None,
    image_root: str | None = None,
    allow_ragged: bool = False,
    use_cache: bool = True,
    label: str = "this model",
    show_progress: bool = True,
    shard: bool = True,
    dims: Sequence[int] | None = None,
    normalize: bool = True,
) -> dict[str, Any] | None:
    """Evaluate an encoder on MMEB-format data; returns the scores dict on rank 0 (None elsewhere) and,
    with out_dir, writes scores.json and table.md there. `encode(texts, images) -> [N, D]`.

    dims (Matryoshka): also score the first d numbers of each embedding, re-normalised when
    `normalize` (the model's own setting), for each d; under scores["dims"][str(d)] (datasets and
    aggregate, as the full embedding's at the top level, which stay as without dims). Embedding
    happens once: the full embeddings (and the cache) serve every d.

    Multi-process: call on every rank after `torch.distributed` is initialised; the ranks split the
    embedding work and rank 0 scores. cache_dir (default out_dir/embeddings; none with use_cache=False)
    holds resumable parts. shard=False: every rank embeds every input in the same order (a model whose
    forward passes are collectives, e.g. ZeRO-3 partitioned weights; no cache then)."""
    rank = distributed.rank()
    names = dataset_names(data, datasets)
    meta = dataset_meta(data, names)
    cache_root = cache_root_of(cache_dir, out_dir, use_cache)
    results: dict[str, Any] = {}
    prefixes = Prefixes(dims, normalize)
    started = time.time()
    for name in names:
        try:
            eval_set = load_eval_dataset(data, name, image_root=image_root, max_rows=max_rows)
        except DataError as err:
            raise DataError(f"dataset {name!r}: {err}") from err
        inputs = collect_inputs(eval_set, allow_ragged=allow_ragged)

        def load(path: str, i: int, _set: EvalSet = eval_set) -> Image.Image:
            return load_image(path, _set.image_root, f"dataset {_set.name!r}, input {i}")

        done = embed_dataset(
            inputs, encode, load, cache_dir=cache_root / name if cache_root else None,
            fingerprint=fingerprint, batch_size=batch_size, shard=shard,
            desc=f"{name} ({len(inputs.texts)} distinct inputs)", show_progress=show_progress,
        )  # fmt: skip
        if rank == 0:
            table = embedding_table(inputs, done, name)
            where = {
                "meta_task": meta[name]["meta_task"],
                "split": None if meta[name]["ood"] is None else ("OOD" if meta[name]["ood"] else "IND"),
            }
            results[name] = {
                **score_dataset(inputs, table, name),
                **where,
                "n_distinct_inputs": len(inputs.texts),
            }
            for d, prefix in prefixes.tables(table):
                prefixes.results[d][name] = {**score_dataset(inputs, prefix, name), **where}
            if out_dir is not None:  # partial results survive an interruption
                _write_outputs(out_dir, results, meta, label, data, started, prefixes)
    if rank != 0:
        return None
    return _summary(results, meta, label, data, started, prefixes)


def _aggregate(results: dict, meta: dict) -> dict[str, Any]:
    names = list(results)
    agg = {
        key: {"p_at_1": v["mean"], "n_datasets": v["n"]}
        for key, v in aggregate(
            {n: results[n]["p_at_1"] for n in names},
            {n: meta[n]["meta_task"] for n in names},
            {n: meta[n]["ood"] for n in names},
        ).items()
    }
    agg_ties = aggregate(
        {n: results[n]["p_at_1_ties_as_hits"] for n in names},
        {n: meta[n]["meta_task"] for n in names},
        {n: meta[n]["ood"] for n in names},
    )
    for key, v in agg_ties.items():
        agg[key]["p_at_1_ties_as_hits"] = v["mean"]
    return agg


def _summary(
    results: dict, meta: dict, label: str, data: str, started: float, prefixes: Prefixes | None = None
) -> dict[str, Any]:
    return {
        "model": label,
        "data": data,
        "metric": "precision@1 (ties count as misses; p_at_1_ties_as_hits = the reference's argmax count)",
        "datasets": results,
        "aggregate": _aggregate(results, meta),
        **(prefixes.summary(lambda r: {"datasets": r, "aggregate": _aggregate(r, meta)}) if prefixes else {}),
        "seconds": round(time.time() - started, 1),
    }


def summary_row(scores: dict[str, Any], key: str = "p_at_1") -> dict[str, float]:
    """{column: P@1 in %} of a scores dict, for markdown_table."""
    return {col: 100 * v[key] for col, v in scores["aggregate"].items() if key in v}


def _write_outputs(
    out_dir: str | os.PathLike,
    results: dict,
    meta: dict,
    label: str,
    data: str,
    started: float,
    prefixes: Prefixes | None = None,
) -> dict[str, Any]:
    scores = _summary(results, meta, label, data, started, prefixes)
    write_scores(out_dir, scores, render_report(scores))
    return scores


def render_report(scores: dict[str, Any]) -> str:
    """table.md: the paper-layout summary (ours, the reference's tie count if it differs, the paper's
    VLM2Vec rows) and the per-dataset table."""
    rows = {scores["model"]: summary_row(scores)}
    lenient = summary_row(scores, "p_at_1_ties_as_hits")
    if lenient != rows[scores["model"]]:
        rows[f"{scores['model']} (ties counted as hits, as the reference)"] = lenient
    n_sets = len(scores["datasets"])
    return (
        f"# MMEB evaluation: {scores['model']}\n\nData: `{scores['data']}` ({n_sets} datasets). "
        "Precision@1 (%); a score tie with the ground truth counts as a miss. Overall = mean over "
        "datasets; the paper's rows are over all 36 MMEB datasets.\n\n"
        + markdown_table(rows)
        + "\n## Per dataset\n\n"
        + per_dataset_table(scores["datasets"])
        + dims_report(scores)
    )


def dims_report(scores: dict[str, Any], key: str = "p_at_1") -> str:
    """The table.md section of an evaluation with dims: P@1 (%) per dataset and per summary column, a
    column per embedding size; '' without dims."""
    if not scores.get("dims"):
        return ""
    by_dim = [scores["dims"][d] for d in scores["dims"]] + [scores]
    rows = [([n], [s["datasets"][n][key] for s in by_dim]) for n in scores["datasets"]]
    rows += [([f"**{c}**"], [s["aggregate"][c][key] for s in by_dim]) for c in scores["aggregate"]]
    return (
        f"\n## By embedding size\n\nP@1 (%) of the first d numbers of each embedding "
        f"({scores['dims_scoring']}); the last column is the whole embedding, as above.\n\n"
        + dims_table(["Dataset"], [int(d) for d in scores["dims"]], scores["embedding_dim"], rows)
    )
