"""MMEB scoring: where each query's ground truth (candidate 0) ranks among its own candidates, the
per-dataset metrics, and the meta-task / IND / OOD / overall aggregation of the paper's table.

Ties. Two candidates with exactly equal scores are common in MMEB-style data (the same image or text
appears twice in a candidate list, or an untrained model maps many inputs to one vector). We count a
tie against the ground truth: its rank is 1 + the number of other candidates scoring >= it, so a
query only scores a P@1 hit when the ground truth is strictly best. The reference implementation
takes `argmax`, which returns the first maximum, and the ground truth is candidate 0, so it counts
ties as hits; that number is reported beside ours as `p_at_1_ties_as_hits` (equal when there are no
ties at the top). hit@5 and MRR use the strict rank too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlm2vec.errors import DataError

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")

# The paper's VLM2Vec rows of the MMEB table (Precision@1, %), for reference next to our numbers.
# Phi-3.5-V and LLaVA-1.6 rows: VLM2Vec paper (arXiv 2410.05160), Table 2 (LoRA, batch 1024; LLaVA-1.6
# at 1344 px). Qwen2-VL-7B: the released V1 checkpoint's numbers as tabulated by later papers (meta-task
# and IND/OOD columns come from two sources; both average to the announced 65.8 over 36 datasets).
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "VLM2Vec (Phi-3.5-V, LoRA)": {
        "Classification": 54.8, "VQA": 54.9, "Retrieval": 62.3, "Grounding": 79.5,
        "IND": 66.5, "OOD": 52.0, "Overall": 60.1,
    },
    "VLM2Vec (LLaVA-1.6, LoRA, 1344 px)": {
        "Classification": 61.2, "VQA": 49.9, "Retrieval": 67.4, "Grounding": 86.1,
        "IND": 67.5, "OOD": 57.1, "Overall": 62.9,
    },
    "VLM2Vec (Qwen2-VL-7B)": {
        "Classification": 62.6, "VQA": 57.8, "Retrieval": 69.9, "Grounding": 81.7,
        "IND": 72.2, "OOD": 57.8, "Overall": 65.8,
    },
}  # fmt: skip
TABLE_COLUMNS = (*META_TASKS, "IND", "OOD", "Overall")


@dataclass(frozen=True)
class Ranks:
    """Rank of the ground truth per query (1 = best). strict: ties count against the ground truth;
    lenient: ties count for it (the reference's argmax). n_candidates: size of each query's list."""

    strict: torch.Tensor
    lenient: torch.Tensor
    n_candidates: torch.Tensor

    def __len__(self) -> int:
        return int(self.strict.numel())


def ground_truth_ranks(scores: torch.Tensor | Sequence[torch.Tensor]) -> Ranks:
    """Ranks of candidate 0 in each row of `scores`: a [N, C] tensor, or a list of 1-D tensors whose
    lengths may differ (label sets of different sizes). Raises ValueError on NaN or an empty row."""
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 2:
            raise ValueError(
                f"scores must be [N, C] or a list of 1-D tensors, got shape {tuple(scores.shape)}"
            )
        rows = scores
        valid = torch.ones_like(rows, dtype=torch.bool)
    else:
        rows_list = [torch.as_tensor(s) for s in scores]
        for i, s in enumerate(rows_list):
            if s.dim() != 1 or s.numel() == 0:
                raise ValueError(f"scores[{i}] must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
        if not rows_list:
            rows = torch.empty(0, 1)
            valid = torch.ones_like(rows, dtype=torch.bool)
        else:
            rows = torch.nn.utils.rnn.pad_sequence(rows_list, batch_first=True)
            lengths = torch.tensor([s.numel() for s in rows_list])
            valid = torch.arange(rows.shape[1]) < lengths[:, None]
    if rows.shape[1] == 0:
        raise ValueError("every query needs at least one candidate (the ground truth at index 0)")
    nan_rows = torch.isnan(rows).logical_and(valid).any(1).nonzero().flatten()
    if nan_rows.numel():
        raise ValueError(f"scores contain NaN (first at query {int(nan_rows[0])}): the embeddings are broken")
    gt = rows[:, :1]
    others = rows[:, 1:]
    others_valid = valid[:, 1:]
    strict = 1 + ((others >= gt) & others_valid).sum(1)
    lenient = 1 + ((others > gt) & others_valid).sum(1)
    return Ranks(strict=strict, lenient=lenient, n_candidates=valid.sum(1))


def rank_candidates(
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    cand_index: torch.Tensor | Sequence[Sequence[int]],
    *,
    max_gather_elements: int = 1 << 25,
) -> Ranks:
    """Ranks with embeddings stored once per distinct input: query i's candidates are the rows
    `cand_emb[cand_index[i]]` (ground truth first). Score = dot product (the encoder normalises).

    Queries are scored in chunks whose gathered candidates hold at most `max_gather_elements` numbers
    (128 MiB in fp32), so memory stays bounded for 1000 candidates x 3584 dims."""
    if query_emb.dim() != 2 or cand_emb.dim() != 2 or query_emb.shape[1] != cand_emb.shape[1]:
        raise ValueError(
            f"query_emb [N, D] and cand_emb [U, D] must share D, got {tuple(query_emb.shape)} and "
            f"{tuple(cand_emb.shape)}"
        )
    if isinstance(cand_index, torch.Tensor) and cand_index.dim() != 2:
        raise ValueError(f"cand_index must be [N, C] or a list of lists, got shape {tuple(cand_index.shape)}")
    rows = [torch.as_tensor(r, dtype=torch.long) for r in cand_index]
    if len(rows) != query_emb.shape[0]:
        raise ValueError(f"cand_index has {len(rows)} rows but there are {query_emb.shape[0]} queries")
    for i, r in enumerate(rows):
        if r.numel() == 0:
            raise ValueError(f"query {i} has an empty candidate list")
        if int(r.min()) < 0 or int(r.max()) >= cand_emb.shape[0]:
            raise ValueError(f"query {i}: candidate index out of range [0, {cand_emb.shape[0]})")
    query_emb, cand_emb = query_emb.float(), cand_emb.float()
    scores: list[torch.Tensor] = []
    start = 0
    while start < len(rows):
        # a run of queries with the same candidate count, small enough to gather at once
        n_cand = rows[start].numel()
        per_query = n_cand * cand_emb.shape[1]
        stop = start + 1
        while (
            stop < len(rows)
            and rows[stop].numel() == n_cand
            and (stop + 1 - start) * per_query <= max_gather_elements
        ):
            stop += 1
        idx = torch.stack(rows[start:stop])
        chunk = torch.einsum("nd,ncd->nc", query_emb[start:stop], cand_emb[idx])
        scores.extend(chunk.unbind(0))
        start = stop
    if not scores:
        empty = torch.empty(0, dtype=torch.long)
        return Ranks(empty, empty, empty)
    return ground_truth_ranks(scores)


def dataset_metrics(ranks: Ranks) -> dict[str, float | int]:
    """P@1 (ties are misses), P@1 as the reference counts it (ties are hits), hit@5, MRR, and counts."""
    n = len(ranks)
    if n == 0:
        raise ValueError("no queries to score")
    strict = ranks.strict.double()
    return {
        "n_queries": n,
        "n_candidates_min": int(ranks.n_candidates.min()),
        "n_candidates_max": int(ranks.n_candidates.max()),
        "p_at_1": float((ranks.strict == 1).double().mean()),
        "p_at_1_ties_as_hits": float((ranks.lenient == 1).double().mean()),
        "hit_at_5": float((ranks.strict <= 5).double().mean()),
        "mrr": float((1.0 / strict).mean()),
        "n_ties_at_top": int(((ranks.lenient == 1) & (ranks.strict > 1)).sum()),
    }


def aggregate(
    per_dataset: Mapping[str, float],
    meta_task: Mapping[str, str | None],
    ood: Mapping[str, bool | None],
) -> dict[str, dict[str, float | int]]:
    """Means of per-dataset scores by meta-task, IND, OOD and Overall (= mean over all datasets, as in
    the paper). Each group gets {"mean", "n"}; groups without datasets are left out. Datasets with no
    meta-task / split (not in the MMEB table) count only towards Overall."""
    groups: dict[str, list[float]] = {}
    for name, value in per_dataset.items():
        task = meta_task.get(name)
        if task is not None:
            if task not in META_TASKS:
                raise ValueError(f"dataset {name!r}: meta-task {task!r} is not one of {META_TASKS}")
            groups.setdefault(task, []).append(value)
        split = ood.get(name)
        if split is not None:
            groups.setdefault("OOD" if split else "IND", []).append(value)
        groups.setdefault("Overall", []).append(value)
    return {
        key: {"mean": sum(groups[key]) / len(groups[key]), "n": len(groups[key])}
        for key in TABLE_COLUMNS
        if key in groups
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(rows: Mapping[str, Mapping[str, float]], *, with_paper: bool = True) -> str:
    """The paper's layout (Classification, VQA, Retrieval, Grounding, IND, OOD, Overall) in P@1 %.
    `rows`: row label -> {column: value in %}; the paper's VLM2Vec rows are appended for reference."""
    all_rows = dict(rows)
    if with_paper:
        all_rows.update({f"{k} (paper)": v for k, v in PAPER_RESULTS.items()})
    lines = ["| Model | " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for label, values in all_rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(values.get(c)) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def per_dataset_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per dataset: meta-task, split, queries, candidates, P@1, P@1 (ties as hits), hit@5, MRR."""
    lines = [
        "| Dataset | Meta-task | Split | Queries | Candidates | P@1 | P@1 (ties as hits) | Hit@5 | MRR |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        cands = (f"{r['n_candidates_min']}" if r["n_candidates_min"] == r["n_candidates_max"]
                 else f"{r['n_candidates_min']}-{r['n_candidates_max']}")  # fmt: skip
        lines.append(
            f"| {name} | {r.get('meta_task') or '-'} | {r.get('split') or '-'} | {r['n_queries']} "
            f"| {cands} | "
            f"{100 * r['p_at_1']:.1f} | {100 * r['p_at_1_ties_as_hits']:.1f} | {100 * r['hit_at_5']:.1f} | "
            f"{100 * r['mrr']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ embedding prefixes (Matryoshka)
def parse_dims(text: str, what: str = "--eval_dims") -> list[int]:
    """'64,256' (or '64 256') -> [64, 256]; ValueError (one line) unless increasing integers >= 1."""
    try:
        dims = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: give increasing integers like 64,256") from None
    return check_dims(dims, None, what)


def check_dims(dims: Sequence[int], full_dim: int | None, what: str = "--eval_dims") -> list[int]:
    """`dims` as a list when they are increasing, >= 1 and (given full_dim) at most the embedding size;
    else ValueError in one line naming `what`."""
    dims = [int(d) for d in dims]
    if not dims or min(dims) < 1 or any(a >= b for a, b in zip(dims, dims[1:])):
        raise ValueError(f"{what} {','.join(map(str, dims))}: give increasing sizes >= 1, like 64,256")
    if full_dim is not None and dims[-1] > full_dim:
        raise ValueError(f"{what} {dims[-1]}: larger than the embedding size {full_dim}")
    return dims


def embedding_prefix(emb: torch.Tensor, dim: int, normalize: bool) -> torch.Tensor:
    """The first `dim` numbers of each embedding (rows of `emb`), as a Matryoshka model serves them:
    re-normalised to unit length when the model normalises its embeddings (scores stay cosines),
    left as they are when it does not (scores stay dot products). The one place both evaluations
    (and the in-training one) cut an embedding, so they score a prefix alike."""
    prefix = emb[..., :dim]
    return torch.nn.functional.normalize(prefix.float(), dim=-1) if normalize else prefix


class Prefixes:
    """An evaluation's scores of each embedding prefix (Matryoshka `dims`), dataset by dataset:
    `results` = {str(d): {name: metrics}}; the full embedding size once a dataset has been embedded."""

    def __init__(self, dims: Sequence[int] | None, normalize: bool):
        self.dims = check_dims(dims, None, "eval dims") if dims else []
        self.normalize = normalize
        self.full_dim: int | None = None
        self.results: dict[str, dict[str, Any]] = {str(d): {} for d in self.dims}

    def tables(self, emb: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(str(d), the prefix table) for each d, from one dataset's embeddings [n_inputs, D]; DataError
        when a d is larger than D."""
        if not self.dims:
            return
        self.full_dim = int(emb.shape[1])
        try:
            check_dims(self.dims, self.full_dim, "eval dims")
        except ValueError as err:
            raise DataError(str(err)) from err
        for d in self.dims:
            yield str(d), embedding_prefix(emb, d, self.normalize)

    def summary(self, summarise: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The keys a scores dict gains: "dims" = {str(d): summarise(that d's results)}, the full size and
        how prefixes were scored; {} without dims (the scores dict is then as it always was)."""
        if not self.dims:
            return {}
        how = "cosine, each prefix re-normalised" if self.normalize else "dot product of the prefixes"
        return {
            "dims": {d: summarise(r) for d, r in self.results.items()},
            "embedding_dim": self.full_dim,
            "dims_scoring": how,
        }


def dims_table(
    label_header: Sequence[str],
    dims: Sequence[int],
    full_dim: int,
    rows: Sequence[tuple[Sequence[str], Sequence[float | None]]],
) -> str:
    """Markdown with a column per embedding size (scores in %): `rows` are (labels, one score per dim
    and then the full embedding's), the full size's column headed `<D> (full)`."""
    header = [*label_header, *(str(d) for d in dims), f"{full_dim} (full)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(label_header) + "---:|" * (len(dims) + 1)]
    for labels, values in rows:
        cells = [_cell(None if v is None else 100 * v) for v in values]
        lines.append("| " + " | ".join([*labels, *cells]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- MMEB-V2
def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain with linear gain (the reference's default): sum rel_i / log2(i + 2)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def label_metrics(
    scores: torch.Tensor,
    relevance: torch.Tensor,
    *,
    k: int = 5,
) -> dict[str, float | int]:
    """Hit@1, NDCG@k (linear gain) and MRR of queries ranked over candidates with graded relevance.

    scores [N, C] (use -inf where a candidate is not in a query's list), relevance [N, C] >= 0 (0: not
    relevant; MMEB-V2 binary labels are 1, BEIR qrels their score). Ties count against the relevant
    candidates, as in `ground_truth_ranks`: among equal scores the less relevant ones rank first, so a
    query only scores a hit when a relevant candidate is strictly best. The ideal DCG uses every
    relevant candidate of the query (not only those in the top k)."""
    if scores.shape != relevance.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and relevance must both be [N, C], got {tuple(scores.shape)}, {tuple(relevance.shape)}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: the embeddings are broken")
    if (relevance.max(1).values <= 0).any():
        bad = int((relevance.max(1).values <= 0).nonzero()[0])
        raise ValueError(f"query {bad} has no relevant candidate")
    n = scores.shape[0]
    hits, ndcgs, rrs = [], [], []
    for i in range(n):
        s, rel = scores[i].double(), relevance[i].double()
        # sort by score (desc), ties: less relevant first (pessimistic)
        order = sorted(range(len(s)), key=lambda j: (-float(s[j]), float(rel[j])))
        ranked = [float(rel[j]) for j in order if float(s[j]) != float("-inf")]
        hits.append(1.0 if ranked and ranked[0] > 0 else 0.0)
        ideal = sorted((float(r) for r in rel if r > 0), reverse=True)[:k]
        ndcgs.append(dcg(ranked[:k]) / dcg(ideal))
        first = next((p for p, r in enumerate(ranked) if r > 0), None)
        rrs.append(0.0 if first is None else 1.0 / (first + 1))
    return {
        "n_queries": n,
        "hit_at_1": sum(hits) / n,
        f"ndcg_at_{k}": sum(ndcgs) / n,
        "mrr": sum(rrs) / n,
    }


V2_COLUMNS = {
    "image": ("Classification", "VQA", "Retrieval", "Grounding"),
    "video": ("Video-CLS", "Video-QA", "Video-RET", "Video-MRET"),
    "visdoc": ("ViDoRe-V1", "ViDoRe-V2", "VisRAG", "VisDoc-OOD"),
}


def v2_aggregate(
    per_task: Mapping[str, float], modality: Mapping[str, str], group: Mapping[str, str]
) -> dict:
    """Means of per-task scores by sub-group, by modality (image / video / visdoc: mean over its tasks)
    and Overall (mean over all tasks, as the MMEB-V2 leaderboard). Each entry: {"mean", "n"}."""
    buckets: dict[str, list[float]] = {}
    for name, value in per_task.items():
        for key in (f"{modality[name]}/{group[name]}", modality[name], "Overall"):
            buckets.setdefault(key, []).append(value)
    return {key: {"mean": sum(v) / len(v), "n": len(v)} for key, v in buckets.items()}


def v2_markdown_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The group table: per modality its sub-groups and mean, then Overall (scores in %). `rows`: label ->
    v2_aggregate output."""
    header = ["Model"]
    keys = []
    for modality, groups in V2_COLUMNS.items():
        header += [*groups, f"{modality} (all)"]
        keys += [f"{modality}/{g}" for g in groups] + [modality]
    header.append("Overall")
    keys.append("Overall")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, agg in rows.items():
        cells = [_cell(100 * agg[k]["mean"]) if k in agg else "-" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- MMEB-V2 as the reference scores it
def reference_ranking(scores: np.ndarray) -> np.ndarray:
    """Candidate order per query as the reference ranks (VLM2Vec eval.py: np.argsort(-scores) over
    float32 dot products): best first, equal scores in candidate order. numpy's default sort is not
    guaranteed stable for long rows; `kind="stable"` is what it does on short ones, and makes the order
    deterministic. So a tie between the label and a candidate after it counts as a hit."""
    return np.argsort(-np.asarray(scores, dtype=np.float32), axis=-1, kind="stable")


def _reference_label_order(labels: Sequence[str]) -> list[str]:
    """RankingMetrics.evaluate (src/utils/eval_utils/metrics.py): `list(set(labels))`."""
    return list(set(labels))


def _ndcg(prediction: Sequence[str], label_rels: Mapping[str, float], k: int) -> float:
    gains = [label_rels.get(item, 0) for item in prediction[:k]]
    ideal = sorted(label_rels.values(), reverse=True)[:k]
    idcg = dcg(ideal) if ideal else 1.0
    return dcg(gains) / idcg if idcg > 0 else 0.0


def reference_metrics(
    predictions: Sequence[Sequence[str]],
    labels: Sequence[Sequence[str]],
    rel_scores: Sequence[Sequence[float] | None],
    *,
    k: int = 5,
    label_order: Callable[[Sequence[str]], list[str]] = _reference_label_order,
) -> dict[str, float]:
    """Hit@1 and NDCG@k (linear gain) of ranked candidate names, as RankingMetrics computes them.

    ndcg_at_k pairs each label with its own grade. ndcg_at_k_reference is the reference's number: it
    de-duplicates the labels with `label_order` (list(set(...)): an order that depends on the string
    hash seed of the process) but keeps the grades in the old order, so with graded labels a grade can
    land on another document. Equal to ndcg_at_k for binary labels."""
    if not predictions:
        raise ValueError("no queries to score")
    hits, ndcg, ndcg_ref = [], [], []
    for pred, labs, rels in zip(predictions, labels, rel_scores):
        unique = label_order(labs)
        hits.append(1.0 if pred[:1] and pred[0] in unique else 0.0)
        if rels is None:
            binary = dict.fromkeys(unique, 1.0)
            ndcg.append(_ndcg(pred, binary, k))
            ndcg_ref.append(ndcg[-1])
            continue
        if len(rels) != len(labs):
            raise ValueError(f"{len(labs)} labels but {len(rels)} relevance grades")
        ndcg.append(_ndcg(pred, dict(zip(labs, rels)), k))
        ndcg_ref.append(_ndcg(pred, dict(zip(unique, rels)), k))
    n = len(predictions)
    return {
        "hit_at_1": sum(hits) / n,
        f"ndcg_at_{k}": sum(ndcg) / n,
        f"ndcg_at_{k}_reference": sum(ndcg_ref) / n,
    }
