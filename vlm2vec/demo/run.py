"""The embedded demo, end to end on a CPU: `python -m vlm2vec.demo.run --out DIR`.

1. build the emoji data set (emoji_data.py) and the demo model (family.py) from installed files,
2. compute the frozen EfficientNet features of every image once (cached in DIR/features.pt),
3. evaluate two baselines: the untrained model, and a frozen-features linear probe (a closed-form
   ridge map from pooled image features to the frozen MiniLM embeddings of the names),
4. train (LoRA on MiniLM + the projector; the step is injectable: `run_demo(train_fn=...)`, default
   `plain_train`, a plain loop; vlm2vec.train plugs in GradCache + DeepSpeed),
5. evaluate the trained model and write DIR/report.md + DIR/demo_scores.json (MMEB table layout).

Every evaluation goes through vlm2vec.eval.evaluate, i.e. the MMEB protocol on MMEB-format files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlm2vec.demo.emoji_data import N_EVAL, N_TRAIN, build_emoji_dataset
from vlm2vec.eval import encoder_of, evaluate, summary_row
from vlm2vec.scoring import markdown_table

HEADLINE = ("EmojiI2T", "image->name P@1 over the held-out names")


@dataclass
class DemoRecipe:
    """Training settings of the demo (the plain loop reads all of them; see the report for results)."""

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3  # LoRA weights and projector (AdamW), linear warmup then linear decay to 0
    warmup_steps: int = 20
    weight_decay: float = 0.0
    temperature: float = 0.05
    symmetric: bool = True  # query->target and target->query InfoNCE
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    train_sets: tuple[str, ...] = ("EmojiI2T",)  # mixing in EmojiT2I measured worse (see report)
    pooling: str = "mean"  # MiniLM was trained with mean pooling
    image_grid: int = 0  # image tokens: global feature (+ grid x grid cells)
    seed: int = 0
    eval_batch_size: int = 64


@dataclass
class TrainSpec:
    """What a train step gets besides the model: data, output directory, recipe."""

    train_dir: Path
    out_dir: Path
    recipe: DemoRecipe
    show_progress: bool = True
    log: list[dict[str, float]] = field(default_factory=list)


TrainFn = Callable[[Any, TrainSpec], Any]
"""train_fn(model: VLM2Vec, spec) -> trained VLM2Vec (e.g. `VLM2Vec.from_pretrained(spec.out_dir)` after
a launcher run). The model arrives untrained, without an adapter."""


# ------------------------------------------------------------------------------------------ model
def load_demo_model(recipe: DemoRecipe, feature_cache: str | None = None) -> Any:
    """The untrained demo model (pretrained parts, projector from recipe.seed), quietly."""
    import transformers

    from vlm2vec.demo import family
    from vlm2vec.model import VLM2Vec

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        hf_model, processor = family.assemble(seed=recipe.seed, image_grid=recipe.image_grid,
                                              cache_file=feature_cache)  # fmt: skip
    finally:
        transformers.logging.set_verbosity(verbosity)
    return VLM2Vec(hf_model, processor, family.DEMO_FAMILY, pooling=recipe.pooling, max_len=128,
                   base_path=family.BASE_ID)  # fmt: skip


def _open_images(folder: Path, paths: Sequence[str]) -> list[Any]:
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(folder / p) as im:
            images.append(im.convert("RGB"))
    return images


def precompute_features(model: Any, data_dir: Path, cache_file: Path, show_progress: bool = True) -> int:
    """Frozen EfficientNet features of every demo image, computed once and stored in cache_file."""
    featurizer = model.processor.featurizer
    items = [json.loads(line) for line in (data_dir / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    images = _open_images(data_dir, [r["image"] for r in items])
    computed = featurizer.precompute(images, show_progress=show_progress)
    if computed or not cache_file.is_file():
        featurizer.save_cache(str(cache_file))
    return computed


def model_fingerprint(model: Any, label: str) -> str:
    """Identity of an in-memory model for the eval cache: a hash of every trainable-or-adapted weight."""
    h = hashlib.sha256(label.encode())
    for name, p in sorted(model.backbone.named_parameters()):
        if p.requires_grad or "lora" in name or "projector" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ probe
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
    """Frozen-features linear probe as an encoder: image rows -> ridge-mapped pooled EfficientNet
    feature, text rows -> the frozen model's text embedding (the instruction text of image rows is
    ignored: a linear probe has no way to read it)."""

    def __init__(
        self, model: Any, w: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor, lam: float, batch: int
    ):
        self.model, self.w, self.mu, self.sd, self.lam, self.batch = model, w, mu, sd, lam, batch

    @classmethod
    def fit(cls, model: Any, train_dir: Path, batch: int = 64, show_progress: bool = True) -> RidgeProbe:
        rows = [
            json.loads(line)
            for line in (train_dir / "EmojiI2T.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        images = _open_images(train_dir, [r["qry_image_path"] for r in rows])
        x = model.processor.featurizer(images)[:, 0]
        y = model.encode([r["pos_text"] for r in rows], batch_size=batch, show_progress=show_progress)
        lam = choose_ridge_lambda(x, y, [1.0, 10.0, 100.0, 1000.0])
        return cls(model, *fit_ridge(x, y, lam), lam=lam, batch=batch)

    def __call__(self, texts: list[str], images: list[Any]) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------ training
def _read_pairs(train_dir: Path, sets: Sequence[str]) -> list[tuple[str, str | None, str, str | None]]:
    from vlm2vec.data import load_train_data

    data = load_train_data(train_dir, subsets=list(sets))
    return [(ex.query_text, ex.query_image, ex.pos_text, ex.pos_image) for rows in data.subsets.values()
            for ex in rows]  # fmt: skip


def plain_train(model: Any, spec: TrainSpec) -> Any:
    """A plain loop (no GradCache, one process): LoRA + projector, in-batch InfoNCE from
    vlm2vec_kernels. Batches mix the recipe's train sets; saves adapter + base to spec.out_dir."""
    from tqdm.auto import tqdm
    from vlm2vec_kernels import contrastive_loss

    r = spec.recipe
    torch.manual_seed(r.seed)
    rng = random.Random(r.seed)
    pairs = _read_pairs(spec.train_dir, r.train_sets)
    image_cache: dict[str, Any] = {}

    def image(path: str | None) -> Any:
        if path is None:
            return None
        if path not in image_cache:
            image_cache[path] = _open_images(spec.train_dir, [path])[0]
        return image_cache[path]

    model.add_lora(r=r.lora_r, alpha=r.lora_alpha, dropout=r.lora_dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, r.warmup_steps)) * max(0.0, 1.0 - s / r.steps)
    )
    model.train()
    order: list[int] = []
    bar = tqdm(range(r.steps), desc="train (plain loop)", disable=not spec.show_progress)
    for step in bar:
        if len(order) < r.batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = [pairs[i] for i in order[: r.batch_size]], order[r.batch_size :]
        q = model(model.prepare([b[0] for b in batch], [image(b[1]) for b in batch]))
        t = model(model.prepare([b[2] for b in batch], [image(b[3]) for b in batch]))
        loss = contrastive_loss(q, t, r.temperature, symmetric=r.symmetric)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        spec.log.append({"step": step + 1, "loss": loss.item()})
        bar.set_postfix(loss=f"{spec.log[-1]['loss']:.3f}")
    model.eval()
    # save_base: the assembled base (with the processor's feature-cache settings) goes to out_dir/base,
    # so `VLM2Vec.from_pretrained(out_dir)` needs nothing else and reuses the cached features
    model.save_pretrained(str(spec.out_dir), save_base=True)
    return model


