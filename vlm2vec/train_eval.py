"""Evaluation inside training (`--eval_data DIR`): the model being trained, scored by the MMEB evaluation
(vlm2vec.eval_v1) on all ranks together, plus the two baselines it must beat, computed once and cached.

Why every rank: `vlm2vec.eval_v1.evaluate` splits the embedding work over the ranks and meets them in
barriers / a gather, so each rank enters the same evaluations in the same order (the trainer calls
these functions at the same steps everywhere). Under ZeRO 0-2 each rank embeds its shard alone; under
ZeRO-3 every forward pass gathers weights with collectives, so there every rank embeds every input in
the same order instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vlm2vec import distributed
from vlm2vec.embedding import encoder_of
from vlm2vec.errors import ConfigError
from vlm2vec.eval_v1 import DATASET_META_FILE, evaluate, summary_row
from vlm2vec.media import load_image
from vlm2vec.probe import RidgeProbe, has_frozen_features
from vlm2vec.scoring import check_dims, dims_table, markdown_table

if TYPE_CHECKING:
    from vlm2vec.data import TrainData
    from vlm2vec.model import VLM2Vec

BASELINES_FILE = "baselines.json"
EVAL_BATCH = 64


def trained_parameters(model: VLM2Vec) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter), sorted by name, of what training changes: every trainable parameter, and every
    parameter of a module the family trains in full (`family.modules_to_save`, e.g. the demo's
    projector), the frozen copy peft keeps of such a module (`original_module`) included."""
    saved = [f".{m}." for m in model.family.modules_to_save]
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad or any(m in f".{name}." for m in saved):
            yield name, p


