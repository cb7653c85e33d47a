"""The default run's model, exported by the trainer's --export_dir (a 1-step default run: real
EfficientNet-Lite0 + MiniLM weights, a small subset of the default data): held-out P@1 through
sentence-transformers' `encode` of the export, scored by the same MMEB scorer, equals
`python -m vlm2vec.eval` on the run. ~3 minutes on a 2-core CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _st_encoder(st):
    """sentence-transformers' documented input forms for MMEB rows: a string, an image, or a dict."""

    def encode(texts, images, videos=None):
        rows = []
        for text, image in zip(texts, images):
            rows.append(text if image is None else {"image": image, "text": text} if text else image)
        return st.encode(rows, batch_size=16, convert_to_tensor=True).float().cpu()

    return encode


@pytest.mark.slow
def test_default_run_export_scores_like_vlm2vec_eval(tmp_path):
    from sentence_transformers import SentenceTransformer

    from vlm2vec.eval_v1 import evaluate

    out, data, export = tmp_path / "out", tmp_path / "data", tmp_path / "export"
    cmd = [sys.executable, "vlm2vec/train.py", "--output_dir", str(out), "--demo_dir", str(data),
           "--max_steps", "1", "--demo_n_train", "16", "--demo_n_eval", "12", "--demo_clipart_drawings", "80",
           "--demo_clipart_n_eval", "10", "--train_batch_size", "8", "--gc_q_chunk_size", "4",
           "--gc_p_chunk_size", "4", "--warmup_steps", "0", "--disable_tqdm",
           "--export_dir", str(export)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported to {export}" in proc.stdout
    assert "## Evaluation" in (export / "README.md").read_text()

    eval_data = str(data / "data" / "eval")
    cmd = [sys.executable, "-m", "vlm2vec.eval", "--model", str(out), "--data", eval_data, "--out",
           str(tmp_path / "eval"), "--no-cache", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads((tmp_path / "eval" / "scores.json").read_text())["datasets"]

    st = SentenceTransformer(str(export), device="cpu", local_files_only=True, trust_remote_code=True)
    got = evaluate(_st_encoder(st), eval_data, use_cache=False, show_progress=False)["datasets"]
    assert set(got) == set(want)
    for name in want:
        assert got[name]["p_at_1"] == want[name]["p_at_1"], name
