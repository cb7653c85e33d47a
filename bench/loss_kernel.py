"""Benchmark of the contrastive loss: Triton v2 / v1, the torch engine, eager, torch.compile, inf-cl.

    python bench/loss_kernel.py                 # default sizes for the device found (GPU: bf16, CPU: fp32)
    python bench/loss_kernel.py --quick         # CPU smoke run, < 2 minutes on 2 cores
    python bench/loss_kernel.py --sizes 8192 --dims 1536 --providers torch,eager   # CPU target check
    python bench/loss_kernel.py --big           # GPU: B = 1,048,576, fused fwd+bwd only
    python bench/loss_kernel.py --sweep         # GPU: engine kernels alone, tile/split/path variants
    python bench/loss_kernel.py --matryoshka    # one loss over prefixes 64..512 and D: ours, a loop over
                                                # dims, sentence-transformers' MatryoshkaLoss (CPU: B=2048)

Every cell is one (provider, mode, B, D): B queries against their B positives (in-batch negatives),
temperature 0.02, L2 normalisation included in every provider. Providers: `fused` = the public
function on the Triton backend (v2: gradients in the forward), `fused-v1` = the same loss through the
recompute path (reduction="none" then .mean(): 8 B^2 D), `torch` = the torch engine (v2), `eager`,
`compile` (torch.compile of eager), `inf-cl`. Modes: `fwd` (no autograd, the loss value only) and
`fwd+bwd` (loss.backward() into both inputs). TFLOP/s counts the useful work, what eager does: 2*B^2*D
for fwd and 6*B^2*D for fwd+bwd. Launches per call: CUDA kernels (torch.profiler) on a GPU, aten
compute ops (views, copies and allocations excluded) on the CPU. Time: median and p20/p80 of
triton.testing.do_bench on a GPU, of a wall-clock loop on the CPU. Peak memory: on a GPU
torch.cuda.max_memory_allocated above the inputs; on the CPU the peak RSS growth during one call
(sampled every 0.5 ms with glibc's mmap threshold lowered so freed blocks leave RSS at once).
Out-of-memory and other failures are recorded per cell and the run goes on.

`--matryoshka [DIMS]` runs the Matryoshka providers of bench/loss_matryoshka.py instead of the grid
(`mrl-fused`/`mrl-torch` = this loss with matryoshka_dims, `mrl-eager` = a loop over the prefixes,
`mrl-st` = sentence-transformers' MatryoshkaLoss over its cached InfoNCE, run on the same embeddings),
fwd+bwd; each row's loss is compared with the torch engine's (or the Triton one's without it), its
TFLOP/s counts a loop's work (6 B^2 sum_k d_k) and the last lines give time and peak memory as ratios.

Outputs (default --out bench/out/, gitignored): a table on stdout, rows appended to
loss_kernel.csv (provider, mode, B, D, dtype, p20/p50/p80 ms, TFLOP/s, peak MB, status, rel. loss
difference to the chunked torch engine, device, date, git commit) and PNG plots per mode and D.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAU = 0.02
PROVIDERS = ("fused", "fused-v1", "torch", "eager", "compile", "inf-cl")
MODES = ("fwd", "fwd+bwd")
CSV_FIELDS = [
    "provider",
    "mode",
    "B",
    "D",
    "dtype",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "tflops",
    "peak_mb",
    "launches",
    "status",
    "loss_rel_diff",
    "device",
    "date",
    "commit",
]


# ------------------------------------------------------------------------------------------------
# providers: callables (q, c) -> scalar loss


def _eager_loss(q, c):
    import torch
    import torch.nn.functional as F

    logits = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T / TAU
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


_COMPILED: dict = {}


def _mrl():
    """bench/loss_matryoshka.py (imports torch: loaded on first use, like torch here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import loss_matryoshka

    return loss_matryoshka


def make_provider(name: str) -> Callable:
    """The loss function of one provider; raises ImportError when it is not available here."""
    if name in ("fused", "torch"):
        from vlm2vec_kernels import contrastive_loss

        backend = "triton" if name == "fused" else "torch"
        return lambda q, c: contrastive_loss(q, c, temperature=TAU, backend=backend)
    if name == "fused-v1":
        from vlm2vec_kernels import contrastive_loss

        return lambda q, c: contrastive_loss(q, c, temperature=TAU, reduction="none", backend="triton").mean()
    if name == "eager":
        return _eager_loss
    if name == "compile":
        import torch

        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(_eager_loss, dynamic=False)
        return _COMPILED["fn"]
    if name == "inf-cl":
        import torch.nn.functional as F
        from inf_cl import cal_inf_loss  # needs CUDA; D must be a multiple of 256

        return lambda q, c: cal_inf_loss(F.normalize(q, dim=-1) / TAU, F.normalize(c, dim=-1))
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


# ------------------------------------------------------------------------------------------------
# timing and memory


def _quantiles_ms(times_s: list[float]) -> tuple[float, float, float]:
    if len(times_s) == 1:
        return (times_s[0] * 1e3,) * 3
    q = statistics.quantiles(times_s, n=10, method="inclusive")
    return q[1] * 1e3, statistics.median(times_s) * 1e3, q[7] * 1e3


def time_cpu(fn: Callable, budget_s: float, min_reps: int = 3, max_reps: int = 30):
    """p20/p50/p80 in ms of fn() after one warm-up call, within about budget_s of repetitions."""
    fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _quantiles_ms(times)


def time_gpu(fn: Callable, grads_to_none: list, rep_ms: int):
    import triton

    fn()  # compile / autotune outside the timed region
    p20, p50, p80 = triton.testing.do_bench(
        fn, warmup=max(10, rep_ms // 4), rep=rep_ms, grad_to_none=grads_to_none, quantiles=[0.2, 0.5, 0.8]
    )
    return p20, p50, p80


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth_mb(fn: Callable) -> float:
    """Peak RSS above the level before the call, sampled in a thread every 0.5 ms."""
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, peak[0] - base) / 2**20


def count_launches(fn: Callable, device: str) -> int:
    """Kernel launches of one call: CUDA kernels seen by torch.profiler on a GPU; on the CPU the aten
    compute ops (views, copies and allocations excluded)."""
    import torch

    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from torch.utils._python_dispatch import TorchDispatchMode

    skip = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.copy_", "aten._to_copy"}

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and str(func.overloadpacket) not in skip:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.count


def peak_cuda_mb(fn: Callable) -> float:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------------
# one cell


def _new_row(provider: str, mode: str, B: int, D: int, dtype) -> dict:
    return {
        "provider": provider,
        "mode": mode,
        "B": B,
        "D": D,
        "dtype": str(dtype).replace("torch.", ""),
        "p20_ms": "",
        "p50_ms": "",
        "p80_ms": "",
        "tflops": "",
        "peak_mb": "",
        "launches": "",
        "status": "ok",
        "loss_rel_diff": "",
    }


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


def _measure_cell(row: dict, device: str, dtype, args) -> None:
    """Times one cell into `row` (inputs are freed when this returns)."""
    import torch

    provider, mode, B, D = row["provider"], row["mode"], row["B"], row["D"]
    mrl = _mrl()
    matryoshka = provider in mrl.MRL_PROVIDERS
    dims = (args.matryoshka or mrl.default_dims(D)) if matryoshka else None
    if matryoshka:
        loss_fn = mrl.make_mrl_provider(provider, dims, TAU, args.st_mini_batch)
    else:
        loss_fn = make_provider(provider)
    gen = torch.Generator(device=device).manual_seed(B * 7 + D)
    q = torch.randn(B, D, device=device, dtype=dtype, generator=gen)
    c = torch.randn(B, D, device=device, dtype=dtype, generator=gen)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return loss_fn(q, c)
    else:
        q.requires_grad_(True)
        c.requires_grad_(True)

        def step():
            q.grad = c.grad = None
            loss_fn(q, c).backward()

    if device == "cuda":
        p20, p50, p80 = time_gpu(step, [q, c], args.rep_ms)
        row["peak_mb"] = round(peak_cuda_mb(step), 1)
    else:
        p20, p50, p80 = time_cpu(step, args.cpu_budget_s)
        row["peak_mb"] = round(peak_rss_growth_mb(step), 1)
    # (a compiled graph's kernels are its own business; sentence-transformers' ~10^5 launches per call
    # at B=16384 would keep the GPU profiler busy for longer than the device phase has)
    if provider != "compile" and not (device == "cuda" and provider == "mrl-st"):
        row["launches"] = count_launches(step, device)
    flop = mrl.useful_flops(mode, B, dims) if matryoshka else (2 if mode == "fwd" else 6) * B * B * D
    row.update(
        p20_ms=_sig3(p20), p50_ms=_sig3(p50), p80_ms=_sig3(p80), tflops=_sig3(flop / (p50 * 1e-3) / 1e12)
    )
    if mode == "fwd" or matryoshka:  # Matryoshka rows: the cross-check of the peers' loss values
        with torch.no_grad():
            row["_loss"] = float(loss_fn(q, c))


def run_cell(provider: str, mode: str, B: int, D: int, device: str, dtype, args) -> dict:
    """One (provider, mode, B, D) cell; failures (OOM, missing package, errors) become its status."""
    import torch

    row = _new_row(provider, mode, B, D, dtype)
    try:
        _measure_cell(row, device, dtype, args)
    except ImportError as error:
        row["status"] = f"unavailable: {error}"[:120]
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except RuntimeError as error:
        row["status"] = ("oom" if "out of memory" in str(error).lower() else f"error: {error}")[:120]
    except Exception as error:  # noqa: BLE001 - one failing provider must not end the benchmark
        row["status"] = f"error: {type(error).__name__}: {error}"[:120]
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def run_big(device: str, dtype, B: int, D: int) -> dict:
    """One timed fused fwd+bwd at a size too large to repeat (B = 1,048,576 by default)."""
    import torch
    from vlm2vec_kernels import contrastive_loss

    row = _new_row("fused", "fwd+bwd", B, D, dtype)
    try:
        gen = torch.Generator(device=device).manual_seed(1)
        q = torch.randn(B, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        c = torch.randn(B, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = contrastive_loss(q, c, temperature=TAU, backend="triton")
        loss.backward()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(q.grad).all())
        row.update(
            p20_ms=_sig3(ms),
            p50_ms=_sig3(ms),
            p80_ms=_sig3(ms),
            tflops=_sig3(6 * B * B * D / (ms * 1e-3) / 1e12),
            peak_mb=round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
            status="ok" if finite else "non-finite result",
        )
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as error:  # noqa: BLE001
        row["status"] = f"error: {type(error).__name__}: {error}"[:120]
    return row


# ------------------------------------------------------------------------------------------------
# engine sweep (GPU): kernels alone, variants of tiles / splits / backward path


# Tile alternatives timed by `--sweep` on a GPU beside the shipped ones (vlm2vec_kernels.triton_common
# GPU_CONFIGS); the fastest go into VLM2VEC_TRITON_CONFIG (results in bench/results/h100/).
SWEEP_CANDIDATES: dict[str, list[str]] = {
    "lse": ["128x128x64w8s3", "128x256x64w8s4", "256x128x64w8s3"],
    "probs": ["128x256x64w8s3", "128x128x64w8s3", "256x128x64w8s4"],
}


def _sweep_cases(eng, q, c, rs, cs, lse, w) -> dict:
    """Recompute-path engine calls to time at one size: forward tile/split variants, the gradient."""
    from functools import partial

    from vlm2vec_kernels.triton_common import GPU_CONFIGS, TileConfig, operand_class

    cls = operand_class(q.dtype)
    wide, narrow = GPU_CONFIGS[("lse", cls)], GPU_CONFIGS[("lse_narrow", cls)]
    B, D = q.shape
    cases = {
        "row_lse default": partial(eng.row_lse, q, c, rs, cs),
        "row_lse wide auto-splits": partial(eng.row_lse, q, c, rs, cs, config=wide),
        "row_lse wide 1 split": partial(eng.row_lse, q, c, rs, cs, config=wide, splits=1),
        "row_lse narrow auto-splits": partial(eng.row_lse, q, c, rs, cs, config=narrow),
        "softmax_grad gemm": partial(eng.softmax_grad, q, c, rs, cs, lse, w),
    }
    if B >= 16384:  # tile candidates matter where the kernels are compute-bound
        for spec in SWEEP_CANDIDATES["lse"]:
            cfg = TileConfig.parse(spec)
            cases[f"row_lse lse={spec}"] = partial(eng.row_lse, q, c, rs, cs, config=cfg)
        for spec in SWEEP_CANDIDATES["probs"]:
            cfg = TileConfig.parse(spec)
            cases[f"softmax_grad gemm probs={spec}"] = partial(
                eng.softmax_grad, q, c, rs, cs, lse, w, config=cfg
            )
    return cases


def _fused_sweep_cases(eng, q, c) -> dict:
    """Gradients-in-the-forward variants, each timed as the whole fwd+bwd of the public function:
    chunk bounds (CHUNK_ELEMENTS, MIN_CHUNK_ROWS) and the row kernel's launch shape."""
    from vlm2vec_kernels import contrastive_loss
    from vlm2vec_kernels.triton_common import ROW_CONFIGS, RowConfig

    qg, cg = q.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()

    def case(chunk=None, min_rows=None, xent=None):
        def run():
            saved = eng.CHUNK_ELEMENTS, eng.MIN_CHUNK_ROWS, ROW_CONFIGS["xent"]
            eng.CHUNK_ELEMENTS = chunk or saved[0]
            eng.MIN_CHUNK_ROWS = min_rows or saved[1]
            ROW_CONFIGS["xent"] = xent or saved[2]
            try:
                qg.grad = cg.grad = None
                contrastive_loss(qg, cg, temperature=TAU, backend="triton").backward()
            finally:
                eng.CHUNK_ELEMENTS, eng.MIN_CHUNK_ROWS, ROW_CONFIGS["xent"] = saved

        return run

    cases = {"fused default": case()}
    for chunk in (2**24, 2**28):
        cases[f"fused chunk={chunk}"] = case(chunk=chunk, min_rows=1)
    for rows in (1024, 16384):
        cases[f"fused min_rows={rows}"] = case(min_rows=rows)
    for block_r, max_block, warps in ((1, 1024, 4), (2, 512, 4), (8, 1024, 8), (4, 512, 4)):
        shape = RowConfig(block_r, max_block, warps)
        cases[f"fused xent={block_r}x{max_block}w{warps}"] = case(xent=shape)
    return cases


def best_configs(sweep_rows: list[dict]) -> str:
    """VLM2VEC_TRITON_CONFIG value naming the fastest lse and probs tiles at the largest swept B
    (the defaults count as candidates)."""
    from vlm2vec_kernels.triton_common import GPU_CONFIGS

    rows = [r for r in sweep_rows if r.get("p50_ms") not in ("", None)]
    if not rows:
        return ""
    top = max(int(r["B"]) for r in rows)
    picks = []
    for role, default_case, prefix in (
        ("lse", "row_lse wide auto-splits", "row_lse lse="),
        ("probs", "softmax_grad gemm", "softmax_grad gemm probs="),
    ):
        timed = {r["case"]: float(r["p50_ms"]) for r in rows if int(r["B"]) == top}
        options = {GPU_CONFIGS[(role, "16bit")].spec(): timed.get(default_case)}
        options.update({case[len(prefix) :]: t for case, t in timed.items() if case.startswith(prefix)})
        options = {k: v for k, v in options.items() if v is not None}
        if options:
            picks.append(f"{role}={min(options, key=options.get)}")
    return ",".join(picks)


SWEEP_FIELDS = ["case", "B", "D", "p20_ms", "p50_ms", "p80_ms", "tflops", "device", "date", "commit"]


def run_sweep(
    device: str, dtype, sizes: list[int], dims: list[int], rep_ms: int, emit: Callable[[dict], None]
) -> list[dict]:
    """Times row_lse and softmax_grad of the Triton engine directly, for choosing defaults; each
    row goes to `emit` as soon as it is measured."""
    import torch
    import triton
    from vlm2vec_kernels import triton_engine as eng

    rows = []
    for B in sizes:
        for D in dims:
            q = torch.randn(B, D, device=device, dtype=dtype)
            c = torch.randn(B, D, device=device, dtype=dtype)
            rs = torch.full((B,), 1.0 / TAU, device=device) / q.float().norm(dim=1)
            cs = 1.0 / c.float().norm(dim=1)
            w = torch.full((B,), 1.0 / B, device=device)
            lse = eng.row_lse(q, c, rs, cs)
            cases = _sweep_cases(eng, q, c, rs, cs, lse, w) | _fused_sweep_cases(eng, q, c)
            for name, fn in cases.items():
                # row_lse: one GEMM's work; softmax_grad: recompute + 2 GEMMs; fused: the whole fwd+bwd
                flop = (2 if name.startswith("row_lse") else 6) * B * B * D
                row = {"case": name, "B": B, "D": D, "p20_ms": "", "p50_ms": "", "p80_ms": "", "tflops": ""}
                try:
                    fn()
                    p20, p50, p80 = triton.testing.do_bench(
                        fn, warmup=10, rep=rep_ms, quantiles=[0.2, 0.5, 0.8]
                    )
                    row.update(
                        p20_ms=_sig3(p20),
                        p50_ms=_sig3(p50),
                        p80_ms=_sig3(p80),
                        tflops=_sig3(flop / (p50 * 1e-3) / 1e12),
                    )
                except Exception as error:  # noqa: BLE001
                    row["tflops"] = f"error: {type(error).__name__}: {error}"[:100]
                rows.append(row)
                emit(row)
                print(
                    f"  sweep {name:<28} B={B:<6} D={D:<5} {row['p50_ms']!s:>9} ms "
                    f"{row['tflops']!s:>7} TFLOP/s",
                    flush=True,
                )
            del q, c, rs, cs, w, lse
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# output


def _commit() -> str:
    """Short git commit of the repository, else $VLM2VEC_COMMIT (the device copy has no .git)."""
    try:
        found = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found or os.environ.get("VLM2VEC_COMMIT", "unknown")


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU"


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'provider':<8} {'mode':<7} {'B':>8} {'D':>5} {'p50 ms':>10} {'p20-p80 ms':>19} {'TFLOP/s':>8} "
        f"{'peak MB':>9} {'launch':>6} {'vs torch':>9}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{r['p20_ms']}-{r['p80_ms']}" if r["p20_ms"] != "" else ""
        lines.append(
            f"{r['provider']:<8} {r['mode']:<7} {r['B']:>8} {r['D']:>5} {r['p50_ms']!s:>10} "
            f"{spread:>19} {r['tflops']!s:>8} {r['peak_mb']!s:>9} {r.get('launches', '')!s:>6} "
            f"{r['loss_rel_diff']!s:>9}  "
            f"{r['status']}"
        )
    return "\n".join(lines)


def append_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], out: Path, tag: str) -> list[Path]:
    """One PNG per (mode, D): time, TFLOP/s and peak memory against B, a line per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    written = []
    for mode in MODES:
        for D in sorted({int(r["D"]) for r in rows if r["mode"] == mode}):
            cell = [r for r in rows if r["mode"] == mode and int(r["D"]) == D and r["status"] == "ok"]
            if not cell:
                continue
            fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
            for provider in PROVIDERS:
                latest = {int(r["B"]): r for r in cell if r["provider"] == provider}  # last row per B wins
                if not latest:
                    continue
                xs = sorted(latest)
                for ax, key in zip(axes, ("p50_ms", "tflops", "peak_mb")):
                    ax.plot(xs, [float(latest[b][key] or "nan") for b in xs], marker="o", label=provider)
            for ax, title in zip(axes, ("median time (ms)", "TFLOP/s", "peak memory (MB)")):
                ax.set_xscale("log", base=2)
                if title != "TFLOP/s":
                    ax.set_yscale("log")
                ax.set_xlabel("batch B")
                ax.set_title(title)
                ax.grid(True, alpha=0.3)
            axes[0].legend()
            fig.suptitle(f"contrastive loss {mode}, D={D}, {tag}")
            fig.tight_layout()
            path = out / f"loss_kernel_{mode.replace('+', '_')}_D{D}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: cuda when available (default)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="batch sizes B, comma-separated (GPU default 1024,4096,16384,65536; "
        "CPU default 1024,4096,16384; --quick: 1024,2048)",
    )
    parser.add_argument(
        "--dims",
        type=lambda s: [int(x) for x in s.split(",")],
        help="embedding sizes D (default 1536,3584; --quick on CPU: 1536)",
    )
    parser.add_argument(
        "--providers",
        type=lambda s: s.split(","),
        help=f"subset of {','.join(PROVIDERS)} (default: all; CPU: torch,eager,compile; "
        "--quick on CPU: torch,eager)",
    )
    parser.add_argument(
        "--modes", type=lambda s: s.split(","), default=list(MODES), help="fwd and/or fwd+bwd (default both)"
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), help="input dtype (default bf16 on GPU, fp32 on CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="small CPU run (< 2 min on 2 cores)")
    parser.add_argument(
        "--big",
        action="store_true",
        help="GPU only: add one fused fwd+bwd at B=1,048,576 (--big-size) after the grid",
    )
    parser.add_argument("--big-size", type=int, default=1_048_576, help="B of the --big point")
    parser.add_argument("--big-dim", type=int, default=1536, help="D of the --big point")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="GPU only: time the recompute engine kernels alone (tile configs, splits, the gradient "
        "backward) at --sizes x --dims instead of the provider grid",
    )
    parser.add_argument("--no-grid", action="store_true", help="skip the provider grid (e.g. only --big)")
    parser.add_argument(
        "--matryoshka",
        nargs="?",
        const=[],
        type=lambda s: [int(x) for x in s.split(",")],
        metavar="DIMS",
        help="run the Matryoshka providers (mrl-*) instead of the grid, with these prefixes (default "
        "64,128,256,512 below D, and D); sizes GPU 4096,16384, CPU 2048 (--quick: 512), D 1536 "
        "(--quick on CPU: 256), fwd+bwd",
    )
    parser.add_argument(
        "--pick-configs",
        type=Path,
        metavar="SWEEP_CSV",
        help="print the VLM2VEC_TRITON_CONFIG value naming the fastest tiles in a sweep CSV",
    )
    parser.add_argument(
        "--st-mini-batch",
        type=int,
        default=32,
        help="--matryoshka: the mini-batch of sentence-transformers' cached loss (default 32, its own)",
    )
    parser.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench repetition time per cell (ms)")
    parser.add_argument("--cpu-budget-s", type=float, default=3.0, help="CPU: timing budget per cell (s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "out",
        help="directory for loss_kernel.csv and the PNGs (default bench/out/)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser.parse_args(argv)


def _lower_malloc_mmap_threshold():
    """Re-exec once with glibc's mmap threshold fixed at 64 KiB: freed tensors then leave RSS at once,
    so the CPU peak-RSS probe measures each call and not memory kept by malloc from earlier cells."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and platform.system() == "Linux":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pick_configs:
        with open(args.pick_configs, newline="") as f:
            print(best_configs(list(csv.DictReader(f))))
        return 0
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        _lower_malloc_mmap_threshold()
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 with a GPU: unset it to benchmark compiled kernels", file=sys.stderr)
        return 2
    on_gpu = device == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if on_gpu else "fp32")
    ]
    quick_cpu = args.quick and not on_gpu
    mrl = _mrl()
    if args.matryoshka is not None:
        sizes = args.sizes or ([4096, 16384] if on_gpu else [512] if quick_cpu else [2048])
        dims = args.dims or ([256] if quick_cpu else [1536])
        first = "mrl-fused" if on_gpu else "mrl-torch"
        providers = args.providers or [first, "mrl-eager", "mrl-st"]
        known = mrl.MRL_PROVIDERS
        if args.modes == list(MODES):
            args.modes = ["fwd+bwd"]
    else:
        sizes = args.sizes or (
            [1024, 4096, 16384, 65536] if on_gpu else [1024, 2048] if quick_cpu else [1024, 4096, 16384]
        )
        dims = args.dims or ([1536] if quick_cpu else [1536, 3584])
        providers = args.providers or (
            list(PROVIDERS) if on_gpu else ["torch", "eager"] if quick_cpu else ["torch", "eager", "compile"]
        )
        known = PROVIDERS
    for p in providers:
        if p not in known:
            raise SystemExit(f"--providers: unknown provider {p!r}; choose from {', '.join(known)}")
    if args.matryoshka and any(d > max(dims) for d in args.matryoshka):
        raise SystemExit(f"--matryoshka: prefixes {args.matryoshka} must not exceed D={max(dims)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() == (REPO / "bench" / "out").resolve() and not (args.out / ".gitignore").exists():
        (args.out / ".gitignore").write_text("*\n")  # results stay local unless copied to bench/results/
    meta = {
        "device": device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _commit(),
    }
    print(f"# loss_kernel: {meta['device']}, {dtype}, commit {meta['commit']}, out {args.out}", flush=True)

    if args.sweep:
        if not on_gpu:
            raise SystemExit("--sweep needs a GPU (the interpreter's timings mean nothing)")
        run_sweep(
            device,
            dtype,
            sizes,
            dims,
            args.rep_ms,
            lambda row: append_csv(args.out / "engine_sweep.csv", [row | meta], SWEEP_FIELDS),
        )
        return 0

    rows: list[dict] = []
    csv_path = args.out / "loss_kernel.csv"
    reference = "torch"
    if args.matryoshka is not None:
        reference = "mrl-torch" if "mrl-torch" in providers else "mrl-fused"
    if not args.no_grid:
        for D in dims:
            for B in sizes:
                reference_loss = None
                for mode in args.modes:
                    for provider in sorted(providers, key=lambda p: p != reference):  # reference first
                        row = run_cell(provider, mode, B, D, device, dtype, args)
                        if provider == reference and "_loss" in row:
                            reference_loss = row["_loss"]
                        if "_loss" in row and reference_loss is not None:
                            diff = abs(row["_loss"] - reference_loss) / abs(reference_loss)
                            row["loss_rel_diff"] = f"{diff:.1e}"
                        rows.append(row | meta)
                        append_csv(csv_path, rows[-1:], CSV_FIELDS)  # at once: a cut-off run keeps it
                        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if args.big:
        if not on_gpu:
            print("--big needs a GPU: skipped", file=sys.stderr)
        else:
            rows.append(run_big(device, dtype, args.big_size, args.big_dim) | meta)
            append_csv(csv_path, rows[-1:], CSV_FIELDS)
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if not rows:
        return 0
    print()
    print(format_table(rows))
    if args.matryoshka is not None:
        mrl_rows = [r for r in rows if r["provider"] in mrl.MRL_PROVIDERS]
        print("\n".join(mrl.ratio_lines(mrl_rows, reference)))
        return 0
    if not args.no_plots:
        for path in plot(rows, args.out, f"{meta['device']}, {str(dtype).replace('torch.', '')}"):
            print(f"plot: {path}")
    print(f"csv: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
