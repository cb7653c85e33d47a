"""How far can the demo's frozen parts go, and how many training pairs does it take to get there?

The default run is judged against a ridge probe: a closed-form map from the frozen EfficientNet-Lite0
features to the frozen MiniLM text embeddings, fitted on every training pair at once (vlm2vec/probe.py,
the trainer's own baseline). A contrastive learner has to *see* pairs to learn. This script trains the
simplest one on exactly the same frozen inputs (a linear image map and a linear text map, InfoNCE, batch
256) and reports held-out P@1 after a given number of pairs seen, next to the probe, so a trained
model's number can be read against both what the features allow and what its pair budget allows.

The default recipe sees 200 steps x 64 = 12,800 pairs (about 3 epochs of the 4,071 image->text pairs).

    python bench/demo_feature_ceiling.py                 # default data, global feature: ~30 s on 2 cores
    python bench/demo_feature_ceiling.py --image_grid 2  # + the 2x2 cells (5 x 1280-d): ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlm2vec.data import load_eval_dataset, load_train_data
from vlm2vec.demo.default_data import FEATURE_FILE, build_default_dataset
from vlm2vec.demo.family import ImageFeaturizer
from vlm2vec.demo.recipe import load_demo_model
from vlm2vec.probe import RIDGE_LAMBDAS, choose_ridge_lambda, fit_ridge
from vlm2vec.train_eval import probe_pairs

TASKS = ("ClipArtI2T", "EmojiI2T")  # the image->text tasks of the default data (headline first)
BUDGETS = (12_800, 51_200, 128_000, 512_000)  # pairs seen; the first is the default recipe's


def load_pairs(data: Path, featurize, encode) -> dict[str, torch.Tensor]:
    """The probe's training pairs (the trainer's own `probe_pairs`: image query -> text positive) and
    each eval task's queries, candidates and gold index, as frozen features / frozen text embeddings."""
    images, texts = probe_pairs(load_train_data(data / "train", subsets=TASKS))
    out = {"x": featurize(images), "y": encode(texts)}
    for task in TASKS:
        ev = load_eval_dataset(data / "eval", task)
        candidates = sorted({t for ex in ev for t in ex.cand_texts})
        index = {t: i for i, t in enumerate(candidates)}
        out[f"{task}/x"] = featurize([ev.query_image(i) for i in range(len(ev))])
        out[f"{task}/c"] = encode(candidates)
        out[f"{task}/gold"] = torch.tensor([index[ex.cand_texts[0]] for ex in ev])  # MMEB: gold first
    return out


def _named(scores: dict[str, float]) -> str:
    return ", ".join(f"{t} {scores[t]:.1f}" for t in TASKS)


def _cells(scores: dict[str, float]) -> str:
    return " | ".join(f"{scores[t]:.1f}" for t in TASKS)


def p_at_1(d: dict[str, torch.Tensor], task: str, image_map, text_map) -> float:
    with torch.no_grad():
        q = F.normalize(image_map(d[f"{task}/x"]), dim=-1)
        c = F.normalize(text_map(d[f"{task}/c"]), dim=-1)
        return 100 * float(((q @ c.T).argmax(1) == d[f"{task}/gold"]).float().mean())


def ridge_probe(d: dict[str, torch.Tensor]) -> dict[str, float]:
    """The trainer's baseline (its lambda grid, 5-fold CV on the training pairs), closed form."""
    lam = choose_ridge_lambda(d["x"], d["y"], RIDGE_LAMBDAS)
    w, mu, sd = fit_ridge(d["x"], d["y"], lam)
    return {"lambda": lam, **{t: p_at_1(d, t, lambda x: ((x - mu) / sd) @ w, lambda y: y) for t in TASKS}}


def infonce_by_budget(d: dict[str, torch.Tensor], batch: int = 256, tau: float = 0.05,
                      lr: float = 1e-3, seed: int = 0) -> dict[int, dict[str, float]]:  # fmt: skip
    """Linear image map (standardised features) + linear text map (identity init), symmetric InfoNCE
    with in-batch negatives, constant lr; P@1 when BUDGETS pairs have been seen."""
    torch.manual_seed(seed)
    x, y = d["x"], d["y"]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    image_map, text_map = nn.Linear(x.shape[1], y.shape[1]), nn.Linear(y.shape[1], y.shape[1])
    nn.init.eye_(text_map.weight)
    nn.init.zeros_(text_map.bias)
    opt = torch.optim.AdamW([*image_map.parameters(), *text_map.parameters()], lr=lr, weight_decay=0.0)
    labels = torch.arange(batch)
    results = {}
    for step in range(1, max(BUDGETS) // batch + 1):
        idx = torch.randint(0, len(x), (batch,))
        logits = F.normalize(image_map((x[idx] - mu) / sd), dim=-1) @ F.normalize(text_map(y[idx]), dim=-1).T
        loss = (F.cross_entropy(logits / tau, labels) + F.cross_entropy(logits.T / tau, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step * batch in BUDGETS:
            results[step * batch] = {
                t: p_at_1(d, t, lambda v: image_map((v - mu) / sd), text_map) for t in TASKS
            }
            print(f"  {step * batch:>7,} pairs seen: {_named(results[step * batch])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/default_data/data", help="default data (built if missing)")
    parser.add_argument("--image_grid", type=int, default=0, help="0: the global feature (the demo model's)")
    parser.add_argument("--out", default="runs/feature_ceiling", help="results.json goes here")
    args = parser.parse_args()
    data = build_default_dataset(args.data)
    cache = str(data / FEATURE_FILE)
    model = load_demo_model(0, "mean", cache if os.path.isfile(cache) else None)
    featurizer = (
        model.processor.featurizer if args.image_grid == 0 else ImageFeaturizer(image_grid=args.image_grid)
    )

    def featurize(images: list[Image.Image]) -> torch.Tensor:
        return featurizer(images).flatten(1)  # every image token, concatenated

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, batch_size=64, show_progress=False)

    d = load_pairs(data, featurize, encode)
    print(f"{len(d['x'])} training pairs, {d['x'].shape[1]}-d image features (grid {args.image_grid})")
    probe = ridge_probe(d)
    print(f"  ridge probe (lambda {probe['lambda']:g}): {_named(probe)}")
    curve = infonce_by_budget(d)
    lines = [
        "| learner (frozen features, frozen MiniLM) | pairs seen | " + " | ".join(TASKS) + " |",
        "|---|---:|" + "---:|" * len(TASKS),
        f"| ridge probe (closed form, every pair at once) | all | {_cells(probe)} |",
    ]
    for pairs, scores in curve.items():
        lines.append(f"| InfoNCE linear maps, batch 256 | {pairs:,} | {_cells(scores)} |")
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = {"image_grid": args.image_grid, "probe": probe, "infonce": curve}
    (Path(args.out) / f"results-grid{args.image_grid}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