def weights_fingerprint(model: VLM2Vec, label: str, skip: str | None = None) -> str:
    """Identity of an in-memory model: a hash of its trained weights (`trained_parameters`; names
    containing `skip` left out) and `label`."""
    h = hashlib.sha256(label.encode())
    for name, p in trained_parameters(model):
        if not (skip and skip in name):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _eval_mode(model: VLM2Vec) -> Iterator[None]:
    """Eval mode, no grad; train mode again afterwards."""
    was_training = model.training
    with torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def checked_dims(model: VLM2Vec, dims: Sequence[int] | None) -> list[int] | None:
    """--eval_dims checked against the model's embedding size (ConfigError, one line), so a bad size
    stops the run before its first step rather than at its first evaluation."""
    if not dims:
        return None
    try:
        return check_dims(dims, model.embedding_dim)
    except AttributeError:  # a backbone that does not say: the evaluation checks the embeddings
        return list(dims)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def evaluate_model(
    model: VLM2Vec,
    eval_data: str,
    out_dir: str,
    label: str,
    zero_stage: int = 0,
    show_progress: bool = False,
    dims: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """Scores of `model` as it is now on every task of `eval_data` (rank 0; None elsewhere); scores.json
    and table.md in out_dir, exactly what `python -m vlm2vec.eval [--eval_dims ...]` writes for the
    saved model. dims: also score these embedding prefixes (Matryoshka; eval_v1.evaluate)."""
    dims = checked_dims(model, dims)
    with _eval_mode(model):  # ZeRO-3: each forward gathers weights, so every rank embeds everything
        return evaluate(encoder_of(model, EVAL_BATCH), eval_data, out_dir=out_dir, use_cache=False,
                        batch_size=EVAL_BATCH, label=label, show_progress=show_progress,
                        shard=zero_stage != 3, dims=dims, normalize=model.normalize)  # fmt: skip


def probe_pairs(data: TrainData) -> tuple[list[Image.Image], list[str]]:
    """(image, text) pairs of the training rows whose query is an image alone and target a text."""
    images, texts, seen = [], [], set()
    for rows in data.subsets.values():
        for ex in rows:
            if (
                isinstance(ex.query_image, str)
                and not ex.pos_image
                and (ex.query_image, ex.pos_text) not in seen
            ):
                seen.add((ex.query_image, ex.pos_text))
                images.append(load_image(ex.query_image, data.image_root, ex.where))
                texts.append(ex.pos_text)
    return images, texts


def baselines(
    model: VLM2Vec,
    data: TrainData,
    eval_data: str,
    out_dir: str,
    zero_stage: int = 0,
    show_progress: bool = False,
    dims: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """{"untrained": scores, "probe": scores} of the model before training (rank 0; {} elsewhere).
    Cached in out_dir/baselines.json under a key of the weights, the data (and the dims): computed once.
    dims: each scored at these embedding prefixes too (the baselines of each report column)."""
    dims = checked_dims(model, dims)  # before the first step, cached or not
    label = f"{os.path.abspath(eval_data)}|{data.sizes()}" + (f"|dims {dims}" if dims else "")
    # LoRA starts as the identity: its random A changes nothing yet, so the key leaves it out
    with distributed.gathered_parameters(model.parameters(), zero_stage):
        key = weights_fingerprint(model, label, skip="lora_")
    path = Path(out_dir) / BASELINES_FILE
    rank = distributed.rank()
    cached = None
    if rank == 0 and path.is_file():
        stored = json.loads(path.read_text())
        cached = stored["results"] if stored.get("key") == key else None
    cached = distributed.broadcast_from_rank0(cached)  # every rank takes the same branch
    if cached is not None:
        return cached if rank == 0 else {}
    results = {"untrained": evaluate_model(model, eval_data, f"{out_dir}/untrained", "untrained model",
                                           zero_stage, show_progress, dims)}  # fmt: skip
    if has_frozen_features(model):
        with _eval_mode(model):
            probe = RidgeProbe.fit(model, *probe_pairs(data), batch=EVAL_BATCH)
            results["probe"] = evaluate(
                probe, eval_data, out_dir=f"{out_dir}/probe", use_cache=False, batch_size=EVAL_BATCH,
                label=f"frozen-feature ridge probe (lambda {probe.lam:g})", show_progress=show_progress,
                shard=zero_stage != 3, dims=dims,
            )  # fmt: skip
    if rank != 0:
        return {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")
    return results


def headline(eval_data: str, results: dict[str, dict[str, Any]]) -> str:
    """The run's last line: P@1 of each model on the first task of eval_data's datasets.json (where
    there is one; else the first task evaluated), named by its `description` there."""
    meta_file = Path(eval_data) / DATASET_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    scored = next(iter(results.values()))["datasets"]
    name = next((n for n in meta if n in scored), next(iter(scored)))
    first = scored[name]
    described = meta.get(name, {}).get("description", name)
    parts = [f"{key} {res['datasets'][name]['p_at_1']:.3f}" for key, res in results.items()]
    return f"{described} ({first['n_candidates_max']} candidates), P@1: " + ", ".join(parts)


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: P@1 (%) per task for each model, the MMEB summary columns after."""
    names = list(next(iter(results.values()))["datasets"])
    lines = ["| Model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for res in results.values():
        lines.append(
            f"| {res['model']} | "
            + " | ".join(f"{100 * res['datasets'][n]['p_at_1']:.1f}" for n in names)
            + " |"
        )
    return (
        "\n".join(lines)
        + "\n\n"
        + markdown_table({r["model"]: summary_row(r) for r in results.values()})
        + dims_section(results)
    )


def dims_section(results: dict[str, dict[str, Any]]) -> str:
    """With --eval_dims: P@1 (%) per model and task (and Overall), a column per embedding size; ''
    without. A model evaluated without those sizes (baselines cached before they were asked for) is
    left out."""
    with_dims = [r for r in results.values() if r.get("dims")]
    if not with_dims:
        return ""
    dims = list(with_dims[-1]["dims"])
    rows = []
    for res in (r for r in with_dims if list(r["dims"]) == dims):
        by_dim = [res["dims"][d] for d in dims] + [res]
        rows += [([res["model"], n], [s["datasets"][n]["p_at_1"] for s in by_dim]) for n in res["datasets"]]
        rows.append(([res["model"], "**Overall**"], [s["aggregate"]["Overall"]["p_at_1"] for s in by_dim]))
    return (
        f"\n## By embedding size\n\nP@1 (%) of the first d numbers of each embedding "
        f"({with_dims[-1]['dims_scoring']}); the last column is the whole embedding.\n\n"
        + dims_table(["Model", "Task"], [int(d) for d in dims], with_dims[-1]["embedding_dim"], rows)
    )
