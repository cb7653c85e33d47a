"""What a run reports while it trains: the progress bar (rank 0), the JSONL log (`train_log.jsonl`, one
line per logged step and per evaluation) and TensorBoard scalars."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from tqdm.auto import tqdm

from vlm2vec.config import TrainConfig

LOG_FILE = "train_log.jsonl"


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
        truncate_log(self.path, start)
        if config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.logging_dir or os.path.join(config.output_dir, "tensorboard"))
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
        """One evaluation's P@1 per task (and overall) as a log line and TensorBoard scalars; with
        embedding prefixes (--eval_dims) the same per prefix under "p_at_1_dims" {str(d): ...}."""
        if self.rank != 0 or scores is None:
            return
        p_at_1 = _p_at_1(scores)
        record = {"step": step, "eval": key, "p_at_1": p_at_1}
        if scores.get("dims"):  # --eval_dims: the same per embedding prefix
            record["p_at_1_dims"] = {d: _p_at_1(s) for d, s in scores["dims"].items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in p_at_1.items():
                self.writer.add_scalar(f"eval_{key}/{name}", value, step)
            for d, values in record.get("p_at_1_dims", {}).items():
                for name, value in values.items():
                    self.writer.add_scalar(f"eval_{key}_dim{d}/{name}", value, step)

    def message(self, text: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _p_at_1(scores: dict[str, Any]) -> dict[str, float]:
    """P@1 per task and overall of one evaluation (or of one of its embedding prefixes)."""
    p_at_1 = {name: m["p_at_1"] for name, m in scores["datasets"].items()}
    p_at_1["overall"] = scores["aggregate"]["Overall"]["p_at_1"]
    return p_at_1


def truncate_log(path: str, keep_through: int) -> None:
    """Drop log lines of steps after `keep_through` (a resumed run rewrites them)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_through]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
