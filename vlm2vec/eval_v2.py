"""MMEB-V2 evaluation: `python -m vlm2vec.eval --benchmark mmeb-v2 --model M --data ROOT --out DIR`.

Per task (mmeb_v2.load_task): every distinct input (query or pool candidate, keyed by text + visual) is
embedded once, with the resumable on-disk cache and the rank sharding of eval.py; then each query is
ranked against the whole deduplicated pool (`global` tasks) or its own candidates (`local`), and scored
with Hit@1 (image, video) or NDCG@5 with linear gain over graded relevance (visual documents). Every
task is read and checked before anything is embedded, and a backbone that cannot take a task's input
kind (video) is refused up front. Outputs: scores.json (per task and the group means) and table.md
(image / video / visdoc sub-groups, their means, overall).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm2vec.eval import (
    EmbeddingCache,
    Encoder,
    Inputs,
    _barrier,
    _dist_rank_world,
    _gather_to_rank0,
    embed_inputs,
)
from vlm2vec.media import Frames, load_video
from vlm2vec.mmeb_v2 import V2Set, Visual, available_tasks, load_task
from vlm2vec.scoring import label_metrics, v2_aggregate, v2_markdown_table


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


def load_visual(visual: Visual, where: str = "") -> Any:
    """A Visual as encoder input: a PIL image, a list of them, or Frames (sampled per the task)."""
    from vlm2vec.data import load_image

    label = where
    if visual.kind == "video":
        source = visual.paths[0] if len(visual.paths) == 1 else list(visual.paths)
        return Frames(load_video(source, visual.num_frames, where=label))
    images = [load_image(p, None, label) for p in visual.paths]
    return images[0] if visual.kind == "image" else images


def score_task(
    task_set: V2Set, emb: torch.Tensor, queries: list[int], pool: dict[str, int]
) -> dict[str, Any]:
    """Rank and score one task from the embeddings of its distinct inputs (row i of `emb` = input i)."""
    task = task_set.task
    q = emb[queries].double()
    if task.eval_type == "global":
        names = list(pool)
        position = {n: j for j, n in enumerate(names)}
        scores = q @ emb[[pool[n] for n in names]].double().T
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
            cands = emb[[pool[n] for n in row.cand_names]].double()
            scores[i, : len(row.cand_names)] = cands @ q[i]
            for k, label in enumerate(row.labels):
                if label not in row.cand_names:
                    raise ValueError(
                        f"task {task.name}, {row.where}: label {label!r} is not among its candidates"
                    )
                relevance[i, row.cand_names.index(label)] = row.rel_scores[k] if row.rel_scores else 1.0
    metrics = label_metrics(scores, relevance, k=5)
    key = "hit_at_1" if task.metric == "hit@1" else "ndcg_at_5"
    return {
        **metrics,
        "score": metrics[key],
        "metric": task.metric,
        "modality": task.modality,
        "group": task.group,
        "eval_type": task.eval_type,
        "n_candidates": len(pool) if task.eval_type == "global" else scores.shape[1],
    }


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
) -> dict[str, Any] | None:
    """Evaluate on MMEB-V2 tasks of a local copy; returns the scores on rank 0 (None elsewhere).
    check_inputs(kinds, where): raises for input kinds the model cannot take (family.check_inputs)."""
    rank, world_size = _dist_rank_world()
    sets = {}
    for task in available_tasks(root, tasks):  # read and check everything before embedding anything
        task_set = load_task(root, task, max_rows=max_rows)
        if check_inputs is not None:
            check_inputs(task_set.input_kinds(), f"MMEB-V2 task {task.name}")
        sets[task.name] = task_set
    if cache_dir is None and out_dir is not None:
        cache_dir = Path(out_dir) / "embeddings"
    results: dict[str, Any] = {}
    started = time.time()
    for name, task_set in sets.items():
        inputs, queries, pool, wheres = collect_v2_inputs(task_set)
        cache = None
        if use_cache and cache_dir is not None:
            cache = EmbeddingCache(Path(cache_dir) / name, fingerprint, inputs.digest(), len(inputs.texts))
            if rank == 0:
                cache.prepare()
            _barrier(world_size)

        def load(visual: Visual, i: int, _name: str = name, _wheres: list[str] = wheres) -> Any:
            return load_visual(visual, f"task {_name}, {_wheres[i]}")

        done = embed_inputs(
            inputs, encode, load, cache=cache, batch_size=batch_size, rank=rank, world_size=world_size,
            desc=f"{name} ({len(inputs.texts)} distinct inputs)", show_progress=show_progress,
        )  # fmt: skip
        _barrier(world_size)
        done = _gather_to_rank0(done, rank, world_size)
        if rank == 0:
            emb = torch.stack([done[i] for i in range(len(inputs.texts))])
            results[name] = {
                **score_task(task_set, emb, queries, pool),
                "n_distinct_inputs": len(inputs.texts),
            }
            if out_dir is not None:
                write_v2_outputs(out_dir, results, label, root, started)
    if rank != 0:
        return None
    return v2_summary(results, label, root, started)


def v2_summary(results: dict[str, Any], label: str, root: str, started: float) -> dict[str, Any]:
    agg = v2_aggregate(
        {n: r["score"] for n, r in results.items()},
        {n: r["modality"] for n, r in results.items()},
        {n: r["group"] for n, r in results.items()},
    )
    return {
        "model": label,
        "data": str(root),
        "benchmark": "mmeb-v2",
        "metric": "per task: hit@1 (image, video) or ndcg@5 with linear gain (visdoc); ties count against "
        "the relevant candidates",
        "tasks": results,
        "aggregate": agg,
        "seconds": round(time.time() - started, 1),
    }


def render_v2_report(scores: dict[str, Any]) -> str:
    lines = [
        "| Task | Modality | Group | Ranking | Metric | Score | Hit@1 | NDCG@5 | Queries | Candidates |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in scores["tasks"].items():
        cells = [name, r["modality"], r["group"], r["eval_type"], r["metric"]]
        cells += [f"{100 * r[k]:.1f}" for k in ("score", "hit_at_1", "ndcg_at_5")]
        lines.append("| " + " | ".join(cells + [str(r["n_queries"]), str(r["n_candidates"])]) + " |")
    intro = (
        f"Data: `{scores['data']}` ({len(scores['tasks'])} tasks). Scores in %: Hit@1 for image and video "
        "tasks, NDCG@5 (linear gain) for visual documents; group columns are means over the tasks present."
    )
    return (
        f"# MMEB-V2 evaluation: {scores['model']}\n\n{intro}\n\n"
        + v2_markdown_table({scores["model"]: scores["aggregate"]})
        + "\n## Per task\n\n"
        + "\n".join(lines)
        + "\n"
    )


def write_v2_outputs(out_dir: str | Path, results: dict, label: str, root: str, started: float) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = v2_summary(results, label, root, started)
    tmp = out / "scores.json.tmp"
    tmp.write_text(json.dumps(scores, indent=2) + "\n")
    tmp.replace(out / "scores.json")
    (out / "table.md").write_text(render_v2_report(scores))
    return scores
