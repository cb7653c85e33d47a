"""Training checkpoints that survive a kill at any moment: written to a temporary directory, renamed.

Layout of `<output_dir>/checkpoint-<step>/`:

    vlm2vec.json, adapter_model.safetensors | model.safetensors, ...   (VLM2Vec.save_pretrained: the
                                         directory loads with VLM2Vec.from_pretrained / vlm2vec.eval)
    deepspeed/                           optimizer + scheduler + trainable (master) weights, per rank
    rng_state_<rank>.pt                  python / numpy / torch CPU / accelerator RNG of each process
    trainer_state.json                   step, data position, world size, options (written last)

Every process writes into `.tmp-checkpoint-<step>/`; once all are done, rank 0 renames it to
`checkpoint-<step>/` (one atomic rename), so a directory named `checkpoint-*` is always complete and a
kill mid-save leaves only a temporary directory that the next save or resume ignores.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"
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


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: None (fresh start), the newest in output_dir for "auto" (None if
    there is none yet), or the given directory (ValueError if it is not a complete checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        raise ValueError(f"--resume {resume!r} is not a complete checkpoint (no {TRAINER_STATE})")
    return resume


def read_trainer_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
        return json.load(f)


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
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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
    engine: Any,
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
    rank = _rank()
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    final = checkpoint_path(output_dir, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    torch.save(capture_rng(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    save_model(tmp)
    _barrier()
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
    _barrier()
    return final


def load_checkpoint(engine: Any, path: str) -> dict[str, Any]:
    """Restore optimizer, scheduler, trainable weights and this rank's RNG; returns the trainer state.

    Raises ValueError when the checkpoint was written by a different number of processes (ZeRO shards
    the optimizer state per process)."""
    state = read_trainer_state(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state.get("world_size", world) != world:
        raise ValueError(
            f"{path} was written by {state['world_size']} processes, this run has {world}; "
            "resume with the same number of processes"
        )
    load_path, _ = engine.load_checkpoint(
        path,
        tag=DEEPSPEED_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed found no state under {os.path.join(path, DEEPSPEED_TAG)}")
    restore_rng(torch.load(os.path.join(path, f"rng_state_{_rank()}.pt"), weights_only=False))
    return state
