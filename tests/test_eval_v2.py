"""MMEB-V2 evaluation: metrics against hand-computed values, global vs local ranking, the readers on a
tiny local copy of each task kind, and `python -m vlm2vec.eval --benchmark mmeb-v2` end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vlm2vec.data import DataError
from vlm2vec.eval_v2 import evaluate_v2, score_task
from vlm2vec.mmeb_v2 import MMEB_V2_TASKS, V2Row, V2Set, get_task, load_task
from vlm2vec.scoring import label_metrics
from vlm2vec.synthetic import write_tiny_mmeb_v2


def test_task_table_has_the_78_tasks_in_their_groups() -> None:
    counts: dict[tuple[str, str], int] = {}
    for t in MMEB_V2_TASKS:
        counts[(t.modality, t.group)] = counts.get((t.modality, t.group), 0) + 1
        assert t.metric == ("ndcg@5" if t.modality == "visdoc" else "hit@1")
    assert len(MMEB_V2_TASKS) == 78
    assert sum(n for (m, _), n in counts.items() if m == "image") == 36
    assert {g: n for (m, g), n in counts.items() if m == "video"} == {
        "Video-CLS": 5, "Video-QA": 5, "Video-RET": 5, "Video-MRET": 3,
    }  # fmt: skip
    assert {g: n for (m, g), n in counts.items() if m == "visdoc"} == {
        "ViDoRe-V1": 10, "ViDoRe-V2": 4, "VisRAG": 6, "VisDoc-OOD": 4,
    }  # fmt: skip
    assert get_task("MSR-VTT").eval_type == "global" and get_task("Video-MME").eval_type == "local"


def test_ndcg_at_5_with_graded_relevance_by_hand() -> None:
    # ranking by score: c1 (rel 0), c2 (rel 2), c3 (0), c4 (rel 1), c5, c0
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6, 0.5]])
    relevance = torch.tensor([[0.0, 0.0, 2.0, 0.0, 1.0, 0.0]])
    m = label_metrics(scores, relevance)
    # DCG = 2/log2(3) + 1/log2(5) = 1.2618595 + 0.4306766; IDCG = 2/log2(2) + 1/log2(3) = 2 + 0.6309298
    assert m["ndcg_at_5"] == pytest.approx(1.6925361 / 2.6309298, abs=1e-6)
    assert m["hit_at_1"] == 0.0 and m["mrr"] == pytest.approx(0.5)
    # the relevant pages outside the top 5 still count in the ideal DCG
    far = label_metrics(torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]]), torch.tensor([[1.0, 0, 0, 0, 0, 0, 1]]))
    assert far["ndcg_at_5"] == pytest.approx(1 / (1 + 1 / 1.5849625), abs=1e-6)
    # a tie with a non-relevant candidate counts against the relevant one
    tie = label_metrics(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]))
    assert tie["hit_at_1"] == 0.0


def _set(eval_type: str) -> V2Set:
    task = get_task("HMDB51" if eval_type == "global" else "Video-MME")
    rows = [
        V2Row("q0", None, ["a", "b"], ["a"], where="r0"),
        V2Row("q1", None, ["c", "d"], ["c"], where="r1"),
    ]
    return V2Set(task, rows, {n: (n, None) for n in "abcd"})


def test_global_ranking_uses_the_whole_pool_local_only_the_row() -> None:
    # inputs: q0, q1, a, b, c, d (the order of collect_v2_inputs: queries then the pool)
    emb = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.3], [0.0, -1.0], [1.0, 0.01], [-1.0, 0.0]]), dim=-1
    )
    pool = {"a": 2, "b": 3, "c": 4, "d": 5}
    local = score_task(_set("local"), emb, [0, 1], pool)
    glob = score_task(_set("global"), emb, [0, 1], pool)
    # q0: its own candidates are a (label) and b -> hit; in the pool c is closer -> miss
    # q1: c is not close to q1 ([0, 1]); a is the best of the pool, c the best of its row
    assert local["hit_at_1"] == 1.0
    assert glob["hit_at_1"] == 0.0
    assert local["n_candidates"] == 2 and glob["n_candidates"] == 4


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_v2")
    names = write_tiny_mmeb_v2(root, rows=2, frames=4, size=28)
    return root, names


def test_readers_on_the_tiny_copy(tiny_copy) -> None:
    root, names = tiny_copy
    kinds = {}
    for name in names:
        s = load_task(root, name)
        assert len(s.rows) == 2
        kinds[name] = s.input_kinds()
        for row in s.rows:
            pool = s.pool if s.task.eval_type == "global" else row.cand_names
            assert set(row.labels) <= set(pool)
    assert kinds["HMDB51"] == kinds["Video-MME"] == kinds["QVHighlight"] == kinds["MSR-VTT"] == {"video"}
    assert kinds["ViDoRe_arxivqa"] == kinds["ImageNet-1K"] == {"image"}
    hmdb = load_task(root, "HMDB51")
    assert len(hmdb.pool) == 51  # the reference's HMDB51 label list, not only the labels the rows use
    assert hmdb.rows[1].query_visual.paths[0].endswith("v1.mp4")  # no frame folder: the video file
    doc = load_task(root, "ViDoRe_arxivqa")
    assert doc.rows[0].labels == ["page0", "page1"] and doc.rows[0].rel_scores == [2.0, 1.0]


def test_reader_errors_name_row_and_file(tiny_copy, tmp_path) -> None:
    root, _ = tiny_copy
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / get_task("MSR-VTT").frame_root / "video1")
    with pytest.raises(
        DataError, match=r"test_1k/test-00000-of-00001.parquet, row 1: video .video1. not found.*video1"
    ):
        load_task(copy, "MSR-VTT")
    with pytest.raises(DataError, match="ActivityNetQA: data folder not found"):
        load_task(copy, "ActivityNetQA")


class CountingEncoder:
    """Deterministic embeddings from the text and visual content (so the test needs no model)."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, texts, images, videos=None):
        self.rows += len(texts)
        out = []
        for k, t in enumerate(texts):
            g = torch.Generator().manual_seed(
                sum(map(ord, t)) % 10_000 + 7 * (videos is not None and videos[k] is not None)
            )
            out.append(torch.randn(8, generator=g))
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def test_evaluate_v2_caches_embeddings_and_writes_the_group_table(tiny_copy, tmp_path) -> None:
    root, names = tiny_copy
    enc = CountingEncoder()
    scores = evaluate_v2(enc, str(root), out_dir=tmp_path / "out", fingerprint="m", show_progress=False)
    assert set(scores["tasks"]) == set(names)
    assert enc.rows > 0
    again = CountingEncoder()
    assert evaluate_v2(again, str(root), out_dir=tmp_path / "out", fingerprint="m", show_progress=False) == {
        **scores,
        "seconds": pytest.approx(scores["seconds"], abs=60),
    }
    assert again.rows == 0  # every embedding came from the cache
    agg = scores["aggregate"]
    assert agg["video"]["n"] == 4 and agg["visdoc"]["n"] == 1 and agg["Overall"]["n"] == 6
    assert len(scores["missing_tasks"]) == 72 and "K700" in scores["missing_tasks"]  # listed, not dropped
    table = (tmp_path / "out" / "table.md").read_text()
    assert "No data for 72 tasks: " in table
    for column in ("Video-CLS", "Video-MRET", "ViDoRe-V1", "visdoc (all)", "Overall"):
        assert column in table
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["tasks"]["ViDoRe_arxivqa"]["metric"] == "ndcg@5"


