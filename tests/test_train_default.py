"""The trainer's default run through the published entry point, made tiny (2 steps, a small subset of
the emoji + OpenClipArt data): real EfficientNet-Lite0 + MiniLM weights, GradCache + DeepSpeed ZeRO-2
and ZeRO-3 on 2 gloo ranks, evaluation of the baselines and the trained model on all ranks. A hang
fails the test (subprocess timeout) instead of waiting for DeepSpeed's 10-minute collective timeout."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_default_run_on_two_ranks_trains_and_evaluates_like_the_cli(tmp_path, stage):
    from safetensors.torch import load_file

    from vlm2vec.model import VLM2Vec

    out, cache = tmp_path / "out", tmp_path / "data"
    # the default run, made small: 2 steps of 8 pairs in 2 GradCache chunks per side, 16 + 12 emoji and
    # the first 80 OpenClipArt drawings (10 texts held out); evaluation also after step 1
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "vlm2vec/train.py",
           "--ds_config", f"configs/ds_zero{stage}.json", "--output_dir", str(out), "--demo_dir", str(cache),
           "--max_steps", "2", "--demo_n_train", "16", "--demo_n_eval", "12", "--demo_clipart_drawings",
           "80", "--demo_clipart_n_eval", "10", "--train_batch_size", "8", "--gc_q_chunk_size", "4",
           "--gc_p_chunk_size", "4", "--warmup_steps", "0", "--eval_steps", "1",
           "--disable_tqdm"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert len(re.findall(r"exits successfully", proc.stdout + proc.stderr)) == 2  # both ranks exit 0

    # the trainer ran with the recipe's untouched options, the given overrides and the default data
    saved = json.loads((out / "train_config.json").read_text())
    options = saved["options"]
    assert saved["world_size"] == 2 and options["model_name"] == "demo:emoji" and options["symmetric_loss"]
    assert options["dataset_name"] == str(cache / "data" / "train")
    assert options["eval_data"] == str(cache / "data" / "eval")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 for r in steps), steps
    evals = [(r["step"], r["eval"]) for r in log if "eval" in r]
    assert evals == [(0, "untrained"), (0, "probe"), (1, "trained"), (2, "trained")], evals

    # adapter (LoRA on MiniLM + the full projector) saved, moved from its init, and loadable
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("projector" in k for k in adapter) and any("lora_A" in k for k in adapter)
    assert any(int((v != 0).sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    model = VLM2Vec.from_pretrained(str(out))
    assert model.encode(["grinning face"], show_progress=False).isfinite().all()

    # in-training evaluation == `python -m vlm2vec.eval` on the saved model
    cli = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "vlm2vec.eval", "--model", str(out), "--data",
                          str(cache / "data" / "eval"), "--out", str(cli), "--batch-size", "64",
                          "--no-progress"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ours = json.loads((out / "eval" / "trained" / "scores.json").read_text())["datasets"]
    theirs = json.loads((cli / "scores.json").read_text())["datasets"]
    assert set(ours) == {"ClipArtI2T", "ClipArtT2I", "ClipArtCategory", "EmojiI2T", "EmojiT2I", "EmojiGroup"}
    for name in ours:
        for metric in ("p_at_1", "hit_at_5", "mrr"):
            assert math.isclose(ours[name][metric], theirs[name][metric], abs_tol=1e-6), (name, metric)
    last = [r for r in log if r.get("eval") == "trained" and r["step"] == 2][0]["p_at_1"]
    assert math.isclose(last["ClipArtI2T"], theirs["ClipArtI2T"]["p_at_1"], abs_tol=1e-6)

    # the report: three models, MMEB-layout table, headline P@1 values as the last line
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert "| Model | Classification |" in proc.stdout and "frozen-feature ridge probe" in proc.stdout
    last_line = [line for line in lines if "P@1: untrained" in line][-1]
    assert last_line.startswith("image->title over all held-out OpenClipArt titles (")
    values = dict(re.findall(r"(untrained|probe|trained) ([0-9.]+)", last_line))
    assert sorted(values) == ["probe", "trained", "untrained"], last_line
    assert f"trained {theirs['ClipArtI2T']['p_at_1']:.3f}" in last_line
