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

Around it: `build.py` (the model), `train_data.py` (rows and batches), `run_log.py` (progress, JSONL,
TensorBoard), `checkpoint.py` (save / resume), `train_eval.py` (evaluation during training).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a script: sibling files must not shadow packages
    sys.path.pop(0)

import contextlib
import json
import math
import random
import resource
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from vlm2vec_kernels import contrastive_loss

from vlm2vec import checkpoint as ckpt
from vlm2vec import distributed, train_eval
from vlm2vec.build import build_model, check_fit, vision_frozen
from vlm2vec.config import TrainConfig, format_config
from vlm2vec.config_parse import load_config
from vlm2vec.data import ChunkCollator, ContrastiveBatch, PreparedBatch
from vlm2vec.ds_config import per_device_batch_size, resolve_ds_config
from vlm2vec.errors import ConfigError, DataError
from vlm2vec.gradcache import contrastive_step
from vlm2vec.model import DUMMY_VISION_KEY, VLM2Vec, visual_calls
from vlm2vec.run_log import RunLog
from vlm2vec.train_data import check_has_data, load_data, make_batches, prepared_batches, with_default_data

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from torch.optim.lr_scheduler import LRScheduler


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
    engine: DeepSpeedEngine | None = field(default=None, repr=False)


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
        distributed.prepare_finish()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mib() -> dict[str, int]:
    """Peak host RSS (and accelerator memory) so far, the largest over the processes, in MiB."""
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024]
    if torch.cuda.is_available():
        peaks.append(torch.cuda.max_memory_allocated() // 2**20)
    value = distributed.all_reduce(peaks, dist.ReduceOp.MAX)
    names = ("peak_host_mib", "peak_gpu_mib")
    return {name: int(v) for name, v in zip(names, value.tolist())}


def align_processes(
    raw: ContrastiveBatch, batch: PreparedBatch, collate: ChunkCollator, zero_stage: int
) -> PreparedBatch:
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
    if distributed.world_size() == 1:
        return batch
    counts = [len(batch.query_chunks), len(batch.cand_chunks)]
    most = [int(n) for n in distributed.all_reduce(counts, dist.ReduceOp.MAX)]
    if zero_stage == 3 and counts != most and not batch.skipped:
        batch = collate(raw, min_chunks=tuple(most))
        counts = [len(batch.query_chunks), len(batch.cand_chunks)]
    fewest = [-int(n) for n in distributed.all_reduce([-n for n in counts], dist.ReduceOp.MAX)]
    if most != fewest:
        if zero_stage == 3:
            raise ConfigError(
                "the processes have different numbers of GradCache chunks this step (rows dropped by "
                "--skip_bad_rows, or rows with fewer hard negatives than the others); ZeRO-3 needs the same "
                "on every rank: fix the rows, raise --gc_p_chunk_size to at least 1 + --num_hard_negatives, "
                "drop --skip_bad_rows, or use a ZeRO 0-2 config"
            )
        return batch
    chunks = list(batch.query_chunks) + list(batch.cand_chunks)
    calls = [visual_calls(chunk) for chunk in chunks]
    needed = distributed.all_reduce(calls, dist.ReduceOp.MAX).tolist()
    for chunk, mine, n in zip(chunks, calls, needed):
        if n > mine:
            chunk[DUMMY_VISION_KEY] = int(n) - mine
    return batch


def make_scheduler(config: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], LRScheduler]:
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


@dataclass
class RunPlan:
    """What the options, the DeepSpeed JSON, the world size and the checkpoint to resume decide before
    the process group, data or model exist (`preflight`)."""

    ds_config: dict[str, Any]
    zero_stage: int
    global_batch: int
    resume: ckpt.ResumePlan | None


def preflight(config: TrainConfig, world: int) -> RunPlan:
    """Everything that can be refused from the options, the DeepSpeed JSON, the world size and the
    checkpoint to resume: ConfigError / ResumeError before the process group, data or model exist.
    `main` calls it before joining the process group, `train` as its first step."""
    check_has_data(config)
    ds_config = resolve_ds_config(config, world)
    zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
    global_batch = per_device_batch_size(config, world) * world
    resume_from = ckpt.resolve_resume(config.resume, config.output_dir)
    plan = None
    if resume_from is not None:
        plan = ckpt.plan_resume(
            resume_from, world_size=world, zero_stage=zero_stage, global_batch=global_batch
        )
    return RunPlan(ds_config, zero_stage, global_batch, plan)


