"""Training checkpoints that survive a kill at any moment: written to a temporary directory, renamed.

Layout of `<output_dir>/checkpoint-<step>/`:

    vlm2vec.json, adapter_model.safetensors | model.safetensors, ...   (VLM2Vec.save_pretrained: the
                                         directory loads with VLM2Vec.from_pretrained / vlm2vec.eval)
    deepspeed/                           optimizer + scheduler + trainable (master) weights, per rank
    universal/                           (made on a resume at another world size) the same state per
                                         parameter, world-size independent (DeepSpeed universal format)
    rng_state_<rank>.pt                  python / numpy / torch CPU / accelerator RNG of each process
    trainer_state.json                   step, data position, world size, options (written last)

Resume at another number of processes: the data position is global (a step's rows are a pure function
of seed and step, split by the current world size), so only the ZeRO-partitioned optimizer state is
tied to the old world size. `plan_resume` decides before any model is built; `to_universal` converts
the shards once with DeepSpeed's `ds_to_universal` (per-parameter fp32 weights, exp_avg, exp_avg_sq),
which the engine loads at any world size when its config sets `checkpoint.load_universal`.

Every process writes into `.tmp-checkpoint-<step>/`; once all are done, rank 0 renames it to
`checkpoint-<step>/` (one atomic rename), so a directory named `checkpoint-*` is always complete and a
kill mid-save leaves only a temporary directory that the next save or resume ignores.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlm2vec import distributed

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"
UNIVERSAL_TAG = "universal"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX}{step}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in output_dir as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _STEP.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from; the message says what to change."""


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: None (fresh start), the newest in output_dir for "auto" (None if
    there is none yet), or the given directory (ResumeError if it is not a complete checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        raise ResumeError(f"--resume {resume!r} is not a complete checkpoint (no {TRAINER_STATE})")
    return resume


def read_trainer_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
        return json.load(f)


@dataclass
class ResumePlan:
    """How to load a checkpoint: `state` is its trainer_state.json; `universal` when it was written by
    another number of processes and its ZeRO shards must be read in the universal format."""

    path: str
    state: dict[str, Any]
    universal: bool


def _sharded(path: str) -> bool:
    """Whether the DeepSpeed state is split per process (ZeRO 1-3, or the bf16 optimizer)."""
    return bool(glob.glob(os.path.join(path, DEEPSPEED_TAG, "*zero_pp_rank_*optim_states.pt")))


def plan_resume(path: str, *, world_size: int, zero_stage: int, global_batch: int) -> ResumePlan:
    """Check that this run can continue `path`; ResumeError saying what to change otherwise. Called
    before any model is built."""
    state = read_trainer_state(path)
    saved_world = int(state.get("world_size", world_size))
    saved_stage = int(state.get("zero_stage", zero_stage))
    saved_batch = state.get("data", {}).get("fingerprint", {}).get("batch_size", global_batch)
    if saved_stage != zero_stage:
        raise ResumeError(
            f"{path} was written under ZeRO-{saved_stage}, this run uses ZeRO-{zero_stage}; resume with a "
            f"ZeRO-{saved_stage} --ds_config (the optimizer state is laid out per stage)"
        )
    if saved_batch != global_batch:
        raise ResumeError(
            f"{path} was trained with {saved_batch} queries per step, this run has {global_batch} "
            f"({world_size} processes); pass --train_batch_size {saved_batch} so every step keeps its rows"
        )
    universal = saved_world != world_size and _sharded(path)
    if universal and zero_stage == 0:
        raise ResumeError(
            f"{path} was written by {saved_world} processes with the bf16 optimizer under ZeRO-0, whose "
            f"state DeepSpeed cannot re-split for {world_size}; resume on {saved_world} processes, or "
            "train with a ZeRO 1-3 config to move between world sizes"
        )
    return ResumePlan(path, state, universal)


def to_universal(path: str) -> None:
    """Convert `path`'s ZeRO shards into `path/universal` once (rank 0 converts, atomically; every rank
    raises ResumeError if it fails, so none waits forever)."""
    target = os.path.join(path, UNIVERSAL_TAG)
    error = None
    if distributed.rank() == 0 and not os.path.isdir(target):
        tmp = target + f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
            os.path.join(path, DEEPSPEED_TAG), "--output_folder", tmp, "--num_extract_workers", "1",
            "--num_merge_workers", "1",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            os.rename(tmp, target)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"converting {path} to DeepSpeed's universal format failed:\n{done.stderr[-3000:]}"
    error = distributed.broadcast_from_rank0(error)
    if error:
        raise ResumeError(error)


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout on CPU and accelerator, python, numpy)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- save / load
def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(src: str, dst: str) -> None:
    """Move src to dst atomically; an existing dst (a rerun of the same step) is moved aside first."""
    old = None
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    dir_fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    engine: DeepSpeedEngine,
    save_model: Callable[[str], None],
    output_dir: str,
    step: int,
    trainer_state: dict[str, Any],
    *,
    total_limit: int | None = None,
) -> str:
    """Write checkpoint-<step> atomically; every process must call this (DeepSpeed state is sharded).

    save_model(directory) writes the model files (called on every rank: under ZeRO-3 the weights must be
    gathered collectively; it should write on rank 0 only). Returns the checkpoint path."""
    rank = distributed.rank()
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    final = checkpoint_path(output_dir, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    distributed.barrier()
    engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    torch.save(capture_rng(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    save_model(tmp)
    distributed.barrier()
    if rank == 0:
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=2, default=str)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(output_dir):  # leftovers of saves that were killed
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(engine: DeepSpeedEngine, plan: ResumePlan) -> bool:
    """Restore optimizer, scheduler and trainable weights (from the universal form when `plan` says so)
    and this rank's RNG. Returns False when the RNG could not be restored (another world size: the
    caller starts a fresh, seeded stream)."""
    tag = UNIVERSAL_TAG if plan.universal else DEEPSPEED_TAG
    load_path, _ = engine.load_checkpoint(
        plan.path,
        tag=tag,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise ResumeError(f"DeepSpeed found no state under {os.path.join(plan.path, tag)}")
    world = distributed.world_size()
    if int(plan.state.get("world_size", world)) != world:
        return False
    restore_rng(torch.load(os.path.join(plan.path, f"rng_state_{distributed.rank()}.pt"), weights_only=False))
    return True
