"""Matryoshka evaluation (`--eval_dims`): each embedding prefix scored from the one set of full embeddings
(MMEB and MMEB-V2, the command line, the default from vlm2vec.json, bad sizes, in-training evaluation).

The prefix scores are checked against P@1 computed by hand from the cached embeddings (sliced, then
re-normalised), and against an encoder that returns the prefixes itself; the full embedding's results
must be exactly those of a run without --eval_dims."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm2vec.data import load_eval_dataset
from vlm2vec.eval import build_parser, main
from vlm2vec.eval_v1 import collect_inputs, evaluate
from vlm2vec.eval_v2 import evaluate_v2
from vlm2vec.synthetic import write_synthetic_mmeb, write_tiny_mmeb_v2

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")]),
}
D = 8


class SeededEncoder:
    """Deterministic D-dim embeddings of (text, visual content), not unit length unless `normalize`;
    `keep`: return only the first `keep` numbers (normalised as the model would), i.e. what a model
    serving that prefix returns. Counts the rows it embeds."""

    def __init__(self, normalize: bool = True, keep: int | None = None):
        self.normalize, self.keep, self.rows = normalize, keep, 0

    def __call__(self, texts, images, videos=None):
        out = []
        for k, text in enumerate(texts):
            h = hashlib.sha256(text.encode())
            for visual in (images[k], videos[k] if videos else None):
                for img in visual if isinstance(visual, list) else [visual] if visual is not None else []:
                    h.update(img.tobytes())
            g = torch.Generator().manual_seed(int(h.hexdigest()[:12], 16))
            out.append(torch.randn(D, generator=g) * (1 + torch.rand(1, generator=g)))
        self.rows += len(texts)
        emb = torch.stack(out)[:, : self.keep or D]
        return F.normalize(emb, dim=-1) if self.normalize else emb


@pytest.fixture(scope="module")
def v1_data(tmp_path_factory) -> Path:
    made = write_synthetic_mmeb(tmp_path_factory.mktemp("v1"), rows=24, num_candidates=6, image_size=16)
    meta = {
        "ShapeClassification": {"meta_task": "Classification", "ood": False},
        "ShapeVQA": {"meta_task": "VQA", "ood": True},
        "ShapeRetrieval_t2i": {"meta_task": "Retrieval"},
    }
    (made.eval_dir / "datasets.json").write_text(json.dumps(meta))
    return made.eval_dir


def _close(got, expected) -> None:
    """Nested dicts equal, numbers to float precision (pytest.approx does not nest)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), (got, expected)
        for k in expected:
            _close(got[k], expected[k])
    elif isinstance(expected, float):
        assert got == pytest.approx(expected)
    else:
        assert got == expected


def _cached_table(cache: Path) -> torch.Tensor:
    """Row i = the cached embedding of distinct input i (read straight from the cache parts)."""
    rows: dict[int, torch.Tensor] = {}
    for part in sorted(cache.glob("part-*.pt")):
        saved = torch.load(part, weights_only=True)
        rows.update(zip(saved["index"].tolist(), saved["emb"]))
    return torch.stack([rows[i] for i in range(len(rows))])


def _hand_p_at_1(data: Path, name: str, table: torch.Tensor, d: int, normalize: bool) -> float:
    """P@1 by hand: slice each embedding to d numbers, re-normalise, dot products, the ground truth
    (candidate 0) a hit only when strictly above every other candidate."""
    inputs = collect_inputs(load_eval_dataset(data, name))

    def vec(i: int) -> torch.Tensor:
        v = table[i, :d].double()
        return v / v.norm() if normalize else v

    hits = 0
    for q, cands in zip(inputs.query_index, inputs.cand_index):
        scores = [float(vec(q) @ vec(c)) for c in cands]
        hits += all(scores[0] > s for s in scores[1:])
    return hits / len(inputs.query_index)


