"""Checkpoint/resume through the real entry point (tiny Qwen2-VL + LoRA dropout, hard negatives).

An uninterrupted run (under torchrun) and a run killed with SIGKILL mid-training then resumed with
`--resume auto` (plain `python vlm2vec/train.py`, one process) must log the same loss at every step and
end with the same adapter weights (CPU, fp32: bitwise)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 16, 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    from vlm2vec.synthetic import write_synthetic_mmeb

    made = write_synthetic_mmeb(tmp_path_factory.mktemp("data"), rows=12, image_size=32, seed=2)
    return str(made.train_dir)


@pytest.fixture(scope="module")
def eval_dir(data_dir) -> str:
    return os.path.join(os.path.dirname(data_dir), "eval")


def _args(data: str, out: str, *extra: str) -> list[str]:
    return [
        "vlm2vec/train.py",
        "--model_name",
        "tiny:qwen2_vl",
        "--dataset_name",
        data,
        "--subset_name",
        "ShapeRetrieval_t2i",
        "ShapeClassification",
        "--num_hard_negatives",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--gc_q_chunk_size",
        "2",
        "--gc_p_chunk_size",
        "3",
        "--max_steps",
        str(STEPS),
        "--save_steps",
        str(SAVE_EVERY),
        "--learning_rate",
        "1e-3",
        "--temperature",
        "0.05",
        "--output_dir",
        out,
        "--report_to",
        "none",
        "--disable_tqdm",
        *extra,
    ]


def _log(out: str) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(out: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(out) if "loss" in r}


def _evals(out: str) -> list[tuple[int, str, dict]]:
    return [(r["step"], r["eval"], r["p_at_1"]) for r in _log(out) if "eval" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_then_resume_gives_the_uninterrupted_losses(data_dir, eval_dir, tmp_path):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(_free_port()),
    ]
    done = subprocess.run(
        [*torchrun, *_args(data_dir, reference, "--eval_data", eval_dir)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    proc = subprocess.Popen(
        [sys.executable, *_args(data_dir, killed, "--eval_data", eval_dir)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = os.path.join(killed, f"checkpoint-{SAVE_EVERY}", "trainer_state.json")
    deadline = time.monotonic() + 240
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert max(_losses(killed)) < STEPS, "killed after the last step: nothing left to resume"
    assert not os.path.exists(os.path.join(killed, "adapter_model.safetensors"))  # final model never saved

    resume = [sys.executable, *_args(data_dir, killed, "--eval_data", eval_dir, "--resume", "auto")]
    resumed = subprocess.run(resume, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bitwise: same data order, dropout masks, optimizer and schedule state
    assert expected[STEPS] < expected[1]
    # the baseline (cached, not recomputed) is logged once, by the first run; the final scores match
    assert [(step, key) for step, key, _ in _evals(killed)] == [(0, "untrained"), (STEPS, "trained")]
    assert _evals(killed) == _evals(reference)
    final_a = load_file(os.path.join(reference, "adapter_model.safetensors"))
    final_b = load_file(os.path.join(killed, "adapter_model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert not [n for n in os.listdir(killed) if n.startswith(".tmp-checkpoint-")]


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    from vlm2vec.checkpoint import TRAINER_STATE, list_checkpoints, resolve_resume

    assert resolve_resume("auto", str(tmp_path)) is None  # nothing yet: a fresh start
    for name, complete in [
        ("checkpoint-4", True),
        ("checkpoint-12", True),
        ("checkpoint-16", False),
        (".tmp-checkpoint-20", True),
    ]:
        os.makedirs(tmp_path / name)
        if complete:
            (tmp_path / name / TRAINER_STATE).write_text("{}")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 12]
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-12")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-16"), str(tmp_path))
