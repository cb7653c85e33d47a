"""The frozen-feature baseline: a ridge map from a model's frozen image features to its own text
embeddings, fitted in closed form on the training pairs (image query -> text positive).

Why: it is what the training data can teach *without* moving any weight of the model, so a trained
model that does not beat it has learned nothing the features did not already hold. Only for models
whose processor computes frozen image features (`processor.featurizer`, e.g. the demo family)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def has_frozen_features(model: Any) -> bool:
    return callable(getattr(getattr(model, "processor", None), "featurizer", None))


Ridge = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (W, mu, sd)
RIDGE_LAMBDAS = (1.0, 10.0, 100.0, 1000.0)  # the CV grid of the trainer's probe


def fit_ridge(
    x: torch.Tensor, y: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W minimising |((x - mu)/sd) W - y|^2 + lam |W|^2 in closed form; returns (W, mu, sd)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = ((x - mu) / sd).double()
    w = torch.linalg.solve(xs.T @ xs + lam * torch.eye(xs.shape[1], dtype=torch.float64), xs.T @ y.double())
    return w.float(), mu, sd


def choose_ridge_lambda(x: torch.Tensor, y: torch.Tensor, lambdas: Sequence[float], folds: int = 5) -> float:
    """lambda with the best cross-validated P@1 on the training pairs (the held-out set is never used)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    best, best_score = lambdas[0], -1.0
    for lam in lambdas:
        hits = 0
        for k in range(folds):
            val = order[k::folds]
            train = torch.ones(x.shape[0], dtype=torch.bool)
            train[val] = False
            w, mu, sd = fit_ridge(x[train], y[train], lam)
            pred = F.normalize(((x[val] - mu) / sd) @ w, dim=-1)
            hits += int(((pred @ y[val].T).argmax(1) == torch.arange(len(val))).sum())
        if hits > best_score:
            best, best_score = lam, hits
    return best


class RidgeProbe:
    """The probe as an encoder: image rows -> ridge-mapped pooled frozen feature, text rows -> the frozen
    model's text embedding (an image row's instruction is ignored: a linear map cannot read it)."""

    def __init__(self, model: Any, ridge: Ridge, lam: float, batch: int):
        self.model, (self.w, self.mu, self.sd), self.lam, self.batch = model, ridge, lam, batch

    @classmethod
    @torch.no_grad()
    def fit(cls, model: Any, images: list[Any], texts: list[str], batch: int = 64) -> RidgeProbe:
        """Fit on (image, text) training pairs with `model` as it is now (call before training)."""
        x = model.processor.featurizer(images)[:, 0]
        y = model.encode(texts, batch_size=batch, show_progress=False)
        lam = choose_ridge_lambda(x, y, RIDGE_LAMBDAS)
        return cls(model, fit_ridge(x, y, lam), lam=lam, batch=batch)

    @torch.no_grad()
    def __call__(self, texts: list[str], images: list[Any], videos: Any = None) -> torch.Tensor:
        out = torch.empty(len(texts), self.w.shape[1])
        img_rows = [i for i, im in enumerate(images) if im is not None]
        txt_rows = [i for i, im in enumerate(images) if im is None]
        if img_rows:
            x = self.model.processor.featurizer([images[i] for i in img_rows])[:, 0]
            out[img_rows] = F.normalize(((x - self.mu) / self.sd) @ self.w, dim=-1)
        if txt_rows:
            out[txt_rows] = self.model.encode([texts[i] for i in txt_rows], batch_size=self.batch,
                                              show_progress=False)  # fmt: skip
        return out
