"""The collectives training and evaluation share, each a no-op (or the one-process answer) when no
process group is running, so callers never branch on `dist.is_initialized()` themselves.

Launchers (torchrun, deepspeed) describe the group in the environment; `init_distributed` joins it
(gloo on CPU, nccl on GPUs). Bookkeeping values start on the host, but NCCL only moves CUDA tensors:
`all_reduce` sends them on the device the group's backend uses and hands them back on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def is_running() -> bool:
    """A process group is initialised (more than one process may take part)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_running() else 0


def world_size() -> int:
    return dist.get_world_size() if is_running() else 1


def rank_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    return rank(), world_size()


def barrier() -> None:
    """Wait for every process (nothing to wait for alone)."""
    if world_size() > 1:
        dist.barrier()


def init_distributed() -> tuple[int, int, int]:
    """Join the process group a launcher (torchrun / deepspeed) describes in the environment; returns
    (rank, world_size, local_rank). Single process without launcher variables: (0, 1, 0)."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if n > 1 and not is_running():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        prepare_finish()
    return (rank(), world_size(), local_rank) if is_running() else (0, 1, 0)


# How long finish() waits for the slowest process: rank 0 alone mining a pool, scoring, writing an export
# can outlast the group's own timeout (30 min on gloo), which is for collectives that should be quick.
FINISH_TIMEOUT = timedelta(hours=24)
_finish_group: Any = None


def prepare_finish() -> None:
    """Right after the group forms, while every process is in step (creating a group is collective):
    on gloo, a second gloo group whose only use is finish()'s wait, with FINISH_TIMEOUT as its timeout
    (a barrier's timeout is its group's; gloo's monitored_barrier still sends under the group's)."""
    global _finish_group
    if is_running() and world_size() > 1 and dist.get_backend() == "gloo":
        _finish_group = dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT)


def shutdown() -> None:
    """Leave the process group at once, if any: the way out after an error, when a peer may be inside a
    collective (a wait would hang; the launcher stops the peers once this process exits non-zero). An
    open group at interpreter exit can abort the process."""
    global _finish_group
    _finish_group = None
    if is_running():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the process group together, at the end of a run that went well: on gloo every process
    first waits for the others. A gloo process that destroys its group and exits while a peer still
    holds the connections (rank 0 still mining or writing) can abort at interpreter exit ("terminate
    called without an active exception", SIGABRT: 3 of 60 two-rank `vlm2vec.mine` runs on torch 2.13;
    0 of 120 with it). The wait has its own FINISH_TIMEOUT (see prepare_finish). NCCL groups
    leave at once, as before: a barrier there runs under the watchdog's timeout (10 min by default),
    which rank 0's own work may outlast, and the abort is gloo's: prepare_finish() makes the wait's
    group only for gloo."""
    if _finish_group is not None:
        dist.barrier(group=_finish_group)
    shutdown()


def all_reduce(values: list[float] | torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """`values` reduced over the processes (as given with one process), float64 on the CPU."""
    values = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1)
    if world_size() == 1:
        return values.cpu()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    values = values.to(device)
    dist.all_reduce(values, op=op)
    return values.cpu()


def all_mean(value: float | torch.Tensor) -> float:
    """The mean over the processes of one number (a loss, a rate)."""
    return float(all_reduce([float(value)])) / world_size()


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a non-finite loss somewhere)."""
    return bool(all_reduce([float(flag)]).item() > 0)


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every process, so all of them take the same branch."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(rows: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Every process's {index: row} merged on rank 0 ({} elsewhere); with one process, `rows` itself."""
    r, n = rank_world()
    if n == 1:
        return rows
    keys = sorted(rows)
    payload = (keys, torch.stack([rows[k] for k in keys]) if keys else None)
    gathered: list[Any] | None = [None] * n if r == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if gathered is None:
        return {}
    merged: dict[int, torch.Tensor] = {}
    for keys_r, emb_r in gathered:
        for k, row in zip(keys_r, emb_r if emb_r is not None else []):
            merged[k] = row
    return merged


def gathered_parameters(params: Iterable[torch.nn.Parameter], zero_stage: int) -> AbstractContextManager:
    """Under ZeRO-3 (weights partitioned over the ranks) the whole `params` inside the block, read-only;
    at stages 0-2 every rank already holds them (nothing to do). Enter on every rank: it is a collective."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
