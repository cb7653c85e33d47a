"""How far can the demo's frozen parts go? Frozen-feature learners on the emoji image->name task.

The demo's target (image->name P@1 >= 0.28 over 1,000 held-out names) is twice what a ridge probe
gets. This script measures what learners that see the same frozen EfficientNet-Lite0 features and the
same frozen MiniLM name embeddings reach on the held-out split, so a trained model's number can be
read against them:

- ridge from the pooled 1280-d features (the demo's probe), and from pooled + per-stage means,
- CCA (both sides mapped to a shared space),
- InfoNCE-trained linear map and MLP (with a trainable linear map on the text side).

Hyper-parameters are chosen by 5-fold cross-validation on the 870 training pairs only, except the
rows marked "sweep max", which report the best held-out value of a sweep (an optimistic ceiling).

    python bench/demo_feature_ceiling.py --out runs/feature_ceiling     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlm2vec.demo.emoji_data import build_emoji_dataset
from vlm2vec.demo.recipe import load_demo_model


@torch.no_grad()
def efficientnet_features(net: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled head features [n, 1280] and the mean of every stage's last block [n, 784]."""
    x = net._swish(net._bn0(net._conv_stem(pixels)))
    stage_means = []
    for i, block in enumerate(net._blocks):
        x = block(x)
        last_of_stage = i + 1 == len(net._blocks) or (
            net._blocks[i + 1]._block_args.output_filters != block._block_args.output_filters
        )
        if last_of_stage:
            stage_means.append(x.mean((2, 3)))
    head = net._swish(net._bn1(net._conv_head(x)))
    return {"pooled": head.mean((2, 3)), "stages": torch.cat(stage_means, 1)}


def p_at_1(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """Row i's ground truth is targets[i]; ties count as misses."""
    s = F.normalize(pred, dim=-1) @ F.normalize(targets, dim=-1).T
    gt = s.diagonal()[:, None]
    return float(((s >= gt).sum(1) == 1).float().mean())


def standardise(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    x, y = x.double(), y.double()
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y).float()


def cross_validate(fit_predict, n: int, grid: list, folds: int = 5):
    """The grid value with the best mean P@1 over `folds` splits of the n training rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    scores = []
    for value in grid:
        hits = 0.0
        for k in range(folds):
            val = order[k::folds]
            fit = torch.ones(n, dtype=torch.bool)
            fit[val] = False
            hits += fit_predict(value, fit, val)
        scores.append(hits / folds)
    return grid[max(range(len(grid)), key=scores.__getitem__)]


def cca(x: torch.Tensor, y: torch.Tensor, reg: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections (A, B) of regularised CCA fitted on (x, y), both centred; keeps k components."""
    x, y = x.double(), y.double()

    def inv_sqrt(c: torch.Tensor) -> torch.Tensor:
        e, v = torch.linalg.eigh(c + reg * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype))
        return v @ torch.diag(e.clamp_min(1e-12) ** -0.5) @ v.T

    wx, wy = inv_sqrt(x.T @ x / len(x)), inv_sqrt(y.T @ y / len(y))
    u, _, vt = torch.linalg.svd(wx @ (x.T @ y / len(x)) @ wy)
    return (wx @ u[:, :k]).float(), (wy @ vt.T[:, :k]).float()


def infonce(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int = 1500, seed: int = 0):
    """Image map (linear or MLP with dropout) + linear text map trained with symmetric InfoNCE."""
    torch.manual_seed(seed)
    width = x.shape[1]
    if hidden:
        layers = [nn.Dropout(0.5), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, y.shape[1])]
        image = nn.Sequential(*layers)
    else:
        image = nn.Linear(width, y.shape[1])
    text = nn.Linear(y.shape[1], y.shape[1])
    nn.init.eye_(text.weight)
    nn.init.zeros_(text.bias)
    opt = torch.optim.AdamW([*image.parameters(), *text.parameters()], lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        b = torch.randperm(len(x))[:128]
        logits = F.normalize(image(x[b]), dim=-1) @ F.normalize(text(y[b]), dim=-1).T / 0.05
        labels = torch.arange(len(b))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return image.eval(), text.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/feature_ceiling", help="data, features and results.json")
    args = parser.parse_args()
    out = Path(args.out)
    t0 = time.time()
    data_dir = build_emoji_dataset(out / "data")
    items = [json.loads(s) for s in (data_dir / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    train = torch.tensor([it["split"] == "train" for it in items])
    held = ~train

    model = load_demo_model()
    featurizer = model.processor.featurizer
    from vlm2vec.demo.family import _efficientnet_lite0

    net = _efficientnet_lite0()
    images = [Image.open(data_dir / it["image"]).convert("RGB") for it in items]
    feats: dict[str, list[torch.Tensor]] = {"pooled": [], "stages": []}
    for s in range(0, len(images), 64):
        batch = efficientnet_features(net, torch.stack([featurizer.pixels(im) for im in images[s : s + 64]]))
        for k, v in batch.items():
            feats[k].append(v)
    pooled = standardise(torch.cat(feats["pooled"]), train)
    both = standardise(torch.cat([torch.cat(feats["pooled"]), torch.cat(feats["stages"])], 1), train)
    names = model.encode([it["name"] for it in items], batch_size=128, show_progress=False)
    y_train, y_held = names[train], names[held]

    results: dict[str, float] = {}
    for label, x in [("ridge, pooled", pooled), ("ridge, pooled + stage means", both)]:
        xt = x[train]

        def ridge_cv(lam, fit, val, xt=xt):
            return p_at_1(xt[val] @ ridge(xt[fit], y_train[fit], lam), y_train[val])

        lam = cross_validate(ridge_cv, len(xt), [1.0, 10.0, 30.0, 100.0, 300.0, 1000.0])
        results[f"{label} (lambda {lam:g}, CV)"] = p_at_1(x[held] @ ridge(xt, y_train, lam), y_held)

    yc_mean = y_train.mean(0)
    sweep = []
    for reg in (0.1, 1.0):
        for k in (128, 256, 384):
            a, b = cca(pooled[train], y_train - yc_mean, reg, k)
            sweep.append(p_at_1(pooled[held] @ a, (y_held - yc_mean) @ b))
    results["CCA, pooled (sweep max over 6)"] = max(sweep)
    for hidden, label in [(0, "InfoNCE linear + text map"), (1024, "InfoNCE MLP + text map")]:
        image, text = infonce(pooled[train], y_train, hidden)
        with torch.no_grad():
            results[f"{label}, pooled"] = p_at_1(image(pooled[held]), text(y_held))

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"| frozen-feature learner | image->name P@1 over {int(held.sum())} held-out names |")
    print("|---|---:|")
    for label, value in results.items():
        print(f"| {label} | {100 * value:.1f}% |")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