# ------------------------------------------------------------------------------------------ run
def run_demo(
    out_dir: str | os.PathLike,
    *,
    train_fn: TrainFn = plain_train,
    recipe: DemoRecipe | None = None,
    n_train: int = N_TRAIN,
    n_eval: int = N_EVAL,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build data, evaluate the baselines, train, evaluate the trained model; returns the results and
    writes report.md / demo_scores.json in out_dir. Small n_train / n_eval make a quick subset run."""
    recipe = recipe or DemoRecipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    data_dir = build_emoji_dataset(out / "data", n_train=n_train, n_eval=n_eval, show_progress=show_progress)
    times["data"] = time.time() - t0

    t = time.time()
    cache_file = out / f"features-grid{recipe.image_grid}.pt"
    model = load_demo_model(recipe, str(cache_file))
    precompute_features(model, data_dir, cache_file, show_progress)
    times["features"] = time.time() - t

    eval_dir = str(data_dir / "eval")
    results: dict[str, dict[str, Any]] = {}

    def run_eval(key: str, label: str, encoder: Any, fingerprint: str) -> None:
        start = time.time()
        results[key] = evaluate(
            encoder, eval_dir, out_dir=out / f"eval-{key}", fingerprint=fingerprint,
            batch_size=recipe.eval_batch_size, label=label, show_progress=show_progress,
        )  # fmt: skip
        times[f"eval {key}"] = time.time() - start

    run_eval("untrained", "untrained demo model", encoder_of(model, recipe.eval_batch_size),
             model_fingerprint(model, "untrained"))  # fmt: skip
    t = time.time()
    probe = RidgeProbe.fit(model, data_dir / "train", recipe.eval_batch_size, show_progress)
    times["probe fit"] = time.time() - t
    run_eval("probe", f"frozen-features linear probe (ridge, lambda {probe.lam:g})", probe,
             model_fingerprint(model, f"probe-{probe.lam}"))  # fmt: skip

    t = time.time()
    spec = TrainSpec(data_dir / "train", out / "model", recipe, show_progress)
    trained = train_fn(model, spec)
    times["train"] = time.time() - t
    trained.eval()
    run_eval("trained", "trained demo model (LoRA + projector)", encoder_of(trained, recipe.eval_batch_size),
             model_fingerprint(trained, f"trained-{json.dumps(asdict(recipe))}"))  # fmt: skip
    times["total"] = time.time() - t0

    summary = {
        "recipe": asdict(recipe),
        "n_train": n_train,
        "n_eval": n_eval,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "train_log_tail": spec.log[-5:],
        "results": results,
    }
    (out / "demo_scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(render_demo_report(summary))
    return summary


def render_demo_report(summary: dict[str, Any]) -> str:
    results = summary["results"]
    datasets = list(next(iter(results.values()))["datasets"])
    n_eval = summary["n_eval"]
    lines = [
        "# Embedded demo: emoji image <-> name (Noto Color Emoji + Unicode names)",
        "",
        f"{summary['n_train']} training pairs, {n_eval} held-out emoji; P@1 in % (ties count as misses). "
        f"Chance for {HEADLINE[0]}: {100 / n_eval:.2f}%.",
        "",
        "| Model | " + " | ".join(datasets) + " | Hit@5 " + HEADLINE[0] + " | MRR " + HEADLINE[0] + " |",
        "|---|" + "---:|" * (len(datasets) + 2),
    ]
    for res in results.values():
        per = res["datasets"]
        lines.append(
            f"| {res['model']} | "
            + " | ".join(f"{100 * per[d]['p_at_1']:.1f}" for d in datasets)
            + f" | {100 * per[HEADLINE[0]]['hit_at_5']:.1f} | {100 * per[HEADLINE[0]]['mrr']:.1f} |"
        )
    lines += ["", "In the MMEB table layout (demo datasets; the paper rows are MMEB's 36 datasets):", ""]
    lines.append(markdown_table({res["model"]: summary_row(res) for res in results.values()}))
    recipe = summary["recipe"]
    lines += [
        "",
        f"Recipe: {recipe['steps']} steps x batch {recipe['batch_size']}, lr {recipe['lr']:g} "
        f"(warmup {recipe['warmup_steps']}, linear decay), temperature {recipe['temperature']:g}"
        f"{' (symmetric)' if recipe['symmetric'] else ''}, LoRA r={recipe['lora_r']} "
        f"alpha={recipe['lora_alpha']} "
        f"dropout {recipe['lora_dropout']:g} + full projector, pooling {recipe['pooling']}, "
        f"image tokens 1 + {recipe['image_grid']}^2, train sets {', '.join(recipe['train_sets'])}.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = DemoRecipe()
    p = argparse.ArgumentParser(
        prog="python -m vlm2vec.demo.run",
        description="The embedded CPU demo: emoji data from Debian fonts/unicode-data, a small VLM from "
        "EfficientNet-Lite0 + all-MiniLM-L6-v2 (PyPI), baselines, plain-loop training, MMEB-style table.",
    )
    p.add_argument("--out", required=True, help="output directory (data, features, evals, report.md)")
    p.add_argument("--n-train", type=int, default=N_TRAIN, help=f"training emoji (default {N_TRAIN})")
    p.add_argument("--n-eval", type=int, default=N_EVAL, help=f"held-out emoji (default {N_EVAL})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default {d.batch_size})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help=f"InfoNCE tau (default {d.temperature:g})"
    )
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument(
        "--image-grid", type=int, default=d.image_grid, help="image tokens: 1 + grid^2 (default 0)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="projector init and batch order seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = DemoRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        temperature=args.temperature, lora_r=args.lora_r, image_grid=args.image_grid,
                        seed=args.seed)  # fmt: skip
    summary = run_demo(args.out, recipe=recipe, n_train=args.n_train, n_eval=args.n_eval,
                       show_progress=not args.no_progress)  # fmt: skip
    print(render_demo_report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
