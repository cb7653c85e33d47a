"""Time per step and peak host memory per rank of the trainer at each ZeRO stage, with CPU offload, and
across a world-size change, on this CPU box (gloo, the real `deepspeed` launcher).

    python bench/train_scale_cpu.py [--model tiny:qwen2_vl | DIR] [--steps 6] [--out runs/bench_scale]
        [--only zero3 ...] [--train_args --min_pixels 3136 ...]

Each run trains --steps steps on mixed image/text synthetic MMEB rows (global batch 8, GradCache chunks
of 2/3, one hard negative, LoRA); time per step is the mean over the steps after the first (the first
pays for JIT builds and DeepSpeed's trace). Peak memory is `peak_host_mib` of the log (ru_maxrss, the
largest over the ranks). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, options: list[str]) -> float:
    if world == 1:
        cmd = [sys.executable, "vlm2vec/train.py", *options]
    else:
        launcher = ["deepspeed", "--num_gpus", str(world), "--master_port", str(_port())]
        cmd = [*launcher, "vlm2vec/train.py", *options]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def _summary(out: str, first: int) -> tuple[float, int]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    log = [r for r in log if r["step"] >= first]
    per_step = (log[-1]["elapsed_s"] - log[0]["elapsed_s"]) / max(1, len(log) - 1)
    return per_step, max(r.get("peak_host_mib") or 0 for r in log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny:qwen2_vl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="runs/bench_scale")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all)")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="more train.py options")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    from vlm2vec.synthetic import write_synthetic_mmeb

    out = os.path.abspath(args.out)
    data = write_synthetic_mmeb(
        os.path.join(out, "data"), rows=16, image_size=32, seed=3,
        subsets=("ShapeRetrieval_t2i", "ShapeClassification"),
    ).train_dir  # fmt: skip
    half = args.steps // 2

    def options(name: str, ds: str, *extra: str) -> list[str]:
        return [
            "--model_name", args.model, "--dataset_name", str(data), "--num_hard_negatives", "1",
            "--train_batch_size", "8", "--gc_q_chunk_size", "2", "--gc_p_chunk_size", "3",
            "--max_steps", str(args.steps), "--save_steps", str(half), "--learning_rate", "1e-3",
            "--ds_config", os.path.join(REPO, "configs", ds), "--output_dir", os.path.join(out, name),
            "--report_to", "none", "--disable_tqdm", *args.train_args, *extra,
        ]  # fmt: skip

    runs = [(f"zero{s}", 2, options(f"zero{s}", f"ds_zero{s}.json"), 2) for s in (0, 1, 2, 3)]
    runs += [
        ("zero3_offload", 2, options("zero3_offload", "ds_zero3_offload.json"), 2),
        ("zero3_1rank", 1, options("zero3_1rank", "ds_zero3.json"), 2),
        ("zero3_2to1", 1, options("zero3_2to1", "ds_zero3.json", "--resume",
                                  os.path.join(out, "zero3", f"checkpoint-{half}")), half + 2),
        ("zero3_1to2", 2, options("zero3_1to2", "ds_zero3.json", "--resume",
                                  os.path.join(out, "zero3_1rank", f"checkpoint-{half}")), half + 2),
    ]  # fmt: skip
    rows = []
    for name, world, opts, first in runs:
        if args.only and name not in args.only:
            continue
        wall = _run(world, opts)
        per_step, peak = _summary(os.path.join(out, name), first)
        rows.append(f"| {name} | {world} | {per_step:.2f} | {peak} | {wall:.0f} |")
        print(rows[-1], flush=True)
    print("\n| run | ranks | s/step | peak host MiB per rank (max) | wall s |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
