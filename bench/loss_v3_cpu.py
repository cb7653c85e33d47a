"""CPU time of the v3 Matryoshka loss (fwd+bwd) against the bare GEMMs of one 6 B^2 D pass.

    python bench/loss_v3_cpu.py                       # B=8192, D=1536, fp32, dims 64..1536, 3 rounds
    python bench/loss_v3_cpu.py --B 2048 --rounds 1   # quick
    python bench/loss_v3_cpu.py --breakdown           # + the pass's GEMMs alone: where the overhead is

Issue 24's CPU target: Matryoshka fwd+bwd (dims 64, 128, 256, 512, 1536) <= 1.25x the bare GEMMs
`S = q @ c.T; S @ c; S.T @ q` (6 B^2 D FLOPs) in the same run. The two alternate call by call
(each timed call after one warm-up call of both), so a loaded machine slows both alike; the median
ratio is printed with the box's load average (the box is shared: compare ratios, not seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from vlm2vec_kernels import contrastive_loss, torch_engine

DIMS = [64, 128, 256, 512, 1536]


def matryoshka(q: torch.Tensor, c: torch.Tensor, dims: list[int]) -> None:
    q.grad = c.grad = None
    contrastive_loss(q, c, 0.02, backend="torch", matryoshka_dims=dims).backward()


def gemms(q: torch.Tensor, c: torch.Tensor) -> None:
    with torch.no_grad():
        s = q @ c.T
        s @ c
        s.T @ q


def pass_gemms(q: torch.Tensor, c: torch.Tensor, dims: list[int], rows: int) -> None:
    """The GEMMs of the Matryoshka pass alone, in its shape (`--breakdown`): per chunk of `rows` queries,
    one GEMM per segment [d_{k-1}, d_k) into chunk buffers, then one for dq and one for dc per segment.
    With dims = [D] it is the plain chunking's GEMMs."""
    bounds = [0, *dims]
    n, dim = c.shape[0], q.shape[1]
    bufs = torch.empty(len(dims), rows, n)
    dq, dc = torch.empty(q.shape[0], dim), torch.empty(n, dim)
    with torch.no_grad():
        for start in range(0, q.shape[0], rows):
            q_rows = q[start : start + rows]
            segs = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
            for k, seg in enumerate(segs):
                torch.mm(q_rows[:, seg], c[:, seg].T, out=bufs[k, : len(q_rows)])
            for k, seg in enumerate(segs):
                torch.mm(bufs[k, : len(q_rows)], c[:, seg], out=dq[start : start + rows, seg])
                beta = 0 if start == 0 else 1
                torch.addmm(dc[:, seg], bufs[k, : len(q_rows)].T, q_rows[:, seg], beta=beta, out=dc[:, seg])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--B", type=int, default=8192)
    parser.add_argument("--D", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=3, help="timed calls of each (default 3)")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)))
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the pass's GEMMs alone (segments, and one segment) to split the overhead",
    )
    args = parser.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    rows = torch_engine._chunk_rows(args.B, args.B)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.B, args.D, generator=gen).requires_grad_()
    c = torch.randn(args.B, args.D, generator=gen).requires_grad_()
    matryoshka(q, c, dims)  # warm-up (allocator, MKL buffers)
    gemms(q, c)
    calls = {"gemms": lambda: gemms(q, c), "matryoshka": lambda: matryoshka(q, c, dims)}
    if args.breakdown:
        calls["pass GEMMs"] = lambda: pass_gemms(q, c, dims, rows)
        calls["chunked GEMMs"] = lambda: pass_gemms(q, c, [args.D], rows)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [m / g for m, g in zip(times["matryoshka"], times["gemms"])]
    load = os.getloadavg()
    print(f"B={args.B} D={args.D} dims={dims} fp32, torch {torch.__version__}, {os.cpu_count()} CPUs")
    for name, values in times.items():
        print(f"  {name:<13} " + " ".join(f"{v:.2f}s" for v in values))
    print(f"  ratio matryoshka / bare GEMMs: median {statistics.median(ratios):.3f}x "
          f"(per round {', '.join(f'{r:.3f}' for r in ratios)}); target <= 1.25x")  # fmt: skip
    for name in list(calls)[2:]:
        parts = [t / g for t, g in zip(times[name], times["gemms"])]
        print(f"  {name} / bare GEMMs: median {statistics.median(parts):.3f}x")
    print(f"  load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
