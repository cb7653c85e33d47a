"""CPU peak memory and time of one fwd+bwd: the torch engine of `contrastive_loss` against eager
PyTorch and against its physical floor, the three bare GEMMs alone (S = q@c.T; S@c; S.T@q).

    python bench/loss_peak_cpu.py                      # B=8192, D=1536, fp32, 3 interleaved rounds
    python bench/loss_peak_cpu.py --B 4096 --D 768 --rounds 1 --providers torch,eager

The issue-12 CPU target (B=8192, D=1536 fp32, one run): torch within 1.1x of the bare GEMMs, and its
peak beyond the returned gradients <= 5% of eager's peak; the last lines say whether it was met.

Each measurement runs in a fresh Python process with glibc's mmap threshold fixed at 64 KiB (freed
tensors leave the resident set at once). Two peaks per process, both the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs) above the level just before the call, with the returned
gradients (2 * B * D * 4 bytes) included:

- fresh:  the first full-size call (after a 64-row warm-up); it also pays one-time growth of MKL's
          internal buffers and the allocator, which stay with the process;
- steady: a later call, after a full-size warm-up call and with the gradients dropped: what every
          training step needs.

Times are wall-clock per fwd+bwd (median of the process's timed calls). The providers alternate
round by round so that a loaded machine slows both alike; compare the ratios, not the seconds.
eager = F.normalize + matmul + F.cross_entropy, as in bench/loss_kernel.py. gemms = the three GEMMs
of fwd+bwd (6 B^2 D FLOPs, what eager and the torch engine both do) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = r"""
import json, sys, time
import torch
import torch.nn.functional as F
import vlm2vec_kernels

B, D, what, reps, tau = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), 0.02


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def eager(q, c):
    logits = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def ours(q, c):
    return vlm2vec_kernels.contrastive_loss(q, c, temperature=tau, backend="torch")


class Gemms:  # the floor: the three GEMMs of fwd+bwd, no softmax, no normalisation, no autograd

    def __init__(self, q, c):
        self.q, self.c = q, c

    def backward(self):
        with torch.no_grad():
            s = self.q @ self.c.T
            s @ self.c
            s.T @ self.q


loss_fn = {"eager": eager, "torch": ours, "gemms": Gemms}[what]


def inputs(n):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(n, D, generator=gen).requires_grad_()
    return q, torch.randn(n, D, generator=gen).requires_grad_()


def measured(q, c):
    base = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    loss_fn(q, c).backward()
    return status_mib("VmHWM") - base, time.perf_counter() - start


q, c = inputs(64)
loss_fn(q, c).backward()
q, c = inputs(B)
fresh, first = measured(q, c)
q.grad = c.grad = None
steady, second = measured(q, c)
times = [first, second]
for _ in range(reps - 2):
    q.grad = c.grad = None
    start = time.perf_counter()
    loss_fn(q, c).backward()
    times.append(time.perf_counter() - start)
print(json.dumps({"fresh_mib": fresh, "steady_mib": steady, "times_s": times}))
"""


TIMES = r"""
import json, sys, time
import torch
import torch.nn.functional as F
import vlm2vec_kernels

B, D, rounds, names, tau = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","), 0.02
gen = torch.Generator().manual_seed(0)
q = torch.randn(B, D, generator=gen).requires_grad_()
c = torch.randn(B, D, generator=gen).requires_grad_()


def torch_engine():
    vlm2vec_kernels.contrastive_loss(q, c, temperature=tau, backend="torch").backward()


def eager():
    logits = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T / tau
    F.cross_entropy(logits, torch.arange(B)).backward()


def gemms():
    with torch.no_grad():
        s = q @ c.T
        s @ c
        s.T @ q