def _write_run_config(config: TrainConfig, run: RunPlan, world: int) -> None:
    """train_config.json (the options, the resolved DeepSpeed config, the world size), on rank 0."""
    if distributed.rank() != 0:
        return
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"options": config.to_dict(), "deepspeed": run.ds_config, "world_size": world}, f, indent=2)
    for name in config.ignored:
        print(f"note: --{name} is accepted for compatibility and has no effect here")


def make_engine(
    config: TrainConfig, model: VLM2Vec, ds_config: dict[str, Any], total_steps: int
) -> tuple[DeepSpeedEngine, LRScheduler]:
    """(DeepSpeed engine, learning-rate scheduler) over the model's trainable parameters; AdamW here
    unless the DeepSpeed JSON names its own optimizer (e.g. CPU Adam for ZeRO-Offload)."""
    import deepspeed
    from deepspeed.checkpoint import constants as uc

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: every parameter is frozen (check --lora / --freeze_vision)")
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(
            trainable,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
    # what DeepSpeed's universal-checkpoint converter needs to find in a ZeRO 1/2 checkpoint (it re-splits
    # the flat optimizer state at another world size; pure data parallelism: no tensor-parallel patterns)
    setattr(
        model,
        uc.UNIVERSAL_CHECKPOINT_INFO,
        {uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer,
        lr_scheduler=make_scheduler(config, total_steps), config=ds_config,
    )  # fmt: skip
    return engine, scheduler


def _model_saver(model: VLM2Vec, zero_stage: int) -> Callable[[str], None]:
    """save(directory): VLM2Vec.save_pretrained on rank 0 (weights gathered first under ZeRO-3)."""

    def save(directory: str) -> None:
        # an adapter over a base that has a path is saved alone: gather only the trained weights
        adapter_only = model.is_peft and model.base_path
        params = [p for p in model.parameters() if p.requires_grad or not adapter_only]
        with distributed.gathered_parameters(params, zero_stage):
            if distributed.rank() == 0:
                model.save_pretrained(directory)

    return save


def _batch_label(raw: ContrastiveBatch) -> str:
    sources = list(getattr(raw, "sources", []) or [])
    subsets = sorted(set(getattr(raw, "subsets", []) or []))
    shown = "; ".join(sources[:4]) + (f"; ... ({len(sources)} rows)" if len(sources) > 4 else "")
    return f"subsets {subsets}, rows: {shown or 'unknown'}"


def loss_function(
    temperature: float,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None,
    symmetric: bool = False,
    *,
    candidate_ids: torch.Tensor | None = None,
    positives: str = "mask",
    matryoshka_dims: Sequence[int] | None = None,
    false_negative_margin: float | None = None,
    normalize: bool = False,
) -> Callable:
    """InfoNCE of this batch: embeddings are already normalised by the model (when asked), targets index
    this rank's candidates, `group` adds the other ranks' candidates as negatives (their ids with them).

    candidate_ids (the collator's item ids of this rank's candidates) with `positives` mask / any / each
    say which candidates are copies of a query's positive; positives="none" drops them (every other
    candidate is a negative, as the reference trains). `normalize`: re-normalise each Matryoshka prefix
    (a prefix of a unit vector is not one; on the full vector it changes nothing, gradients included)."""
    ids = None if positives == "none" else candidate_ids
    if ids is not None and group is None and ids.unique().numel() == ids.numel():
        ids = None  # no copies (a CPU check, no sync): the plain loss is the same and takes the fused path
    options: dict[str, Any] = {}
    if ids is not None:
        options.update(candidate_ids=ids, positives=positives)
    if matryoshka_dims is not None:
        options["matryoshka_dims"] = list(matryoshka_dims)
    if false_negative_margin is not None:
        options["false_negative_margin"] = float(false_negative_margin)

    def loss_fn(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        on_device = {"candidate_ids": ids.to(queries.device)} if ids is not None else {}
        return contrastive_loss(
            queries,
            candidates,
            temperature,
            normalize=normalize,
            targets=targets.to(queries.device),
            group=group,
            symmetric=symmetric,
            **{**options, **on_device},
        )

    return loss_fn


def step_loss_function(
    config: TrainConfig, batch: PreparedBatch, group: dist.ProcessGroup | None
) -> Callable:
    """`loss_function` of one step as the options say (--positives, --matryoshka_dims,
    --false_negative_margin), with the batch's targets and item ids."""
    return loss_function(
        config.temperature,
        batch.targets,
        group,
        config.symmetric_loss,
        candidate_ids=batch.candidate_ids,
        positives=config.positives,
        matryoshka_dims=config.matryoshka_dims,
        false_negative_margin=config.false_negative_margin,
        normalize=config.matryoshka_dims is not None and config.normalize,
    )


def train_step(
    engine: DeepSpeedEngine, scheduler: LRScheduler, batch: PreparedBatch, raw: ContrastiveBatch, step: int,
    loss_fn: Callable, config: TrainConfig, reuse: bool,
) -> tuple[float, float | None]:  # fmt: skip
    """One optimizer step: contrastive loss -> backward -> step; (global mean loss, gradient norm).

    A non-finite loss on any rank (all ranks agree) stops the run before the optimizer step, weights
    intact, or with --skip_nonfinite_loss skips the batch: (nan, None), the schedule still advances so
    it stays aligned with the step count. A non-finite gradient norm after the step always stops."""
    model = engine.module
    with model.reuse_vision_features() if reuse else contextlib.nullcontext():
        loss = contrastive_step(
            model, batch.query_chunks, batch.cand_chunks, loss_fn, grad_cache=config.grad_cache
        )
        bad = distributed.any_rank(not bool(torch.isfinite(loss.detach()).item()))
        if bad and not config.skip_nonfinite_loss:
            raise NonFiniteLossError(
                f"non-finite loss at step {step + 1} (rank {distributed.rank()} loss {loss.item()}); batch: "
                f"{_batch_label(raw)}. Stopped before the optimizer step: the weights and the last "
                "checkpoint are intact. Pass --skip_nonfinite_loss to skip such batches instead."
            )
        if not bad:
            engine.backward(loss)
    if bad:
        scheduler.step()
        return float("nan"), None
    engine.step()
    loss_value = distributed.all_mean(loss)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        raise NonFiniteLossError(
            f"non-finite gradient norm at step {step + 1}; batch: {_batch_label(raw)}. The "
            "weights of this step are suspect; resume from the last checkpoint."
        )
    return loss_value, None if grad_norm is None else float(grad_norm)


def train(config: TrainConfig, model: VLM2Vec | None = None) -> TrainResult:
    """Run training in the already-initialised process group (see `main`); `model`: a VLM2Vec to start
    from instead of building one from the options (LoRA etc. are still added as the options say)."""
    rank, world = distributed.rank_world()
    config = with_default_data(config)  # the default model's own data, unless --dataset_name names some
    run = preflight(config, world)  # ConfigError / ResumeError before anything is built
    if run.resume is not None and run.resume.universal:
        ckpt.to_universal(run.resume.path)
        run.ds_config["checkpoint"] = {**run.ds_config.get("checkpoint", {}), "load_universal": True}
    _write_run_config(config, run, world)
    data = load_data(config)
    seed_everything(config.seed)  # same initial weights (LoRA init) on every rank
    model = build_model(config, base=model, ds_config=run.ds_config)
    check_fit(config, model)
    batches, collate, total_steps = make_batches(config, data, model, rank, world)
    engine, scheduler = make_engine(config, model, run.ds_config, total_steps)
    group = dist.group.WORLD if world > 1 and config.cross_device_negatives else None
    reuse = config.reuse_vision_features and config.grad_cache and vision_frozen(model)
    save_model = _model_saver(model, run.zero_stage)

    def save(step: int) -> None:
        state = {
            "step": step, "data": {"step": step, "fingerprint": batches.sampler.fingerprint()},
            "world_size": world, "zero_stage": run.zero_stage, "total_steps": total_steps,
            "options": config.to_dict(),
        }  # fmt: skip
        ckpt.save_checkpoint(
            engine, save_model, config.output_dir, step, state, total_limit=config.save_total_limit
        )

    eval_dims = config.eval_dims or config.matryoshka_dims  # prefixes scored beside the full embedding

    def evaluate(name: str, label: str, show: bool = False) -> dict[str, Any] | None:
        where = os.path.join(config.output_dir, "eval", name)
        return train_eval.evaluate_model(
            engine.module, config.eval_data, where, label, run.zero_stage, show, eval_dims
        )

    start = 0
    seed_everything(config.seed + 1000 * rank)  # dropout differs across ranks, reproducibly
    if run.resume is not None:
        batches.load_state_dict(run.resume.state["data"])  # global position: valid at any world size
        start = run.resume.state["step"]
        if not ckpt.load_checkpoint(
            engine, run.resume
        ):  # restores this rank's RNG when the world is the same
            seed_everything(config.seed + 1000 * rank + start)  # another world size: a fresh stream
    log = RunLog(config, rank, start, total_steps, run.global_batch)
    show = not config.disable_tqdm
    results: dict[str, Any] = {}
    if config.eval_data:  # before the first step: what the training must beat (cached)
        eval_dir = os.path.join(config.output_dir, "eval")
        results = train_eval.baselines(
            engine.module, data, config.eval_data, eval_dir, run.zero_stage, show, eval_dims
        )
        if start == 0:  # a resumed run's log has them already
            for key, scores in results.items():
                log.scores(0, key, scores)
        log.t0 = time.perf_counter()  # samples/s of the steps alone
    if run.resume is not None:
        saved_world = run.resume.state.get("world_size", world)
        how = f" (written by {saved_world} processes)" if saved_world != world else ""
        log.message(f"resumed from {run.resume.path} at step {start}{how}")
    result = TrainResult(config.output_dir, start, start, engine=engine)
    saved_at = start
    try:
        steps = prepared_batches(
            batches, collate, start, total_steps, config.dataloader_num_workers, config.seed
        )
        for step, raw, batch in steps:
            batch = align_processes(raw, batch, collate, run.zero_stage)
            loss_fn = step_loss_function(config, batch, group)
            loss_value, grad_norm = train_step(engine, scheduler, batch, raw, step, loss_fn, config, reuse)
            if math.isnan(loss_value) and grad_norm is None:
                log.message(f"step {step + 1}: non-finite loss, batch skipped ({_batch_label(raw)})")
                result.skipped_steps.append(step + 1)
            result.losses[step + 1] = loss_value
            result.last_step = step + 1
            record = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            write = (step + 1) % config.logging_steps == 0 or step + 1 == total_steps
            if write:  # the same steps on every rank: one small all_reduce
                record.update(peak_memory_mib())
            log.step(step, record, write=write)
            if config.save_steps and (step + 1) % config.save_steps == 0:
                save(step + 1)
                saved_at = step + 1
            if config.eval_data and config.eval_steps and (step + 1) % config.eval_steps == 0:
                if step + 1 != total_steps:  # the last step's evaluation follows the save
                    log.scores(step + 1, "trained", evaluate(f"step-{step + 1}", f"step {step + 1}"))
        if saved_at != total_steps:
            save(total_steps)
        save_model(config.output_dir)
        distributed.barrier()
        log.message(f"done: {total_steps} steps; model saved to {config.output_dir}")
        if config.eval_data:  # the saved model, scored as `python -m vlm2vec.eval` scores it
            scores = evaluate("trained", "trained model", show)
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
    if config.export_dir and rank == 0:  # the saved model, exported (vlm2vec/export.py)
        from vlm2vec.export import export_after_training

        print(export_after_training(config.output_dir, config.export_dir), flush=True)
    return result


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
        train(config)
        distributed.finish()  # together: rank 0 may still be scoring or exporting
    except (ConfigError, ckpt.ResumeError, NonFiniteLossError) as err:
        if rank == 0 or not isinstance(err, ConfigError):  # option errors are the same on every rank
            print(f"vlm2vec/train.py: error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 1 if isinstance(err, NonFiniteLossError) else 2
    except (DataError, FileNotFoundError) as err:
        print(f"vlm2vec/train.py: data error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.shutdown()  # after an error, at once: a peer may be inside a collective
    return 0


if __name__ == "__main__":
    sys.exit(main())