def test_cli_scores_a_tiny_qwen2_vl_and_refuses_a_family_without_video(tiny_copy, tmp_path, capsys) -> None:
    from vlm2vec.eval import main
    from vlm2vec.model import VLM2Vec

    root, names = tiny_copy
    VLM2Vec.tiny("qwen2_vl").save_pretrained(str(tmp_path / "qwen"))
    out = tmp_path / "out"
    args = ["--benchmark", "mmeb-v2", "--data", str(root), "--no-progress", "--batch-size", "4"]
    assert main(["--model", str(tmp_path / "qwen"), "--out", str(out), *args]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["tasks"]) == set(names)
    assert all(0.0 <= r["score"] <= 1.0 for r in scores["tasks"].values())
    VLM2Vec.tiny("llava_next").save_pretrained(str(tmp_path / "llava"))
    assert main(["--model", str(tmp_path / "llava"), "--out", str(tmp_path / "out2"), *args]) == 2
    assert "MMEB-V2 task HMDB51 has video rows, but backbone family 'llava_next'" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()  # refused before anything was embedded or written
    assert main(["--model", str(tmp_path / "llava"), "--out", str(tmp_path / "out3"), "--tasks",
                 "ViDoRe_arxivqa,ImageNet-1K", *args]) == 0  # fmt: skip


