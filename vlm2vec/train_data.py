"""The rows a run trains on and their step-indexed batches: `load_data` reads and checks the rows before
any model exists, `make_batches` gives this rank's batches and the per-chunk collator, `prepared_batches`
prepares them (in background workers when asked). The default model without --dataset_name trains on
its default data (`with_default_data`); any other model needs --dataset_name.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from vlm2vec import distributed
from vlm2vec.config import DEMO_MODEL, TrainConfig
from vlm2vec.data import (
    ChunkCollator,
    ContrastiveBatch,
    PreparedBatch,
    TrainBatches,
    TrainData,
    load_train_mix,
)
from vlm2vec.demo.default_data import build_default_dataset
from vlm2vec.ds_config import per_device_batch_size
from vlm2vec.errors import ConfigError

if TYPE_CHECKING:
    from vlm2vec.model import VLM2Vec


def with_default_data(config: TrainConfig) -> TrainConfig:
    """The default model without --dataset_name trains on the default data (emoji + OpenClipArt, built
    once by rank 0 in --demo_dir) and, unless --eval_data is given (`--eval_data ''`: no evaluation),
    evaluates on its held-out split."""
    if config.model_name != DEMO_MODEL or config.dataset_name or config.checkpoint_path:
        return config
    root = os.path.join(config.demo_dir, "data")
    if distributed.rank() == 0:
        build_default_dataset(
            root, emoji_n_train=config.demo_n_train, emoji_n_eval=config.demo_n_eval,
            clipart_n_eval=config.demo_clipart_n_eval, clipart_limit=config.demo_clipart_drawings,
            show_progress=not config.disable_tqdm,
        )  # fmt: skip
    distributed.barrier()
    eval_data = config.eval_data if "eval_data" in config.explicit else os.path.join(root, "eval")
    return dataclasses.replace(config, dataset_name=os.path.join(root, "train"), eval_data=eval_data)


def check_has_data(config: TrainConfig) -> None:
    """ConfigError when no training data is named: only the default model has default data."""
    if not config.dataset_name and (config.model_name != DEMO_MODEL or config.checkpoint_path):
        raise ConfigError(
            f"--model_name {config.model_name}: no training data; pass --dataset_name (a folder or file of "
            f"MMEB-format rows, or a hub name); only the default model ({DEMO_MODEL}) has default data"
        )


def load_data(config: TrainConfig) -> TrainData:
    """Training rows, read and validated before any model is built (bad rows fail fast, naming the row)."""
    check_has_data(config)
    return load_train_mix(
        config.dataset_name, weights=config.subset_weights, subsets=config.subset_name,
        split=config.dataset_split, image_root=config.image_dir,
        num_sample_per_subset=config.num_sample_per_subset, num_negatives=config.num_hard_negatives,
        missing_negatives=config.missing_negatives, skip_bad_rows=config.skip_bad_rows,
        num_frames=config.num_frames,
    )  # fmt: skip


def make_batches(
    config: TrainConfig, data: TrainData, model: VLM2Vec, rank: int, world: int
) -> tuple[TrainBatches, ChunkCollator, int]:
    """(batches, collate, total_steps): this rank's step-indexed batches and the per-chunk collator."""
    per_device = per_device_batch_size(config, world)
    total = config.max_steps
    if total <= 0:
        rows = per_device * world
        total = math.ceil(config.num_train_epochs * max(1, len(data) // rows))
    batches = TrainBatches(
        data,
        per_device * world,
        weights=data.weights or config.subset_weights,
        # VLM2Vec V2.0: a global run of interleave_batch_size x processes rows from one subset, split so
        # each process gets interleave_batch_size of them (reference src/data/loader/mixed_dataset.py)
        homogeneous_size=config.interleave_batch_size * world if config.interleave_batch_size else None,
        seed=config.seed,
        num_steps=total,
        rank=rank,
        world_size=world,
        skip_bad_rows=config.skip_bad_rows,
        spread_groups=bool(config.interleave_batch_size),
    )
    group = config.num_hard_negatives + 1
    q_chunk = config.gc_q_chunk_size if config.grad_cache else per_device
    c_chunk = config.gc_p_chunk_size if config.grad_cache else per_device * group
    budget = config.gc_max_visual_tokens if config.grad_cache else None
    if budget is not None:  # chunks by tokens; row sizes only where given explicitly
        q_chunk = q_chunk if "gc_q_chunk_size" in config.explicit else None
        c_chunk = c_chunk if "gc_p_chunk_size" in config.explicit else None
    collate = ChunkCollator(
        model,
        query_chunk_size=q_chunk,
        cand_chunk_size=c_chunk,
        sort_by_length=config.sort_by_length,
        skip_bad_rows=config.skip_bad_rows,
        max_tokens=budget,
        group_size=config.interleave_batch_size,
    )
    return batches, collate, total


def prepared_batches(
    batches: TrainBatches, collate: ChunkCollator, start: int, stop: int, workers: int, seed: int
) -> Iterator[tuple[int, ContrastiveBatch, PreparedBatch]]:
    """(step, raw batch, prepared batch) for steps start..stop-1, prepared in background when asked."""
    if workers == 0:
        for step in range(start, stop):
            raw = batches[step]
            yield step, raw, collate(raw)
        return
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
        collate_fn=lambda raw: (raw, collate(raw)), generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip  # own generator: the loader must not draw from the global RNG (exact resume)
    for step, (raw, prepared) in zip(range(start, stop), loader):
        yield step, raw, prepared