@pytest.mark.parametrize("normalize", [True, False])
def test_v1_prefix_scores_match_hand_computation_and_full_results_are_unchanged(v1_data, tmp_path, normalize):
    enc = SeededEncoder(normalize)
    scores = evaluate(enc, str(v1_data), out_dir=tmp_path / "dims", fingerprint="m", show_progress=False,
                      dims=[2, 5], normalize=normalize)  # fmt: skip
    assert enc.rows == sum(r["n_distinct_inputs"] for r in scores["datasets"].values())  # embedded once
    plain = evaluate(SeededEncoder(normalize), str(v1_data), out_dir=tmp_path / "plain", fingerprint="m",
                     show_progress=False)  # fmt: skip
    assert "dims" not in plain and scores["datasets"] == plain["datasets"]
    assert scores["aggregate"] == plain["aggregate"]
    assert list(scores["dims"]) == ["2", "5"] and scores["embedding_dim"] == D
    differs = False
    for name in scores["datasets"]:
        table = _cached_table(tmp_path / "dims" / "embeddings" / name)
        assert table.shape[1] == D  # the cache holds the full embeddings
        for d in (2, 5):
            got = scores["dims"][str(d)]["datasets"][name]["p_at_1"]
            assert got == pytest.approx(_hand_p_at_1(v1_data, name, table, d, normalize)), (name, d)
            differs |= got != scores["datasets"][name]["p_at_1"]
        assert _hand_p_at_1(v1_data, name, table, D, normalize) == pytest.approx(
            scores["datasets"][name]["p_at_1"]
        )
    assert differs, "the prefixes scored like the full embedding everywhere: the test data shows nothing"
    # the same as a model that serves the prefix itself, every metric and the aggregate
    served = evaluate(SeededEncoder(normalize, keep=2), str(v1_data), use_cache=False, show_progress=False)
    _close(
        scores["dims"]["2"]["datasets"],
        {n: {k: v for k, v in r.items() if k != "n_distinct_inputs"} for n, r in served["datasets"].items()},
    )
    _close(scores["dims"]["2"]["aggregate"], served["aggregate"])
    on_disk = json.loads((tmp_path / "dims" / "scores.json").read_text())
    assert on_disk["dims"]["5"] == scores["dims"]["5"]
    table_md = (tmp_path / "dims" / "table.md").read_text()
    assert table_md.startswith((tmp_path / "plain" / "table.md").read_text())  # a section added, no change
    assert f"| Dataset | 2 | 5 | {D} (full) |" in table_md
    overall = [scores["dims"][d]["aggregate"]["Overall"]["p_at_1"] for d in ("2", "5")]
    cells = " | ".join(f"{100 * v:.1f}" for v in [*overall, scores["aggregate"]["Overall"]["p_at_1"]])
    assert f"| **Overall** | {cells} |" in table_md


def test_v1_sizes_larger_than_the_embedding_are_refused(v1_data):
    from vlm2vec.errors import DataError

    with pytest.raises(DataError, match=f"eval dims 9: larger than the embedding size {D}"):
        evaluate(SeededEncoder(), str(v1_data), use_cache=False, show_progress=False, dims=[4, 9])
    with pytest.raises(ValueError, match="increasing sizes"):
        evaluate(SeededEncoder(), str(v1_data), use_cache=False, show_progress=False, dims=[4, 4])


def test_v2_prefix_scores_match_an_encoder_serving_the_prefix(tmp_path):
    root = tmp_path / "v2"
    write_tiny_mmeb_v2(root, rows=2, frames=4, size=28)
    enc = SeededEncoder()
    scores = evaluate_v2(enc, str(root), out_dir=tmp_path / "dims", fingerprint="m", show_progress=False,
                         dims=[3, 6])  # fmt: skip
    plain = evaluate_v2(SeededEncoder(), str(root), out_dir=tmp_path / "plain", fingerprint="m",
                        show_progress=False)  # fmt: skip
    assert scores["tasks"] == plain["tasks"] and scores["aggregate"] == plain["aggregate"]
    assert enc.rows == sum(r["n_distinct_inputs"] for r in scores["tasks"].values())
    for d in (3, 6):
        served = evaluate_v2(SeededEncoder(keep=d), str(root), use_cache=False, show_progress=False)
        expected = {
            n: {k: v for k, v in r.items() if k != "n_distinct_inputs"} for n, r in served["tasks"].items()
        }
        _close(scores["dims"][str(d)]["tasks"], expected)
        _close(scores["dims"][str(d)]["aggregate"], served["aggregate"])
    table_md = (tmp_path / "dims" / "table.md").read_text()
    assert table_md.startswith((tmp_path / "plain" / "table.md").read_text())
    assert f"| Task | 3 | 6 | {D} (full) |" in table_md and "| **Overall** |" in table_md


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlm2vec.eval", "--no-progress", "--batch-size", "8", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from vlm2vec.model import VLM2Vec

    path = tmp_path_factory.mktemp("model") / "qwen"
    VLM2Vec.tiny("qwen2_vl").save_pretrained(str(path))
    return path


