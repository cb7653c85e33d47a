"""Train a VLM2Vec embedding model: `deepspeed vlm2vec/train.py --ds_config configs/ds_zero2.json`.

With no other argument this trains the defaults on the CPU: a small real model (EfficientNet-Lite0 +
MiniLM, `--model_name demo:emoji`, recipe in vlm2vec/demo/recipe.py) on real image-text pairs built from
Debian packages (emoji + OpenClipArt, vlm2vec/demo/default_data.py), evaluated on their held-out split
against the untrained model and a frozen-feature probe (`--eval_data`, vlm2vec/train_eval.py).
`--config configs/<setup>.yaml` and `--key value` flags select a real setup; the VLM2Vec reference
implementation's flags are accepted too (see vlm2vec/config.py, `--help`).
Launchers: `deepspeed` (any ZeRO stage), `torchrun`, or plain `python vlm2vec/train.py` (one process).

One training step (the loop in `train`):

    batches[step]           rows of this step for this process, chosen by (seed, step) only
    collate(batch)          model inputs per GradCache chunk, each padded to its own longest row
    align_processes         ranks agree on chunk counts and per chunk on vision runs (ZeRO-3)
    contrastive_step(...)   chunks encoded without keeping activations -> loss over the global batch
    engine.backward(loss)   loss gradient -> each chunk re-encoded (same RNG) and back-propagated;
                            gradients reduced across processes once
    engine.step()           clip, AdamW, learning-rate schedule
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a script: sibling files must not shadow packages
    sys.path.pop(0)

import contextlib
import dataclasses
import json
import math
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlm2vec import checkpoint as ckpt
from vlm2vec import train_eval
from vlm2vec.config import (
    DEMO_MODEL,
    TINY_PREFIX,
    ConfigError,
    TrainConfig,
    format_config,
    load_config,
    per_device_batch_size,
    resolve_ds_config,
)
from vlm2vec.gradcache import contrastive_step

LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or Inf; raised before the optimizer step, so the weights are intact."""