calls = {"torch": torch_engine, "eager": eager, "gemms": gemms}
times = {name: [] for name in names}
for r in range(rounds + 1):  # round 0 warms up
    order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
    for name in order:
        q.grad = c.grad = None
        start = time.perf_counter()
        calls[name]()
        if r:
            times[name].append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run_times(B: int, D: int, rounds: int, names: list[str]) -> dict:
    """Per-call times of the providers in one process, calls interleaved round by round."""
    result = subprocess.run(
        [sys.executable, "-c", TIMES, str(B), str(D), str(rounds), ",".join(names)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode:
        raise SystemExit(f"timing probe failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_probe(provider: str, B: int, D: int, reps: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(B), str(D), provider, str(reps)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if result.returncode:
        raise SystemExit(f"{provider} probe failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--B", type=int, default=8192, help="queries = candidates (default 8192)")
    parser.add_argument("--D", type=int, default=1536, help="embedding size (default 1536)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per process, >= 2 (default 3)")
    parser.add_argument("--json", action="store_true", help="end with the medians as one JSON line")
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="also time the providers call by call in one process, interleaved, this many rounds; "
        "the time verdict then uses the median of the per-round ratios (robust to a loaded box)",
    )
    parser.add_argument(
        "--providers",
        type=lambda text: text.split(","),
        default=["torch", "eager", "gemms"],
        help="comma-separated subset of torch,eager,gemms (default: all three)",
    )
    args = parser.parse_args(argv)
    reps = max(2, args.reps)
    grads = 2 * args.B * args.D * 4 / 2**20
    print(f"# B={args.B} D={args.D} fp32 fwd+bwd; returned gradients {grads:.0f} MiB", flush=True)
    providers = args.providers
    rows: dict[str, list[dict]] = {p: [] for p in providers}
    for round_ in range(args.rounds):
        for provider in providers if round_ % 2 == 0 else providers[::-1]:
            row = run_probe(provider, args.B, args.D, reps)
            rows[provider].append(row)
            print(
                f"round {round_ + 1} {provider:<5}: steady +{row['steady_mib']:.1f} MiB, fresh "
                f"+{row['fresh_mib']:.1f} MiB, s/call {' '.join(f'{t:.2f}' for t in row['times_s'])}",
                flush=True,
            )
    summary = {}
    for provider, runs in rows.items():
        summary[provider] = {
            "steady": statistics.median(r["steady_mib"] for r in runs),
            "fresh": statistics.median(r["fresh_mib"] for r in runs),
            "time": statistics.median(t for r in runs for t in r["times_s"]),
        }
    print()
    for provider, other in (("torch", "gemms"), ("eager", "gemms")):
        if provider in rows and other in rows:
            ratios = [statistics.median(a["times_s"]) / statistics.median(b["times_s"])
                      for a, b in zip(rows[provider], rows[other])]  # fmt: skip
            mine, floor = summary[provider]["time"], summary[other]["time"]
            print(
                f"time: {provider} {mine:.2f} s vs bare GEMMs {floor:.2f} s = {mine / floor:.3f}x the floor "
                f"(per round: {', '.join(f'{r:.3f}x' for r in ratios)})"
            )
    interleaved = None
    if args.pairs and "gemms" in providers:
        names = [p for p in providers if p in ("torch", "eager", "gemms")]
        times = run_times(args.B, args.D, args.pairs, names)
        print(f"\ninterleaved in one process, {args.pairs} rounds (s/call):")
        for name in names:
            print(f"  {name:<5} {' '.join(f'{t:.2f}' for t in times[name])}")
        for name in names:
            if name != "gemms":
                ratios = [t / g for t, g in zip(times[name], times["gemms"])]
                print(f"  {name} / gemms per round: {' '.join(f'{r:.3f}' for r in ratios)}; "
                      f"median {statistics.median(ratios):.3f}x")  # fmt: skip
                if name == "torch":
                    interleaved = statistics.median(ratios)
    if "torch" in rows and "eager" in rows:
        ours, eager = summary["torch"], summary["eager"]
        beyond_ours, beyond_eager = ours["steady"] - grads, eager["steady"] - grads
        print(
            f"peak, steady: torch +{ours['steady']:.1f} MiB vs eager +{eager['steady']:.1f} MiB; beyond the "
            f"returned gradients torch +{beyond_ours:.1f} MiB = {beyond_ours / eager['steady']:.1%} of "
            f"eager's peak ({beyond_ours / beyond_eager:.1%} of eager's beyond the gradients)"
        )
        print(f"peak, fresh:  torch +{ours['fresh']:.1f} MiB vs eager +{eager['fresh']:.1f} MiB")
        if "gemms" in rows:
            ratio = interleaved if interleaved is not None else ours["time"] / summary["gemms"]["time"]
            time_ok = ratio <= 1.1
            memory_ok = beyond_ours <= 0.05 * eager["steady"]
            print(
                f"target (torch <= 1.1x bare GEMMs; peak beyond gradients <= 5% of eager's): time "
                f"{'met' if time_ok else 'MISSED'} ({ratio:.3f}x, "
                f"{'interleaved median' if interleaved is not None else 'medians of the processes'}), "
                f"memory {'met' if memory_ok else 'MISSED'} ({beyond_ours / eager['steady']:.1%})"
            )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
