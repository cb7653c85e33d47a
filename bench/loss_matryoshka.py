"""The Matryoshka providers of bench/loss_kernel.py (`--matryoshka`): one loss over several prefixes.

Every provider computes sum_k mean_i InfoNCE(q[:, :d_k], c[:, :d_k]) with cosine similarity and
temperature TAU (weights 1), fwd+bwd into q and c:

- `mrl-fused` / `mrl-torch`: `contrastive_loss(..., matryoshka_dims=dims)` on the Triton / torch
  backend: one pass over D for every prefix (6 B^2 d_K FLOPs).
- `mrl-eager`: a loop over the prefixes of the eager loss (normalise, B x B logits, cross-entropy),
  summed, one backward: every prefix's logits live until the backward (sum_k 6 B^2 d_k FLOPs).
- `mrl-st`: sentence-transformers run for real, its documented way of training Matryoshka embeddings
  at large batch: `MatryoshkaLoss` around `CachedMultipleNegativesRankingLoss` (GradCache, mini-batches
  of ST_MINI_BATCH rows), scale = 1 / TAU, on the same embeddings. Its losses take a model and
  tokenised features; `FixedEmbeddings` is the smallest model it accepts that returns given rows, so
  the gradients land in q.grad and c.grad as for the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MRL_PROVIDERS = ("mrl-fused", "mrl-torch", "mrl-eager", "mrl-st")
# sentence-transformers' default mini-batch of the cached losses
ST_MINI_BATCH = 32


def default_dims(D: int) -> list[int]:
    """Issue 24's prefixes (64, 128, 256, 512 and D itself), those below D."""
    return [d for d in (64, 128, 256, 512) if d < D] + [D]


def eager_per_dim(q: Tensor, c: Tensor, dims: Sequence[int], tau: float) -> Tensor:
    """The eager InfoNCE of every prefix, summed (what a loop over dimensions does)."""
    labels = torch.arange(q.shape[0], device=q.device)
    total = q.new_zeros((), dtype=torch.float32)
    for d in dims:
        logits = F.normalize(q[:, :d], dim=-1) @ F.normalize(c[:, :d], dim=-1).T / tau
        total = total + F.cross_entropy(logits, labels)
    return total


class FixedEmbeddings(nn.Sequential):
    """A sentence-transformers stand-in that embeds row indices as rows of given tensors.

    features = {"input_ids": row indices [b], "column": "q" or "c"} -> {"sentence_embedding":
    table[rows]}. The cached losses slice "input_ids" into mini-batches (other keys pass through) and
    index the model (`model[0]`, for their StaticEmbedding check): hence a Sequential of one Identity.
    """

    def __init__(self, q: Tensor, c: Tensor) -> None:
        super().__init__(nn.Identity())
        self.tables = {"q": q, "c": c}

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": self.tables[features["column"]][features["input_ids"]]}

    def _get_untruncated_embedding_dimension(self) -> int:
        return self.tables["q"].shape[1]


def st_matryoshka(q: Tensor, c: Tensor, dims: Sequence[int], tau: float, mini_batch: int = ST_MINI_BATCH):
    """sentence-transformers' MatryoshkaLoss(CachedMultipleNegativesRankingLoss) over q (anchors) and c
    (positives, in-batch negatives): a callable () -> loss whose backward fills q.grad and c.grad."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
    )

    model = FixedEmbeddings(q, c)
    inner = CachedMultipleNegativesRankingLoss(model, scale=1.0 / tau, mini_batch_size=mini_batch)
    loss = MatryoshkaLoss(model, inner, list(dims))
    rows = torch.arange(q.shape[0], device=q.device)
    features = [{"input_ids": rows, "column": "q"}, {"input_ids": rows, "column": "c"}]
    return lambda: loss(features, None)


def make_mrl_provider(
    name: str, dims: Sequence[int], tau: float, mini_batch: int = ST_MINI_BATCH
) -> Callable:
    """(q, c) -> scalar loss of one Matryoshka provider (the ST one builds its loss per input pair, with
    mini-batches of `mini_batch` rows)."""
    if name in ("mrl-fused", "mrl-torch"):
        from vlm2vec_kernels import contrastive_loss

        backend = "triton" if name == "mrl-fused" else "torch"
        dims = list(dims)
        return lambda q, c: contrastive_loss(q, c, temperature=tau, backend=backend, matryoshka_dims=dims)
    if name == "mrl-eager":
        return lambda q, c: eager_per_dim(q, c, dims, tau)
    if name == "mrl-st":
        built: dict = {}

        def st(q: Tensor, c: Tensor) -> Tensor:
            key = (id(q), id(c))
            if key not in built:
                built.clear()
                built[key] = st_matryoshka(q, c, dims, tau, mini_batch)
            return built[key]()

        return st
    raise ValueError(f"unknown Matryoshka provider {name!r}; choose from {', '.join(MRL_PROVIDERS)}")


def useful_flops(mode: str, B: int, dims: Sequence[int]) -> int:
    """What a loop over the prefixes computes: (2 or 6) B^2 sum_k d_k."""
    return (2 if mode == "fwd" else 6) * B * B * sum(dims)


def ratio_lines(rows: list[dict], reference: str) -> list[str]:
    """Time and peak memory of each Matryoshka provider against `reference`, per (mode, B, D)."""
    out = []
    for key in sorted({(r["mode"], r["B"], r["D"]) for r in rows}):
        cell = {r["provider"]: r for r in rows if (r["mode"], r["B"], r["D"]) == key and r["status"] == "ok"}
        ref = cell.get(reference)
        if ref is None:
            continue
        parts = []
        for name in MRL_PROVIDERS:
            r = cell.get(name)
            if r is None or name == reference:
                continue
            time = float(r["p50_ms"]) / float(ref["p50_ms"])
            peak = float(r["peak_mb"]) / max(float(ref["peak_mb"]), 0.1)
            parts.append(f"{name} {time:.2f}x time, {peak:.1f}x peak ({r['peak_mb']} MB)")
        mode, B, D = key
        head = f"matryoshka {mode} B={B} D={D} vs {reference} ({ref['p50_ms']} ms, {ref['peak_mb']} MB): "
        out.append(head + "; ".join(parts))
    return out