def test_cli_writes_a_column_per_size_and_keeps_the_full_results(tiny_model, v1_data, tmp_path):
    """As a user runs it: a tiny Qwen2-VL (64-dim embeddings) with --eval_dims 16,32."""
    done = _cli("--model", str(tiny_model), "--data", str(v1_data), "--out", str(tmp_path / "o"),
                "--eval_dims", "16,32")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert list(scores["dims"]) == ["16", "32"] and scores["embedding_dim"] == 64
    table_md = (tmp_path / "o" / "table.md").read_text()
    assert "| Dataset | 16 | 32 | 64 (full) |" in table_md and "## By embedding size" in done.stdout
    for name in scores["datasets"]:
        table = _cached_table(tmp_path / "o" / "embeddings" / name)
        for d in (16, 32):
            assert scores["dims"][str(d)]["datasets"][name]["p_at_1"] == pytest.approx(
                _hand_p_at_1(v1_data, name, table, d, normalize=True)
            ), (name, d)
    assert main(["--model", str(tiny_model), "--data", str(v1_data), "--out", str(tmp_path / "plain"),
                 "--no-progress", "--batch-size", "8"]) == 0  # fmt: skip
    plain = json.loads((tmp_path / "plain" / "scores.json").read_text())
    assert "dims" not in plain
    assert scores["datasets"] == plain["datasets"] and scores["aggregate"] == plain["aggregate"]


def _with_matryoshka_dims(model: Path, copy: Path, dims: list[int]) -> Path:
    """A copy of `model` whose vlm2vec.json records matryoshka_dims (as a Matryoshka run saves it)."""
    shutil.copytree(model, copy)
    meta = json.loads((copy / "vlm2vec.json").read_text())
    (copy / "vlm2vec.json").write_text(json.dumps({**meta, "matryoshka_dims": dims}))
    return copy


def test_cli_defaults_to_the_recorded_matryoshka_dims(tiny_model, v1_data, tmp_path, capsys):
    recorded = _with_matryoshka_dims(tiny_model, tmp_path / "mrl", [8, 24])
    args = ["--data", str(v1_data), "--datasets", "ShapeVQA", "--no-progress", "--max-rows", "4"]
    assert main(["--model", str(recorded), "--out", str(tmp_path / "a"), *args]) == 0
    assert list(json.loads((tmp_path / "a" / "scores.json").read_text())["dims"]) == ["8", "24"]
    assert "scoring the prefixes 8,24" in capsys.readouterr().err
    assert main(["--model", str(recorded), "--out", str(tmp_path / "b"), "--eval_dims", "", *args]) == 0
    assert "dims" not in json.loads((tmp_path / "b" / "scores.json").read_text())
    assert main(["--model", str(recorded), "--out", str(tmp_path / "c"), "--eval-dims", "4", *args]) == 0
    assert list(json.loads((tmp_path / "c" / "scores.json").read_text())["dims"]) == ["4"]
    assert "matryoshka_dims" in build_parser().format_help()