def test_unreadable_video_names_row_and_file_and_keeps_the_cache_whole(tiny_copy, tmp_path) -> None:
    from vlm2vec.media import MediaError

    root, _ = tiny_copy
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / get_task("HMDB51").video_root / "v1.mp4").write_bytes(b"not a video" * 50)
    with pytest.raises(
        MediaError,
        match=r"task HMDB51, .*test-00000-of-00001.parquet, row 1 query: cannot decode video .*v1.mp4",
    ):
        evaluate_v2(CountingEncoder(), str(copy), ["HMDB51"], out_dir=tmp_path / "out", show_progress=False,
                    batch_size=1)  # fmt: skip
    parts = sorted((tmp_path / "out" / "embeddings" / "HMDB51").glob("part-*"))
    assert all(p.suffix == ".pt" for p in parts)  # only complete parts (temp file + rename)
    for p in parts:
        assert torch.load(p, weights_only=True)["emb"].shape[1] == 8


@pytest.mark.slow
def test_cli_two_gloo_processes_match_one_process(tiny_copy, tmp_path) -> None:
    """torchrun with 2 gloo ranks (each embeds a shard of every task's distinct inputs, videos included)
    scores exactly as one process."""
    import os
    import subprocess
    import sys

    from vlm2vec.eval import main
    from vlm2vec.model import VLM2Vec

    root, names = tiny_copy
    VLM2Vec.tiny("qwen2_vl").save_pretrained(str(tmp_path / "model"))
    common = ["--benchmark", "mmeb-v2", "--model", str(tmp_path / "model"), "--data", str(root),
              "--batch-size", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "vlm2vec.eval", *common, "--out", str(tmp_path / "two")]  # fmt: skip
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "scores.json").read_text())
    one = json.loads((tmp_path / "one" / "scores.json").read_text())
    for name in names:
        for key in (
            "score",
            "score_ties_as_misses",
            "hit_at_1",
            "ndcg_at_5",
            "mrr_ties_as_misses",
            "n_distinct_inputs",
        ):
            assert two["tasks"][name][key] == pytest.approx(one["tasks"][name][key], abs=1e-6), (name, key)
    parts = sorted(p.name for p in (tmp_path / "two" / "embeddings" / "QVHighlight").glob("part-*.pt"))
    assert any(p.startswith("part-r0") for p in parts) and any(p.startswith("part-r1") for p in parts)


def test_momentseeker_reader_text_image_and_video_queries(tmp_path) -> None:
    import random

    from vlm2vec.media import write_frames
    from vlm2vec.synthetic import moving_shape, write_rows

    task = get_task("MomentSeeker")
    rng = random.Random(1)
    base = tmp_path / task.frame_root
    for name in ("a_pos0", "a_neg0", "a_neg1", "b_q"):
        write_frames(base / "video_frames" / name, moving_shape("blue", "square", 3, 28, rng))
    moving_shape("red", "circle", 1, 28, rng)[0].save(base / "query_img1.jpg")
    clips = dict(positive_frames=[{"output_path": "a/pos0.mp4"}],
                 negative_frames=[{"output_path": "a/neg0.mp4"}, {"output_path": "a/neg1.mp4"}])  # fmt: skip
    write_rows(tmp_path / task.data / "test.jsonl", [
        dict(query="the square", input_frames="", **clips),
        dict(query="this one", input_frames="img1.jpg", **clips),
        dict(query="later", input_frames="b/q.mp4", **clips),
    ])  # fmt: skip
    s = load_task(tmp_path, "MomentSeeker")
    assert [r.query_visual.input_kind if r.query_visual else None for r in s.rows] == [None, "image", "video"]
    assert s.rows[0].query_text == "Find the clip that corresponds to the given text: the square"
    assert len(s.pool) == 3 and all(r.labels == [r.cand_names[0]] for r in s.rows)
    (tmp_path / task.data / "test.jsonl").write_text(
        json.dumps(
            dict(
                query="x",
                input_frames="",
                positive_frames=[{"output_path": "c/missing.mp4"}],
                negative_frames=[],
            )
        )
        + "\n"  # fmt: skip
    )
    with pytest.raises(DataError, match=r"test.jsonl, row 0.*no frames for clip 'c/missing.mp4'"):
        load_task(tmp_path, "MomentSeeker")


