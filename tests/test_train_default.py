"""The trainer's default run (the embedded emoji demo) through the published entry point
`deepspeed vlm2vec/train.py --ds_config configs/ds_zero2.json`, 2 steps on a small subset: real
EfficientNet-Lite0 + MiniLM weights, real emoji data, GradCache + DeepSpeed ZeRO-2, evaluation table."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_run_trains_demo_through_gradcache_and_prints_table(tmp_path):
    from safetensors.torch import load_file

    from vlm2vec.model import VLM2Vec

    out, cache = tmp_path / "out", tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # the default run, made small: 2 steps of 8 pairs in 2 GradCache chunks per side, 16 + 12 emoji
    cmd = ["deepspeed", "--master_port", str(_free_port()), "vlm2vec/train.py", "--ds_config",
           "configs/ds_zero2.json", "--output_dir", str(out), "--demo_dir", str(cache), "--max_steps", "2",
           "--demo_n_train", "16", "--demo_n_eval", "12", "--train_batch_size", "8", "--gc_q_chunk_size", "4",
           "--gc_p_chunk_size", "4", "--warmup_steps", "0", "--disable_tqdm"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    # the trainer ran with the demo recipe's untouched options and the given overrides
    saved = json.loads((out / "train_config.json").read_text())["options"]
    assert saved["model_name"] == "demo:emoji" and saved["grad_cache"] and saved["symmetric_loss"]
    assert (saved["temperature"], saved["pooling"], saved["max_steps"]) == (0.05, "mean", 2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 for r in log), log
    assert log[0]["lr"] == 5e-4  # after step 1 of 2: the recipe's peak lr 1e-3 halfway down its linear decay

    # adapter (LoRA on MiniLM + the full projector) saved, moved from its init, and loadable
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("projector" in k for k in adapter) and any("lora_A" in k for k in adapter)
    assert any(int((v != 0).sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    model = VLM2Vec.from_pretrained(str(out))
    emb = model.encode(["grinning face", "red heart"], show_progress=False)
    assert emb.shape[0] == 2 and bool(emb.isfinite().all())

    # the report: three models, MMEB-layout table, headline P@1 values in [0, 1] as the last line
    text = proc.stdout
    for label in ("untrained demo model", "frozen-features linear probe", "trained demo model"):
        assert label in text
    assert "| Model | Classification |" in text
    last = [line for line in text.splitlines() if line.startswith("image->name P@1")][-1]
    values = dict(re.findall(r"(untrained|probe|trained) ([0-9.]+)", last))
    assert sorted(values) == ["probe", "trained", "untrained"] and "(12 candidates)" in last
    assert all(0.0 <= float(v) <= 1.0 for v in values.values()), last
    scores = json.loads((cache / "demo_scores.json").read_text())
    trained = scores["results"]["trained"]["datasets"]["EmojiI2T"]["p_at_1"]
    assert f"trained {trained:.3f}" in last and (out / "report.md").is_file()
    assert [r["loss"] for r in scores["train_log_tail"]] == [r["loss"] for r in log]
