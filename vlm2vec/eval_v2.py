"""MMEB-V2 evaluation: `python -m vlm2vec.eval --benchmark mmeb-v2 --model M --data ROOT --out DIR`.

Per task (mmeb_v2.load_task): every distinct input (query or pool candidate, keyed by text + visual) is
embedded once, with the resumable on-disk cache and the rank sharding of embedding.py; then each query is
ranked against the whole deduplicated pool (`global` tasks) or its own candidates (`local`), and scored
with Hit@1 (image, video) or NDCG@5 with linear gain over graded relevance (visual documents): `score` as
the reference ranks (a tie with a later candidate is a hit), the same with ties as misses beside it
(score_task; docs/mmeb_v2_parity.md rows O and P). Every
task is read and checked before anything is embedded, and a backbone that cannot take a task's input
kind (video) is refused up front. Outputs: scores.json (per task and the group means) and table.md
(image / video / visdoc sub-groups, their means, overall).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm2vec import distributed
from vlm2vec.embedding import Encoder, Inputs, VisualInput, cache_root_of, embed_dataset, write_scores
from vlm2vec.errors import DataError
from vlm2vec.media import Frames, load_image, load_video
from vlm2vec.mmeb_v2 import V2Set, Visual, available_tasks, load_task, missing_tasks
from vlm2vec.scoring import (
    V2_COLUMNS,
    Prefixes,
    dims_table,
    label_metrics,
    reference_metrics,
    reference_ranking,
    v2_aggregate,
    v2_markdown_table,
)


def collect_v2_inputs(task_set: V2Set) -> tuple[Inputs, list[int], dict[str, int], list[str]]:
    """Distinct inputs of a task, the input index of each query and of each pool candidate (by name),
    and where each input comes from (the first row or candidate naming it, for error messages)."""
    index: dict[tuple[str, str], int] = {}
    texts: list[str] = []
    visuals: list[Visual | None] = []
    wheres: list[str] = []

    def index_of(text: str, visual: Visual | None, where: str) -> int:
        key = (text, visual.key() if visual else "")
        if key not in index:
            index[key] = len(texts)
            texts.append(text)
            visuals.append(visual)
            wheres.append(where)
        return index[key]

    queries = [index_of(r.query_text, r.query_visual, f"{r.where} query") for r in task_set.rows]
    pool = {name: index_of(text, v, f"candidate {name!r}") for name, (text, v) in task_set.pool.items()}
    return Inputs(texts, visuals, queries, []), queries, pool, wheres


def load_v2_visual(visual: Visual, where: str = "") -> VisualInput:
    """A Visual as encoder input: a PIL image, a list of them, or Frames (sampled per the task)."""
    label = where
    if visual.kind == "video":
        source = visual.paths[0] if len(visual.paths) == 1 else list(visual.paths)
        return Frames(load_video(source, visual.num_frames, where=label, extractor=visual.extractor))
    images = [load_image(p, None, label) for p in visual.paths]
    return images[0] if visual.kind == "image" else images


def score_task(
    task_set: V2Set, emb: torch.Tensor, queries: list[int], pool: dict[str, int]
) -> dict[str, Any]:
    """Rank and score one task from the embeddings of its distinct inputs (row i of `emb` = input i).

    `score` is the leaderboard's number: the reference's ranking (float32 dot products, ties in
    candidate order: a tie with a later candidate is a hit) and metric (Hit@1, or NDCG@5 with each
    label's own grade). Beside it: `score_ties_as_misses` (ours: a tie counts against the label) and,
    where graded labels make it differ, `ndcg_at_5_reference` (the reference's label/grade pairing bug,
    scoring.reference_metrics)."""
    task = task_set.task
    emb32 = emb.float().numpy()
    q = emb[queries].double()
    names = list(pool)
    position = {n: j for j, n in enumerate(names)}
    predictions: list[list[str]] = []
    if task.eval_type == "global":
        scores = q @ emb[[pool[n] for n in names]].double().T
        ranked = reference_ranking(emb32[queries] @ emb32[[pool[n] for n in names]].T)
        predictions = [[names[j] for j in row] for row in ranked]
        relevance = torch.zeros_like(scores)
        for i, row in enumerate(task_set.rows):
            for k, label in enumerate(row.labels):
                if label not in position:
                    raise ValueError(
                        f"task {task.name}, {row.where}: relevant candidate {label!r} is not in the pool"
                    )
                relevance[i, position[label]] = row.rel_scores[k] if row.rel_scores else 1.0
    else:
        width = max(len(r.cand_names) for r in task_set.rows)
        scores = torch.full((len(queries), width), float("-inf"), dtype=torch.float64)
        relevance = torch.zeros_like(scores)
        for i, row in enumerate(task_set.rows):
            index = [pool[n] for n in row.cand_names]
            scores[i, : len(row.cand_names)] = emb[index].double() @ q[i]
            order = reference_ranking(emb32[index] @ emb32[queries[i]])
            predictions.append([row.cand_names[j] for j in order])
            for k, label in enumerate(row.labels):
                if label not in row.cand_names:
                    raise ValueError(
                        f"task {task.name}, {row.where}: label {label!r} is not among its candidates"
                    )
                relevance[i, row.cand_names.index(label)] = row.rel_scores[k] if row.rel_scores else 1.0
    ours = label_metrics(scores, relevance, k=5)
    ref = reference_metrics(
        predictions, [r.labels for r in task_set.rows], [r.rel_scores for r in task_set.rows]
    )
    key = "hit_at_1" if task.metric == "hit@1" else "ndcg_at_5"
    result = {
        "score": ref[key],
        "hit_at_1": ref["hit_at_1"],
        "ndcg_at_5": ref["ndcg_at_5"],
        "score_ties_as_misses": ours[key],
        "hit_at_1_ties_as_misses": ours["hit_at_1"],
        "ndcg_at_5_ties_as_misses": ours["ndcg_at_5"],
        "mrr_ties_as_misses": ours["mrr"],
        "n_queries": ours["n_queries"],
        "metric": task.metric,
        "modality": task.modality,
        "group": task.group,
        "eval_type": task.eval_type,
        "n_candidates": len(pool) if task.eval_type == "global" else scores.shape[1],
        "name_collisions": task_set.name_collisions,
    }
    if ref["ndcg_at_5_reference"] != ref["ndcg_at_5"]:
        result["ndcg_at_5_reference"] = ref["ndcg_at_5_reference"]
    return result


def evaluate_v2(
    encode: Encoder,
    root: str,
    tasks: Sequence[str] | None = None,
    *,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    fingerprint: str = "unnamed-model",
    batch_size: int = 16,
    max_rows: int | None = None,
    use_cache: bool = True,
    label: str = "this model",
    show_progress: bool = True,
    check_inputs: Callable[[set[str], str], None] | None = None,
    dims: Sequence[int] | None = None,
    normalize: bool = True,
) -> dict[str, Any] | None:
    """Evaluate on MMEB-V2 tasks of a local copy; returns the scores on rank 0 (None elsewhere).
    check_inputs(kinds, where): raises for input kinds the model cannot take (family.check_inputs).
    dims (Matryoshka): each task also scored on the first d numbers of each embedding (re-normalised
    when `normalize`), under scores["dims"][str(d)] (tasks, aggregate); embedded once, as in eval_v1."""
    rank = distributed.rank()
    sets = {}
    for task in available_tasks(root, tasks):  # read and check everything before embedding anything
        task_set = load_task(root, task, max_rows=max_rows)
        if check_inputs is not None:
            try:
                check_inputs(task_set.input_kinds(), f"MMEB-V2 task {task.name}")
            except ValueError as err:  # the model cannot take this task's inputs: bad input, not a bug
                raise DataError(str(err)) from err
        sets[task.name] = task_set
    missing = [] if tasks else missing_tasks(root)
    if missing and rank == 0 and show_progress:
        print(f"MMEB-V2: {len(missing)} of 78 tasks have no data under {root} (listed in scores.json)",
              file=sys.stderr)  # fmt: skip
    cache_root = cache_root_of(cache_dir, out_dir, use_cache)
    results: dict[str, Any] = {}
    prefixes = Prefixes(dims, normalize)
    started = time.time()
    for name, task_set in sets.items():
        inputs, queries, pool, wheres = collect_v2_inputs(task_set)

        def load(visual: Visual, i: int, _name: str = name, _wheres: list[str] = wheres) -> VisualInput:
            return load_v2_visual(visual, f"task {_name}, {_wheres[i]}")

        done = embed_dataset(
            inputs, encode, load, cache_dir=cache_root / name if cache_root else None,
            fingerprint=fingerprint, batch_size=batch_size,
            desc=f"{name} ({len(inputs.texts)} distinct inputs)", show_progress=show_progress,
        )  # fmt: skip
        if rank == 0:
            emb = torch.stack([done[i] for i in range(len(inputs.texts))])
            results[name] = {
                **score_task(task_set, emb, queries, pool),
                "n_distinct_inputs": len(inputs.texts),
            }
            for d, prefix in prefixes.tables(emb):
                prefixes.results[d][name] = score_task(task_set, prefix, queries, pool)
            if out_dir is not None:
                write_v2_outputs(out_dir, results, label, root, started, missing, prefixes)
    if rank != 0:
        return None
    return v2_summary(results, label, root, started, missing, prefixes)


def _v2_aggregate(results: dict[str, Any]) -> dict[str, Any]:
    return v2_aggregate(
        {n: r["score"] for n, r in results.items()},
        {n: r["modality"] for n, r in results.items()},
        {n: r["group"] for n, r in results.items()},
    )


def v2_summary(
    results: dict[str, Any],
    label: str,
    root: str,
    started: float,
    missing: Sequence[str] = (),
    prefixes: Prefixes | None = None,
) -> dict[str, Any]:
    agg = _v2_aggregate(results)
    return {
        "model": label,
        "data": str(root),
        "benchmark": "mmeb-v2",
        "metric": "score per task as the reference (VLM2Vec eval.py + RankingMetrics): hit@1 (image, video) "
        "or ndcg@5 with linear gain (visdoc), candidates ranked by a stable argsort (a tie with a later "
        "candidate is a hit); *_ties_as_misses: a tie counts against the label; ndcg_at_5_reference (where "
        "present): the reference's label/grade pairing",
        "tasks": results,
        "missing_tasks": list(missing),
        "aggregate": agg,
        **(prefixes.summary(lambda r: {"tasks": r, "aggregate": _v2_aggregate(r)}) if prefixes else {}),
        "seconds": round(time.time() - started, 1),
    }


def render_v2_report(scores: dict[str, Any]) -> str:
    lines = [
        "| Task | Modality | Group | Ranking | Metric | Score | Ties as misses | NDCG@5 (reference pairing) "
        "| Queries | Candidates |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in scores["tasks"].items():
        cells = [name, r["modality"], r["group"], r["eval_type"], r["metric"], f"{100 * r['score']:.1f}"]
        cells.append(
            f"{100 * r['score_ties_as_misses']:.1f}" if r["score_ties_as_misses"] != r["score"] else "="
        )
        cells.append(f"{100 * r['ndcg_at_5_reference']:.1f}" if "ndcg_at_5_reference" in r else "=")
        lines.append("| " + " | ".join(cells + [str(r["n_queries"]), str(r["n_candidates"])]) + " |")
    intro = (
        f"Data: `{scores['data']}` ({len(scores['tasks'])} tasks). Scores in %: Hit@1 for image and video "
        "tasks, NDCG@5 (linear gain) for visual documents, ranked as the reference ranks (a tie with a later "
        "candidate is a hit); group columns are means over the tasks present. `Ties as misses`: the same "
        "metric when a tie counts against the label; `NDCG@5 (reference pairing)`: the reference's number "
        "where its label/grade pairing changes it; `=`: no difference."
    )
    missing = scores.get("missing_tasks") or []
    absent = f"\n\nNo data for {len(missing)} tasks: {', '.join(missing)}." if missing else ""
    return (
        f"# MMEB-V2 evaluation: {scores['model']}\n\n{intro}{absent}\n\n"
        + v2_markdown_table({scores["model"]: scores["aggregate"]})
        + "\n## Per task\n\n"
        + "\n".join(lines)
        + "\n"
        + v2_dims_report(scores)
    )


def v2_dims_report(scores: dict[str, Any]) -> str:
    """The table.md section of an evaluation with dims: each task's score and each group mean (%), a
    column per embedding size; '' without dims."""
    if not scores.get("dims"):
        return ""
    by_dim = [scores["dims"][d] for d in scores["dims"]] + [scores]
    rows = [([n], [s["tasks"][n]["score"] for s in by_dim]) for n in scores["tasks"]]
    groups = [f"{m}/{g}" for m, gs in V2_COLUMNS.items() for g in gs] + [*V2_COLUMNS, "Overall"]
    present = [k for k in groups if k in scores["aggregate"]]
    rows += [([f"**{k}**"], [s["aggregate"][k]["mean"] for s in by_dim]) for k in present]
    return (
        f"\n## By embedding size\n\nScore (%) of the first d numbers of each embedding "
        f"({scores['dims_scoring']}); the last column is the whole embedding, as above.\n\n"
        + dims_table(["Task"], [int(d) for d in scores["dims"]], scores["embedding_dim"], rows)
    )


def write_v2_outputs(
    out_dir: str | Path,
    results: dict,
    label: str,
    root: str,
    started: float,
    missing: Sequence[str] = (),
    prefixes: Prefixes | None = None,
) -> dict:
    scores = v2_summary(results, label, root, started, missing, prefixes)
    write_scores(out_dir, scores, render_v2_report(scores))
    return scores
