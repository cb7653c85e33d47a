"""vlm2vec.distributed: the collectives train and eval share, alone (no process group: the one-process
answers) and on 2 real gloo processes."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from vlm2vec import distributed


def test_without_a_process_group_every_helper_answers_for_one_process():
    assert distributed.rank_world() == (0, 1)
    assert distributed.init_distributed() == (0, 1, 0)  # no launcher variables: no group
    distributed.barrier()
    assert distributed.all_reduce([1.0, 2.5]).tolist() == [1.0, 2.5]
    assert distributed.all_mean(torch.tensor(1.5)) == 1.5 and distributed.any_rank(False) is False
    assert distributed.broadcast_from_rank0({"a": 1}) == {"a": 1}
    rows = {3: torch.ones(2)}
    assert distributed.gather_to_rank0(rows) is rows
    p = torch.nn.Parameter(torch.zeros(1))
    with distributed.gathered_parameters([p], zero_stage=2):
        pass
    distributed.shutdown()


def _run_two(worker) -> dict[int, dict]:
    """`worker(rank, port, queue)` in 2 spawned processes; each puts (rank, result); both must exit 0
    (a hang fails on the timeouts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _worker(rank: int, port: int, queue: mp.Queue) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    out = {"init": distributed.init_distributed(), "rank_world": distributed.rank_world()}
    distributed.barrier()
    out["sum"] = distributed.all_reduce([rank + 1.0, 10.0]).tolist()
    out["max"] = distributed.all_reduce([float(rank)], torch.distributed.ReduceOp.MAX).tolist()
    out["mean"] = distributed.all_mean(torch.tensor(float(rank)))
    out["any"] = (distributed.any_rank(rank == 1), distributed.any_rank(False))
    out["broadcast"] = distributed.broadcast_from_rank0(f"from {rank}")
    rows = {i: torch.full((3,), float(i)) for i in range(rank, 7, 2)}  # a strided shard, as evaluation
    gathered = distributed.gather_to_rank0(rows)
    out["gathered"] = {k: v.tolist() for k, v in gathered.items()}
    distributed.shutdown()
    out["after"] = distributed.rank_world()
    queue.put((rank, out))


@pytest.mark.slow
def test_two_gloo_processes():
    results = _run_two(_worker)
    for r in range(2):
        out = results[r]
        assert out["init"] == (r, 2, r) and out["rank_world"] == (r, 2) and out["after"] == (0, 1)
        assert out["sum"] == [3.0, 20.0] and out["max"] == [1.0]
        assert out["mean"] == 0.5 and out["any"] == (True, False)
        assert out["broadcast"] == "from 0"
    assert results[0]["gathered"] == {i: [float(i)] * 3 for i in range(7)}
    assert results[1]["gathered"] == {}


def _finish_worker(rank: int, port: int, queue: mp.Queue) -> None:
    import time
    from datetime import timedelta

    # the group's own timeout is 2 s; rank 0 arrives 4 s after rank 1
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2, timeout=timedelta(seconds=2))  # fmt: skip
    distributed.prepare_finish()
    distributed.barrier()
    if rank == 0:
        time.sleep(4.0)
    arrived = time.time()
    distributed.finish()
    queue.put((rank, {"arrived": arrived, "left": time.time(), "after": distributed.rank_world()}))


@pytest.mark.slow
def test_finish_waits_for_the_slowest_process_beyond_the_group_timeout():
    """finish(): rank 1 leaves only once rank 0 (4 s late, past the group's 2 s timeout) arrives."""
    results = _run_two(_finish_worker)
    assert results[1]["left"] >= results[0]["arrived"]
    assert results[0]["arrived"] - results[1]["arrived"] > 3.0
    assert results[0]["after"] == results[1]["after"] == (0, 1)
