"""The trainer's default run: the embedded emoji demo trained through GradCache + DeepSpeed.

`deepspeed vlm2vec/train.py --ds_config configs/ds_zero2.json` with no other flag selects
`--model_name demo:emoji`: options the user did not set take the demo recipe's values
(vlm2vec.demo.run.DemoRecipe), the emoji data set is built once under `--demo_dir` (reused later, with
the image features and the baselines' evaluations), and `run_demo` evaluates the untrained model and
the linear probe, trains with `vlm2vec.train.train` (the same path as the big models) and evaluates the
trained model. The trained model lands in `--output_dir` (loads with `VLM2Vec.from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from vlm2vec.config import TrainConfig

GC_CHUNK = 32  # GradCache chunk (queries and targets) of the demo: the batch is re-encoded in chunks


def recipe_defaults() -> dict[str, Any]:
    """Trainer option -> value the demo run uses unless the option is set explicitly."""
    from vlm2vec.demo.run import DemoRecipe

    r = DemoRecipe()
    return {
        "max_steps": r.steps, "train_batch_size": r.batch_size, "learning_rate": r.lr,
        "warmup_steps": r.warmup_steps, "weight_decay": r.weight_decay, "temperature": r.temperature,
        "symmetric_loss": r.symmetric, "lora_r": r.lora_r, "lora_alpha": r.lora_alpha,
        "lora_dropout": r.lora_dropout, "pooling": r.pooling, "seed": r.seed,
        "subset_name": list(r.train_sets),
        "gc_q_chunk_size": min(GC_CHUNK, r.batch_size), "gc_p_chunk_size": min(GC_CHUNK, r.batch_size),
        "max_grad_norm": 0.0,  # the recipe does not clip
    }  # fmt: skip


def apply_demo_defaults(config: TrainConfig) -> TrainConfig:
    """The demo recipe's values for every option the user left unset (YAML or flags win)."""
    explicit = config.explicit
    values = {k: v for k, v in recipe_defaults().items() if k not in explicit}
    if "per_device_train_batch_size" in explicit:  # the user's per-device size wins over the recipe's batch
        values.pop("train_batch_size", None)
    return dataclasses.replace(config, **values)


def recipe_of(config: TrainConfig, world_size: int) -> Any:
    """The DemoRecipe that describes this run (for the demo's model build and its report)."""
    from vlm2vec.config import per_device_batch_size
    from vlm2vec.demo.run import DemoRecipe

    return dataclasses.replace(
        DemoRecipe(), steps=config.max_steps,
        batch_size=per_device_batch_size(config, world_size) * world_size,
        lr=config.learning_rate, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        temperature=config.temperature, symmetric=config.symmetric_loss, lora_r=config.lora_r,
        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        train_sets=tuple(config.subset_name or DemoRecipe().train_sets), pooling=config.pooling,
        seed=config.seed,
    )  # fmt: skip


def _train_config(config: TrainConfig, train_dir: Path) -> TrainConfig:
    return dataclasses.replace(config, dataset_name=str(train_dir))


def run_default_demo(config: TrainConfig) -> dict[str, Any] | None:
    """Build data (rank 0, once), then rank 0 runs the demo with the trainer as its train step while the
    other processes join the same training; returns the demo summary on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from vlm2vec.demo.emoji_data import build_emoji_dataset
    from vlm2vec.demo.run import TrainSpec, load_demo_model, render_demo_report, run_demo
    from vlm2vec.train import train

    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = recipe_of(config, world)
    demo_dir = Path(config.demo_dir)
    show = not config.disable_tqdm
    if rank == 0:  # run_demo finds this build complete and reuses it
        build_emoji_dataset(demo_dir / "data", n_train=config.demo_n_train, n_eval=config.demo_n_eval,
                            show_progress=show)  # fmt: skip
    dist.barrier()
    train_dir = demo_dir / "data" / "train"
    if rank != 0:  # joins rank 0's training (which starts once rank 0 has evaluated the baselines)
        cache = demo_dir / f"features-grid{recipe.image_grid}.pt"
        train(_train_config(config, train_dir), model=load_demo_model(recipe, str(cache)))
        return None

    def train_fn(model: Any, spec: TrainSpec) -> Any:
        result = train(_train_config(config, spec.train_dir), model=model)
        spec.log.extend({"step": s, "loss": v} for s, v in sorted(result.losses.items()))
        return result.engine.module

    summary = run_demo(demo_dir, train_fn=train_fn, recipe=recipe, n_train=config.demo_n_train,
                       n_eval=config.demo_n_eval, show_progress=show)  # fmt: skip
    print(render_demo_report(summary), flush=True)
    print(headline(summary), flush=True)
    with open(os.path.join(config.output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_demo_report(summary))
    return summary


def headline(summary: dict[str, Any]) -> str:
    """The last line of the run: image->name P@1 over the held-out names, baselines and trained."""
    from vlm2vec.demo.run import HEADLINE

    parts = [f"{key} {res['datasets'][HEADLINE[0]]['p_at_1']:.3f}" for key, res in summary["results"].items()]
    return f"{HEADLINE[1]} ({summary['n_eval']} candidates), P@1: " + ", ".join(parts)