def test_cli_bad_sizes_are_one_line_and_exit_2(tiny_model, v1_data, tmp_path, capsys):
    common = ["--model", str(tiny_model), "--data", str(v1_data), "--out", str(tmp_path / "o")]
    decreasing = _cli(*common, "--eval_dims", "32,16")
    assert decreasing.returncode == 2 and decreasing.stderr.strip().splitlines() == [
        "python -m vlm2vec.eval: error: --eval_dims 32,16: give increasing sizes >= 1, like 64,256"
    ]
    too_big = _cli(*common, "--eval_dims", "16,65")  # refused after the model loads, before embedding
    assert too_big.returncode == 2 and "Traceback" not in too_big.stderr, too_big.stderr
    # transformers' own weight-loading bar comes first; the error is the one line after it
    assert too_big.stderr.strip().splitlines()[-1] == (
        "python -m vlm2vec.eval: error: --eval_dims 65: larger than the embedding size 64"
    )
    assert not (tmp_path / "o").exists()
    assert main([*common, "--eval_dims", "16,abc"]) == 2
    assert main([*common, "--eval_dims", "0,16"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        "python -m vlm2vec.eval: error: --eval_dims '16,abc': give increasing integers like 64,256",
        "python -m vlm2vec.eval: error: --eval_dims 0,16: give increasing sizes >= 1, like 64,256",
    ]
    bad_meta = _with_matryoshka_dims(tiny_model, tmp_path / "bad", [32, 128])
    assert main(["--model", str(bad_meta), *common[2:], "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m vlm2vec.eval: error: {bad_meta / 'vlm2vec.json'} matryoshka_dims 128: larger than the "
        "embedding size 64"
    )


def test_cli_mmeb_v2_with_sizes(tiny_model, tmp_path):
    root = tmp_path / "v2"
    write_tiny_mmeb_v2(root, rows=2, frames=4, size=28)
    out = tmp_path / "o"
    tasks = "ImageNet-1K,ViDoRe_arxivqa"
    assert main(["--model", str(tiny_model), "--benchmark", "mmeb-v2", "--data", str(root), "--tasks", tasks,
                 "--out", str(out), "--no-progress", "--eval_dims", "8,32"]) == 0  # fmt: skip
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["dims"]["8"]["tasks"]) == {"ImageNet-1K", "ViDoRe_arxivqa"}
    assert "| Task | 8 | 32 | 64 (full) |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_training_logs_and_reports_p_at_1_per_size(tmp_path):
    """A 2-step tiny run with --eval_data and --eval_dims: every evaluation record of train_log.jsonl
    has P@1 per size (the same as its scores.json), report.md a column per size; a size above the
    embedding's stops the run before its first step (one line, exit 2)."""
    made = write_synthetic_mmeb(tmp_path / "data", rows=8, image_size=32, seed=1, num_candidates=4)
    out = tmp_path / "run"
    args = [sys.executable, "vlm2vec/train.py", "--model_name", "tiny:qwen2_vl", "--dataset_name",
            str(made.train_dir), "--subset_name", "ShapeRetrieval_t2i", "ShapeClassification",
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_steps", "1",
            "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm",
            "--eval_data", str(made.eval_dir)]  # fmt: skip
    bad = subprocess.run([*args, "--output_dir", str(tmp_path / "bad"), "--eval_dims", "16,128"], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1] == (
        "vlm2vec/train.py: error (rank 0): --eval_dims 128: larger than the embedding size 64"
    )
    assert not list((tmp_path / "bad").glob("checkpoint-*"))
    done = subprocess.run([*args, "--output_dir", str(out), "--eval_dims", "16,32"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval" in r]
    assert {(r["step"], r["eval"]) for r in evals} >= {(0, "untrained"), (1, "trained"), (2, "trained")}
    for r in evals:
        assert list(r["p_at_1_dims"]) == ["16", "32"] and set(r["p_at_1_dims"]["16"]) == set(r["p_at_1"])
    final = json.loads((out / "eval" / "trained" / "scores.json").read_text())
    last = next(r for r in reversed(evals) if r["eval"] == "trained")
    for d in ("16", "32"):
        assert last["p_at_1_dims"][d]["overall"] == final["dims"][d]["aggregate"]["Overall"]["p_at_1"]
        for name, m in final["dims"][d]["datasets"].items():
            assert last["p_at_1_dims"][d][name] == m["p_at_1"]
    report = (out / "report.md").read_text()
    assert "| Model | Task | 16 | 32 | 64 (full) |" in report
    assert "| trained model | **Overall** |" in report and "| untrained model | **Overall** |" in report