@dataclass
class TrainResult:
    """What a finished run reports: the steps it ran, the loss of each (global mean over processes), and
    the DeepSpeed engine (its `.module` is the trained VLM2Vec) for programmatic use."""

    output_dir: str
    first_step: int
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)  # rank 0 with --eval_data: model -> scores
    engine: Any = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group the launcher describes (deepspeed / torchrun set RANK, WORLD_SIZE, ...);
    without a launcher, form a one-process group here (DeepSpeed would otherwise probe for MPI).
    Returns (rank, world_size, device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()),
        )
    import deepspeed
    import deepspeed.ops

    cuda = torch.cuda.is_available()
    if not cuda:  # training never uses DeepSpeed's shared-memory inference all-reduce; skip its JIT build
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores among the processes of this machine
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(values: list[float] | torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """`values` reduced over the processes (as given with one process), returned on the CPU.

    Bookkeeping collectives (losses, flags, chunk counts) start from host values, but NCCL only takes
    CUDA tensors: the values travel on the device the process group's backend uses."""
    values = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values.cpu()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    values = values.to(device)
    dist.all_reduce(values, op=op)
    return values.cpu()


def _all_mean(value: torch.Tensor) -> float:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return float(_all_reduce(value.float())) / world


def _peak_memory_mib() -> dict[str, int]:
    """Peak host RSS (and accelerator memory) so far, the largest over the processes, in MiB."""
    import resource

    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024]
    if torch.cuda.is_available():
        peaks.append(torch.cuda.max_memory_allocated() // 2**20)
    value = _all_reduce(peaks, dist.ReduceOp.MAX)
    names = ("peak_host_mib", "peak_gpu_mib")
    return {name: int(v) for name, v in zip(names, value.tolist())}


def _any_rank(flag: bool) -> bool:
    return bool(_all_reduce([float(flag)]).item() > 0)


def align_processes(raw: Any, batch: Any, collate: Any, zero_stage: int) -> Any:
    """This step's prepared batch, made to run the same submodules as every other process's.

    ZeRO-3 fetches each submodule's weights with collectives as the forward reaches it, so all ranks
    must run the same submodules in the same order. Two things differ across ranks with their rows:
    - the number of GradCache chunks (forward passes), when chunks are sized by a token budget: one
      all_reduce agrees on the most chunks any rank has, and a rank with fewer re-collates its rows
      into that many (its largest chunks split; GradCache is exact for any chunking);
    - the vision path's runs per chunk, once per kind of visual input (`model.visual_calls`): one
      rank's chunk is text-only, another's has an image. One all_reduce agrees, chunk by chunk, on the
      most vision runs any rank needs, and a rank with fewer adds zero-weighted dummy image passes
      (`VLM2Vec.forward`): the embeddings and gradients are exactly those without them.
    Done at every stage, so the path never depends on the stage; with one process there is nothing to
    agree on. ZeRO 0-2 hold whole weights, so there different chunk counts issue no other collectives."""
    from vlm2vec.model import DUMMY_VISION_KEY, visual_calls

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch
    counts = [len(batch.query_chunks), len(batch.cand_chunks)]
    most = [int(n) for n in _all_reduce(counts, dist.ReduceOp.MAX)]
    if zero_stage == 3 and counts != most and not batch.skipped:
        batch = collate(raw, min_chunks=tuple(most))
        counts = [len(batch.query_chunks), len(batch.cand_chunks)]
    fewest = [-int(n) for n in _all_reduce([-n for n in counts], dist.ReduceOp.MAX)]
    if most != fewest:
        if zero_stage == 3:
            raise ConfigError(
                "the processes have different numbers of GradCache chunks this step (rows dropped by "
                "--skip_bad_rows); ZeRO-3 needs the same on every rank: fix the rows, drop "
                "--skip_bad_rows, or use a ZeRO 0-2 config"
            )
        return batch
    chunks = list(batch.query_chunks) + list(batch.cand_chunks)
    calls = [visual_calls(chunk) for chunk in chunks]
    needed = _all_reduce(calls, dist.ReduceOp.MAX).tolist()
    for chunk, mine, n in zip(chunks, calls, needed):
        if n > mine:
            chunk[DUMMY_VISION_KEY] = int(n) - mine
    return batch


# --------------------------------------------------------------------------------------------- model
def build_model(config: TrainConfig, base: Any = None, ds_config: dict[str, Any] | None = None) -> Any:
    """The VLM2Vec encoder (`base` if given) with the trainable parts the options ask for (LoRA / full),
    in train mode.

    Under ZeRO-3 (`ds_config` stage 3) a pretrained backbone is loaded already partitioned: with
    transformers' `HfDeepSpeedConfig` alive, `from_pretrained` builds the model inside
    `deepspeed.zero.Init` and rank 0 copies each layer's checkpoint values into its gathered
    parameters, so no rank ever holds the whole model. LoRA layers then attach to the partitioned
    model (they are created whole; `deepspeed.initialize` partitions them). Tiny models (tests) are
    built whole: zero.Init would skip transformers' weight init and give other random weights than a
    1-process run."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from vlm2vec.backbones import ProcessorSettings
    from vlm2vec.model import VLM2Vec

    unset_hf_deepspeed_config()  # an earlier ZeRO-3 model of this process must not make this one partitioned
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    pretrained = base is None and (
        config.checkpoint_path
        or not (config.model_name == DEMO_MODEL or config.model_name.startswith(TINY_PREFIX))
    )
    # transformers keeps a weak reference only: held by the model below, as long as the model lives
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config) if zero3 and pretrained else None
    common = dict(pooling=config.pooling, normalize=config.normalize, max_len=config.max_len)
    dtype = torch.bfloat16 if config.bf16 else None
    if base is not None:
        model = base
    elif config.model_name == DEMO_MODEL:
        from vlm2vec.demo.default_data import FEATURE_FILE
        from vlm2vec.demo.recipe import load_demo_model

        # image features precomputed next to the training data, when its builder cached them
        cache = os.path.join(os.path.dirname(os.path.abspath(config.dataset_name or ".")), FEATURE_FILE)
        model = load_demo_model(config.seed, config.pooling, cache if os.path.isfile(cache) else None)
    elif config.checkpoint_path:
        model = VLM2Vec.from_pretrained(
            config.checkpoint_path,
            dtype=dtype,
            is_trainable=True,
            attn_implementation=config.attn_implementation,
            **common,
        )
    elif config.model_name.startswith(TINY_PREFIX):
        settings = ProcessorSettings(
            config.image_resolution or "native", config.min_pixels, config.max_pixels, config.num_crops,
            config.prompt_layout,
        )  # fmt: skip
        model = VLM2Vec.tiny(config.family, settings=settings, **common)
    else:
        model = VLM2Vec.from_pretrained(
            config.model_name, family=config.family, dtype=dtype,
            attn_implementation=config.attn_implementation, quantization=config.quantization,
            resolution=config.image_resolution, num_crops=config.num_crops, min_pixels=config.min_pixels,
            max_pixels=config.max_pixels, prompt_layout=config.prompt_layout, **common,
        )  # fmt: skip
    if config.lora and not model.is_peft:
        targets = lora_targets(config, model)
        model.add_lora(
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            targets=targets,
            dora=config.dora,
            vision=not config.freeze_vision,
        )
    elif not config.lora:
        model.enable_full_finetuning(train_vision=not config.freeze_vision)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.hf_deepspeed_config = hf_deepspeed_config  # alive as long as the model (peft's DoRA asks it too)
    model.train()
    if _vision_frozen(model):
        model.vision_tower.eval()  # frozen: deterministic, so its features can be reused in the recompute
    return model


def lora_targets(config: TrainConfig, model: Any) -> list[str] | None:
    """--lora_target_modules as a list (None: the family's), refused when names given explicitly match
    Linears inside the vision tower while --freeze_vision is true.

    The reference's peft config puts adapters wherever a name matches, CLIP towers included; here a frozen
    tower takes none, so an explicit target list that reaches into it contradicts --freeze_vision: the run
    says which, instead of silently training fewer modules than the list names. The family's default
    targets are resolved outside a frozen tower (they are LM names that CLIP happens to share)."""
    from vlm2vec.lora import lora_target_names

    if not config.lora_target_modules:
        return None
    targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()]
    tower = model.vision_tower
    if config.freeze_vision and tower is not None:
        inside = lora_target_names(tower, targets)
        if inside:
            names = sorted({n.rsplit(".", 1)[-1] for n in inside})
            raise ConfigError(
                f"--lora_target_modules names {','.join(names)}, which match {len(inside)} Linear modules "
                f"inside the vision tower (e.g. {inside[0]}), but --freeze_vision is true: set "
                "--freeze_vision false to train adapters there (the reference does), or name only "
                "language-model modules"
            )
    return targets


def image_tokens_per_image(model: Any) -> int:
    """Tokens one image costs at the model's image settings: exact for a resolution preset (every image
    is resized to it), the most any image can cost otherwise (a 4096x4096 probe: Qwen's max_pixels,
    LLaVA-NeXT's largest anyres grid and Phi-3.5-V's crop count cap it)."""
    from PIL import Image

    probe = Image.new("RGB", model.settings.image_size or (4096, 4096))
    return int(model.count_tokens("", probe)) - int(model.count_tokens(""))


def check_fit(config: TrainConfig, model: Any) -> None:
    """ConfigError, before any batch is built, when the longest row the options allow cannot fit.

    That row is one image at the configured resolution plus --max_len text tokens (image tokens do not
    count toward --max_len and are never cut). It cannot fit when it is longer than the language model's
    max_position_embeddings (positions it never saw), or when the image alone exceeds
    --gc_max_visual_tokens (a GradCache chunk's token budget: every image row would break it; a budget
    below image + max_len is fine, long-text rows then get a chunk of their own). Without this check the
    run would find out at the first such row, possibly many steps in. Rows with several images or a
    video are not bounded here."""
    if model.vision_tower is None or config.model_name == DEMO_MODEL:  # the demo: 1 feature token/image
        return
    n_image = image_tokens_per_image(model)
    longest = n_image + config.max_len
    text_config = model.hf_model.config
    text_config = text_config.get_text_config() if hasattr(text_config, "get_text_config") else text_config
    limit = getattr(text_config, "max_position_embeddings", None)
    what = (
        f"one image at {model.settings.resolution} resolution costs {n_image} tokens, so with --max_len "
        f"{config.max_len} text tokens a row can be {longest} tokens long"
    )
    if limit is not None and longest > limit:
        raise ConfigError(f"{what}, more than the model's {limit} positions: lower --max_len or resolution")
    budget = config.gc_max_visual_tokens if config.grad_cache else None
    if budget is not None and n_image > budget:
        raise ConfigError(
            f"one image at {model.settings.resolution} resolution costs {n_image} tokens, more than "
            f"--gc_max_visual_tokens {budget} (a GradCache chunk's budget): raise it to {n_image} or more"
        )


def _vision_frozen(model: Any) -> bool:
    tower = model.vision_tower
    return tower is not None and not any(p.requires_grad for p in tower.parameters())


def make_scheduler(config: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """Warmup (linear from 0) then linear / cosine decay to 0, or constant; HF's formulas."""
    warmup = config.warmup_steps or int(math.ceil(config.warmup_ratio * total_steps))
    kind = config.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup and kind != "constant":
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
        return max(0.0, 1.0 - progress)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------- data
def default_train_data(output_dir: str) -> str:
    """The default run's data: small synthetic MMEB-format rows (written once, by rank 0)."""
    from vlm2vec.synthetic import write_synthetic_mmeb

    root = os.path.join(output_dir, "synthetic_data")
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not os.path.isdir(os.path.join(root, "train")):
            write_synthetic_mmeb(root, rows=64, image_size=48, seed=0)
    if dist.is_initialized():
        dist.barrier()
    return os.path.join(root, "train")


def with_default_data(config: TrainConfig) -> TrainConfig:
    """The default model without --dataset_name trains on the default data (emoji + OpenClipArt, built
    once by rank 0 in --demo_dir) and, unless --eval_data is given, evaluates on its held-out split."""
    if config.model_name != DEMO_MODEL or config.dataset_name or config.checkpoint_path:
        return config
    from vlm2vec.demo.default_data import build_default_dataset

    root = os.path.join(config.demo_dir, "data")
    if not dist.is_initialized() or dist.get_rank() == 0:
        build_default_dataset(
            root, emoji_n_train=config.demo_n_train, emoji_n_eval=config.demo_n_eval,
            clipart_n_eval=config.demo_clipart_n_eval, clipart_limit=config.demo_clipart_drawings,
            show_progress=not config.disable_tqdm,
        )  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
    eval_data = config.eval_data or os.path.join(root, "eval")
    return dataclasses.replace(config, dataset_name=os.path.join(root, "train"), eval_data=eval_data)


def load_data(config: TrainConfig) -> Any:
    """Training rows, read and validated before any model is built (bad rows fail fast, naming the row)."""
    from vlm2vec.data import load_train_mix

    source = config.dataset_name or default_train_data(config.output_dir)
    return load_train_mix(
        source, weights=config.subset_weights, subsets=config.subset_name, split=config.dataset_split,
        image_root=config.image_dir,
        num_sample_per_subset=config.num_sample_per_subset, num_negatives=config.num_hard_negatives,
        missing_negatives=config.missing_negatives, skip_bad_rows=config.skip_bad_rows,
        num_frames=config.num_frames,
    )  # fmt: skip


def make_batches(config: TrainConfig, data: Any, model: Any, rank: int, world: int) -> tuple[Any, Any, int]:
    """(batches, collate, total_steps): this rank's step-indexed batches and the per-chunk collator."""
    from vlm2vec.data import ChunkCollator, TrainBatches

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


def _prepared_batches(batches: Any, collate: Any, start: int, stop: int, workers: int, seed: int):
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


# ------------------------------------------------------------------------------------------- logging
class RunLog:
    """Progress bar (rank 0), JSONL log and TensorBoard scalars."""

    def __init__(self, config: TrainConfig, rank: int, start: int, total: int, samples_per_step: int):
        self.rank, self.samples_per_step, self.start = rank, samples_per_step, start
        self.bar = self.writer = None
        self.t0 = time.perf_counter()
        self.path = os.path.join(config.output_dir, LOG_FILE)
        if rank != 0:
            return
        os.makedirs(config.output_dir, exist_ok=True)
        _truncate_log(self.path, start)
        if config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.logging_dir or os.path.join(config.output_dir, "tensorboard"))
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            desc="train",
            dynamic_ncols=True,
            disable=config.disable_tqdm,
        )

    def step(self, step: int, record: dict[str, Any], write: bool) -> None:
        if self.rank != 0:
            return
        elapsed = time.perf_counter() - self.t0
        done = step + 1 - self.start
        speed = round(done * self.samples_per_step / elapsed, 3)
        record = {"step": step + 1, **record, "samples_per_s": speed, "elapsed_s": round(elapsed, 3)}
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_s']:.1f}"
        )
        if not write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "samples_per_s"):
                if isinstance(record.get(key), int | float):
                    self.writer.add_scalar(f"train/{key}", record[key], step + 1)

    def scores(self, step: int, key: str, scores: dict[str, Any] | None) -> None:
        """One evaluation's P@1 per task (and overall) as a log line and TensorBoard scalars."""
        if self.rank != 0 or scores is None:
            return
        p_at_1 = {name: m["p_at_1"] for name, m in scores["datasets"].items()}
        p_at_1["overall"] = scores["aggregate"]["Overall"]["p_at_1"]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "eval": key, "p_at_1": p_at_1}) + "\n")
        if self.writer is not None:
            for name, value in p_at_1.items():
                self.writer.add_scalar(f"eval_{key}/{name}", value, step)

    def message(self, text: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _truncate_log(path: str, keep_through: int) -> None:
    """Drop log lines of steps after `keep_through` (a resumed run rewrites them)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_through]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


# --------------------------------------------------------------------------------------------- train
def _model_saver(engine: Any, model: Any, zero_stage: int) -> Callable[[str], None]:
    """save(directory): VLM2Vec.save_pretrained on rank 0 (weights gathered first under ZeRO-3)."""

    def save(directory: str) -> None:
        gather = contextlib.nullcontext()
        if zero_stage == 3:
            import deepspeed

            # an adapter over a base that has a path is saved alone: gather only the trained weights
            adapter_only = model.is_peft and model.base_path
            params = [p for p in model.parameters() if p.requires_grad or not adapter_only]
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            if dist.get_rank() == 0:
                model.save_pretrained(directory)

    return save


def _batch_label(raw: Any) -> str:
    sources = list(getattr(raw, "sources", []) or [])
    subsets = sorted(set(getattr(raw, "subsets", []) or []))
    shown = "; ".join(sources[:4]) + (f"; ... ({len(sources)} rows)" if len(sources) > 4 else "")
    return f"subsets {subsets}, rows: {shown or 'unknown'}"


def _loss_fn(temperature: float, targets: torch.Tensor, group: Any, symmetric: bool = False) -> Callable:
    """InfoNCE of this batch: embeddings are already normalised by the model (when asked), targets index
    this rank's candidates, `group` adds the other ranks' candidates as negatives."""
    from vlm2vec_kernels import contrastive_loss

    def loss_fn(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(
            queries,
            candidates,
            temperature,
            normalize=False,
            targets=targets.to(queries.device),
            group=group,
            symmetric=symmetric,
        )

    return loss_fn


def train(config: TrainConfig, model: Any = None) -> TrainResult:
    """Run training in the already-initialised process group (see `main`); `model`: a VLM2Vec to start
    from instead of building one from the options (LoRA etc. are still added as the options say)."""
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = resolve_ds_config(config, world)  # ConfigError before anything is built
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    global_batch = per_device_batch_size(config, world) * world
    resume_from = ckpt.resolve_resume(config.resume, config.output_dir)
    plan = None
    if resume_from is not None:  # ResumeError before anything is built
        plan = ckpt.plan_resume(
            resume_from, world_size=world, zero_stage=zero_stage, global_batch=global_batch
        )
        if plan.universal:
            ckpt.to_universal(plan.path)
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({"options": config.to_dict(), "deepspeed": ds_config, "world_size": world}, f, indent=2)
        for name in config.ignored:
            print(f"note: --{name} is accepted for compatibility and has no effect here")

    data = load_data(config)
    seed_everything(config.seed)  # same initial weights (LoRA init) on every rank
    model = build_model(config, base=model, ds_config=ds_config)
    check_fit(config, model)
    batches, collate, total_steps = make_batches(config, data, model, rank, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: every parameter is frozen (check --lora / --freeze_vision)")
    optimizer = None
    if "optimizer" not in ds_config:
        betas = (config.adam_beta1, config.adam_beta2)
        optimizer = torch.optim.AdamW(
            trainable,
            lr=config.learning_rate,
            betas=betas,
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
    # what DeepSpeed's universal-checkpoint converter needs to find in a ZeRO 1/2 checkpoint (it re-splits
    # the flat optimizer state at another world size; pure data parallelism: no tensor-parallel patterns)
    from deepspeed.checkpoint import constants as uc

    setattr(
        model,
        uc.UNIVERSAL_CHECKPOINT_INFO,
        {uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer,
        lr_scheduler=make_scheduler(config, total_steps), config=ds_config,
    )  # fmt: skip
    group = dist.group.WORLD if world > 1 and config.cross_device_negatives else None
    reuse = config.reuse_vision_features and config.grad_cache and _vision_frozen(model)
    save_model = _model_saver(engine, model, zero_stage)

    def state(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data": {"step": step, "fingerprint": batches.sampler.fingerprint()},
            "world_size": world,
            "zero_stage": zero_stage,
            "total_steps": total_steps,
            "options": config.to_dict(),
        }

    start = 0
    seed_everything(config.seed + 1000 * rank)  # dropout differs across ranks, reproducibly
    if plan is not None:
        batches.load_state_dict(plan.state["data"])  # global position: valid at any world size
        start = plan.state["step"]
        if not ckpt.load_checkpoint(engine, plan):  # restores this rank's RNG when the world is the same
            seed_everything(config.seed + 1000 * rank + start)  # another world size: a fresh stream
    log = RunLog(config, rank, start, total_steps, global_batch)
    eval_dir = os.path.join(config.output_dir, "eval")
    show = not config.disable_tqdm
    results: dict[str, Any] = {}
    if config.eval_data:  # before the first step: what the training must beat (cached)
        results = train_eval.baselines(engine.module, data, config.eval_data, eval_dir, zero_stage, show)
        if start == 0:  # a resumed run's log has them already
            for key, scores in results.items():
                log.scores(0, key, scores)
        log.t0 = time.perf_counter()  # samples/s of the steps alone
    if plan is not None:
        saved_world = plan.state.get("world_size", world)
        how = f" (written by {saved_world} processes)" if saved_world != world else ""
        log.message(f"resumed from {plan.path} at step {start}{how}")
    result = TrainResult(config.output_dir, start, start, engine=engine)
    saved_at = start
    try:
        for step, raw, batch in _prepared_batches(
            batches, collate, start, total_steps, config.dataloader_num_workers, config.seed
        ):
            batch = align_processes(raw, batch, collate, zero_stage)
            loss_fn = _loss_fn(config.temperature, batch.targets, group, config.symmetric_loss)
            with model.reuse_vision_features() if reuse else contextlib.nullcontext():
                loss = contrastive_step(
                    engine.module,
                    batch.query_chunks,
                    batch.cand_chunks,
                    loss_fn,
                    grad_cache=config.grad_cache,
                )
                bad = _any_rank(not bool(torch.isfinite(loss.detach()).item()))
                if bad and not config.skip_nonfinite_loss:
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (rank {rank} loss {loss.item()}); batch: "
                        f"{_batch_label(raw)}. Stopped before the optimizer step: the weights and the last "
                        "checkpoint are intact. Pass --skip_nonfinite_loss to skip such batches instead."
                    )
                if not bad:
                    engine.backward(loss)
            if bad:
                log.message(f"step {step + 1}: non-finite loss, batch skipped ({_batch_label(raw)})")
                result.skipped_steps.append(step + 1)
                scheduler.step()  # the schedule stays aligned with the step count
                loss_value, grad_norm = float("nan"), None
            else:
                engine.step()
                loss_value = _all_mean(loss)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at step {step + 1}; batch: {_batch_label(raw)}. The "
                        "weights of this step are suspect; resume from the last checkpoint."
                    )
            result.losses[step + 1] = loss_value
            result.last_step = step + 1
            record = {
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else float(grad_norm),
            }
            write = (step + 1) % config.logging_steps == 0 or step + 1 == total_steps
            if write:  # the same steps on every rank: one small all_reduce
                record.update(_peak_memory_mib())
            log.step(step, record, write=write)
            if config.save_steps and (step + 1) % config.save_steps == 0:
                ckpt.save_checkpoint(
                    engine,
                    save_model,
                    config.output_dir,
                    step + 1,
                    state(step + 1),
                    total_limit=config.save_total_limit,
                )
                saved_at = step + 1
            if config.eval_data and config.eval_steps and (step + 1) % config.eval_steps == 0:
                if step + 1 != total_steps:  # the last step's evaluation follows the save
                    scores = train_eval.evaluate_model(
                        engine.module, config.eval_data, f"{eval_dir}/step-{step + 1}",
                        f"step {step + 1}", zero_stage,
                    )  # fmt: skip
                    log.scores(step + 1, "trained", scores)
        if saved_at != total_steps:
            ckpt.save_checkpoint(
                engine,
                save_model,
                config.output_dir,
                total_steps,
                state(total_steps),
                total_limit=config.save_total_limit,
            )
        save_model(config.output_dir)
        dist.barrier()
        log.message(f"done: {total_steps} steps; model saved to {config.output_dir}")
        if config.eval_data:  # the saved model, scored as `python -m vlm2vec.eval` scores it
            scores = train_eval.evaluate_model(
                engine.module, config.eval_data, f"{eval_dir}/trained", "trained model", zero_stage, show
            )
            log.scores(total_steps, "trained", scores)
            if rank == 0:
                results["trained"] = scores
                report = train_eval.table(results)
                with open(os.path.join(config.output_dir, "report.md"), "w", encoding="utf-8") as f:
                    f.write(report)
                log.message(report)
                log.message(train_eval.headline(config.eval_data, results))
            result.eval = results
    finally:
        log.close()
    return result


def preflight(config: TrainConfig, world: int) -> None:
    """Everything that can be refused from the options, the DeepSpeed JSON, the world size and the
    checkpoint to resume: ConfigError / ResumeError before the process group, data or model exist."""
    ds_config = resolve_ds_config(config, world)
    resume_from = ckpt.resolve_resume(config.resume, config.output_dir)
    if resume_from is not None:
        stage = int(ds_config["zero_optimization"].get("stage", 0))
        global_batch = per_device_batch_size(config, world) * world
        ckpt.plan_resume(resume_from, world_size=world, zero_stage=stage, global_batch=global_batch)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: parse, check, join the process group, train, leave the group."""
    try:
        config = load_config(argv)
        preflight(config, int(os.environ.get("WORLD_SIZE", "1")))  # the launcher's world size
    except (ConfigError, ckpt.ResumeError) as err:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops; one message
            print(f"vlm2vec/train.py: error: {err}", file=sys.stderr)
        return 2
    rank, world, _ = init_distributed()
    try:
        if rank == 0:
            print(f"vlm2vec: {world} process(es)\n{format_config(config)}", flush=True)
        train(with_default_data(config))
    except (ConfigError, ckpt.ResumeError, NonFiniteLossError) as err:
        if rank == 0 or not isinstance(err, ConfigError):  # option errors are the same on every rank
            print(f"vlm2vec/train.py: error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 1 if isinstance(err, NonFiniteLossError) else 2
    except Exception as err:
        from vlm2vec.data import DataError

        if not isinstance(err, DataError | FileNotFoundError):
            raise
        print(f"vlm2vec/train.py: data error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