def test_score_is_the_reference_ranking_with_ties_as_misses_beside_it() -> None:
    # one query whose label (candidate a) ties with candidate b: argsort(-scores) keeps a first -> a hit
    task = get_task("Video-MME")
    s = V2Set(task, [V2Row("q", None, ["a", "b"], ["a"], where="r0")], {n: (n, None) for n in "ab"})
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    r = score_task(s, emb, [0], {"a": 1, "b": 2})
    assert r["score"] == r["hit_at_1"] == 1.0
    assert r["score_ties_as_misses"] == r["hit_at_1_ties_as_misses"] == 0.0
    # the label after the tied candidate: a miss either way
    s.rows[0] = V2Row("q", None, ["b", "a"], ["a"], where="r0")
    assert score_task(s, emb, [0], {"a": 1, "b": 2})["score"] == 0.0


def test_graded_ndcg_is_paired_correctly_and_the_reference_pairing_is_reported_beside_it() -> None:
    # pool p0..p2; query relevant to p0 (grade 1) and p1 (grade 2); ranking p0, p1, p2
    task = get_task("ViDoRe_arxivqa")
    row = V2Row("q", None, ["p0", "p1"], ["p0", "p1"], [1.0, 2.0], where="r0")
    s = V2Set(task, [row], {n: (n, None) for n in ("p0", "p1", "p2")})
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    r = score_task(s, emb, [0], {"p0": 1, "p1": 2, "p2": 3})
    # DCG = 1/log2(2) + 2/log2(3) = 2.2618595; IDCG = 2 + 1/log2(3) = 2.6309298
    assert r["score"] == r["ndcg_at_5"] == pytest.approx(2.2618595 / 2.6309298, abs=1e-6)
    # the reference's set() may swap the grades (p0 -> 2, p1 -> 1: NDCG 1.0); where it does, it is reported
    assert r.get("ndcg_at_5_reference", r["ndcg_at_5"]) in (pytest.approx(r["ndcg_at_5"]), pytest.approx(1.0))


def _cli(*args: str) -> subprocess.CompletedProcess:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([repo, os.path.join(repo, "kernels")]),
    }
    cmd = [sys.executable, "-m", "vlm2vec.eval", *args]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_cli_bad_input_is_one_line_and_exit_2(tiny_copy, tmp_path) -> None:
    from vlm2vec.model import VLM2Vec

    root, _ = tiny_copy
    missing = _cli("--benchmark", "mmeb-v2", "--model", str(tmp_path / "no-such-model"), "--data", str(root),
                   "--out", str(tmp_path / "o1"))  # fmt: skip
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"python -m vlm2vec.eval: error: --model {tmp_path / 'no-such-model'}: no such model directory"
    ]
    (tmp_path / "empty").mkdir()
    not_a_model = _cli("--benchmark", "mmeb-v2", "--model", str(tmp_path / "empty"), "--data", str(root),
                       "--out", str(tmp_path / "o1"))  # fmt: skip
    assert not_a_model.returncode == 2 and len(not_a_model.stderr.strip().splitlines()) == 1
    assert "not a model directory" in not_a_model.stderr
    VLM2Vec.tiny("qwen2_vl").save_pretrained(str(tmp_path / "qwen"))
    for data, message in ((tmp_path / "empty", "no MMEB-V2 task data found"),
                          (tmp_path / "nowhere", "MMEB-V2 data folder not found")):  # fmt: skip
        proc = _cli("--benchmark", "mmeb-v2", "--model", str(tmp_path / "qwen"), "--data", str(data),
                    "--out", str(tmp_path / "o2"))  # fmt: skip
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr
    unknown = _cli("--benchmark", "mmeb-v2", "--model", str(tmp_path / "qwen"), "--data", str(root),
                   "--tasks", "Kinetics-700", "--out", str(tmp_path / "o3"))  # fmt: skip
    assert unknown.returncode == 2 and "the reference names it K700" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    v1 = _cli(
        "--model", str(tmp_path / "qwen"), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o4")
    )
    assert v1.returncode == 2 and len(v1.stderr.strip().splitlines()) == 1, v1.stderr
