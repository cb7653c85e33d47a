"""Hard-negative mining (`python -m vlm2vec.mine`): block-wise top-k against brute force, every filter by
hand, seeded sampling, an exhausted pool, the command line as a user runs it (tiny real model, tiny
data; errors in one line, exit 2), 2 ranks equal to 1, the output read back by the trainer's reader, and
a 2-rank ZeRO-3 training step on mined rows with fewer than K negatives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm2vec.mine import build_parser, main
from vlm2vec.mine_select import MineSettings, exclusions, mine_pool
from vlm2vec.mine_topk import block_topk

REPO = Path(__file__).resolve().parents[1]
SUBSETS = ("ShapeClassification", "ShapeRetrieval_t2i", "ShapeRetrieval_i2t")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def _brute(q: torch.Tensor, p: torch.Tensor, k: int, exclude=None, ceilings=()) -> tuple[list, list]:
    """Per query, the k best (score desc, index asc) of a full float64 score matrix after the same drops."""
    s = (q.double() @ p.double().T).tolist()
    out_i, removed = [], [[0] * len(q) for _ in ceilings]
    for r, row in enumerate(s):
        keep = []
        for j, v in enumerate(row):
            if exclude is not None and j in exclude[r]:
                continue
            dropped = False
            for f, c in enumerate(ceilings):
                if v > float(c[r]):
                    removed[f][r] += 1
                    dropped = True
                    break
            if not dropped:
                keep.append(j)
        out_i.append(sorted(keep, key=lambda j: (-row[j], j))[:k])
    return out_i, removed


# --------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("k", [1, 7, 101, 150])
def test_block_topk_equals_brute_force_with_ties(k):
    """Small-integer embeddings make exact score ties common (exact in float32 and float64), blocks do not
    divide the sizes: the order is score, then lower pool index, as the full sort."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-2, 3, (37, 6), generator=g).float()
    p = torch.randint(-2, 3, (101, 6), generator=g).float()
    top = block_topk(q, p, k, query_block=5, pool_block=7)
    want, _ = _brute(q, p, k)
    assert top.indices.shape == (37, min(k, 101))
    assert top.indices.tolist() == want
    assert torch.equal(top.scores, (q @ p.T).gather(1, top.indices))
    assert len({tuple(r) for r in (q @ p.T).tolist()}) > 1 and (q @ p.T)[0].unique().numel() < 101  # ties


def test_block_topk_with_exclusions_and_ceilings_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(23, 8, generator=g)
    p = torch.randn(61, 8, generator=g)
    exclude = [[i % 61, (3 * i) % 61] for i in range(23)]
    ceilings = [torch.full((23,), 0.8) + torch.rand(23, generator=g), torch.rand(23, generator=g) * 2]
    top = block_topk(q, p, 10, exclude=exclude, ceilings=ceilings, query_block=4, pool_block=9)
    want, removed = _brute(q, p, 10, exclude, ceilings)
    assert [[j for j in row if j >= 0] for row in top.indices.tolist()] == want
    assert [r.tolist() for r in top.removed] == removed and sum(map(sum, removed)) > 0
    assert top.found.tolist() == [len(w) for w in want]
    assert torch.isnan(top.scores[top.indices < 0]).all()


def test_block_topk_random_floats_and_big_blocks_agree():
    g = torch.Generator().manual_seed(5)
    q, p = torch.randn(50, 32, generator=g), torch.randn(999, 32, generator=g)
    a = block_topk(q, p, 20, query_block=1024, pool_block=65536)
    b = block_topk(q, p, 20, query_block=3, pool_block=17)
    assert torch.equal(a.indices, b.indices)
    assert a.indices.tolist() == (q @ p.T).topk(20, dim=1).indices.tolist()


# --------------------------------------------------------------------------------------------- filters
def _pool_2d():
    """Unit-ish vectors in 2-D: the query (1, 0) scores each candidate by its x coordinate."""
    xs = [0.9, 0.95, 0.85, 0.5, 0.8, 0.86, 0.99, 0.2, -0.3]
    return torch.tensor([[1.0, 0.0]]), torch.tensor([[x, 0.0] for x in xs])


def test_each_filter_by_hand():
    q, pool = _pool_2d()  # positive = index 0 (score 0.9)
    k = 3
    # no filters: everything but the positive, best first (0.99, 0.95, 0.86 ...)
    off = MineSettings(k, (0, 100), max_score_ratio=None, margin=None)
    got = mine_pool(q, [0], pool, [[0]], off)
    assert got.negatives == [[6, 1, 5]] and got.removed["max_score_ratio"] == 0
    assert got.pos_scores[0] == pytest.approx(0.9)
    # margin 0: drop what scores above the positive (0.99, 0.95)
    m0 = mine_pool(q, [0], pool, [[0]], MineSettings(k, (0, 100), None, 0.0))
    assert m0.negatives == [[5, 2, 4]] and m0.removed == {
        "own_positive_or_same_item": 1, "max_score_ratio": 0, "margin": 2,
    }  # fmt: skip
    # margin 0.09: also drop 0.86 and 0.85 (above 0.81)
    m1 = mine_pool(q, [0], pool, [[0]], MineSettings(k, (0, 100), None, 0.09))
    assert m1.negatives == [[4, 3, 7]] and m1.removed["margin"] == 4
    # ratio 0.95: drop what scores above 0.855 (0.99, 0.95, 0.86); ratio first, then margin counts the rest
    r = mine_pool(q, [0], pool, [[0]], MineSettings(k, (0, 100), 0.95, 0.0))
    assert r.negatives == [[2, 4, 3]] and r.removed["max_score_ratio"] == 3 and r.removed["margin"] == 0
    # rank window 1:3 over the survivors (0.85, 0.8, 0.5, 0.2, -0.3): ranks 1, 2 -> 0.8, 0.5
    w = mine_pool(q, [0], pool, [[0]], MineSettings(2, (1, 3), 0.95, 0.0))
    assert w.negatives == [[4, 3]] and w.neg_scores[0] == pytest.approx([0.8, 0.5])


def test_negative_positive_score_margin_catches_what_the_ratio_lets_through():
    """With a negative positive score, ratio x p is above p: only the margin stops higher candidates."""
    q, pool = torch.tensor([[1.0, 0.0]]), torch.tensor([[-0.5, 0.0], [-0.48, 0.0], [-0.6, 0.0]])
    ratio_only = mine_pool(q, [0], pool, [[0]], MineSettings(1, (0, 10), 0.95, None))
    assert ratio_only.negatives == [[1]]  # -0.48 is below 0.95 x -0.5 = -0.475 but above the positive
    both = mine_pool(q, [0], pool, [[0]], MineSettings(1, (0, 10), None, 0.0))
    assert both.negatives == [[2]] and both.removed["margin"] == 1


def test_own_positive_other_positives_of_the_query_and_the_query_itself_are_excluded():
    keys = [("q", "a.png", None), ("q", "a.png", None), ("r", None, None)]
    pool_keys = [("cap 1", None, None), ("cap 2", None, None), ("r", None, None), ("x", None, None)]
    pool_index = {k: i for i, k in enumerate(pool_keys)}
    excl = exclusions(keys, [0, 1, 3], pool_index)
    assert excl == [[0, 1], [0, 1], [2, 3]]  # both captions of the same image; the query "r" itself


def test_exhausted_pool_gives_fewer_or_none():
    q, pool = _pool_2d()
    tight = MineSettings(3, (0, 100), None, -0.5)  # drop everything above 0.9 + 0.5: nothing dropped
    assert len(mine_pool(q, [0], pool, [[0]], tight).negatives[0]) == 3
    gone = mine_pool(q, [8], pool, [[8]], MineSettings(3, (0, 100), None, 0.0))  # positive scores -0.3
    assert gone.negatives == [[]] and gone.window_short == 1 and gone.removed["margin"] == 8


def test_same_seed_same_random_draw():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(12, 8, generator=g), torch.randn(40, 8, generator=g)
    excl = [[i] for i in range(12)]
    s = MineSettings(4, (2, 20), None, None, "random", seed=7)
    a = mine_pool(q, list(range(12)), p, excl, s, row_ids=[(0, i) for i in range(12)])
    b = mine_pool(q, list(range(12)), p, excl, s, row_ids=[(0, i) for i in range(12)], query_block=5)
    c = mine_pool(q, list(range(12)), p, excl, MineSettings(4, (2, 20), None, None, "random", seed=8))
    assert a.negatives == b.negatives != c.negatives
    top = mine_pool(q, list(range(12)), p, excl, MineSettings(18, (2, 20), None, None)).negatives
    for drawn, window in zip(a.negatives, top):
        assert set(drawn) <= set(window) and drawn == [j for j in window if j in drawn]  # rank order kept


def test_settings_are_checked():
    with pytest.raises(ValueError, match="fewer than --num_negatives"):
        MineSettings(5, (0, 3))
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        MineSettings(1, (4, 4))


# --------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlm2vec.model import VLM2Vec
    from vlm2vec.synthetic import write_synthetic_mmeb

    root = tmp_path_factory.mktemp("mine")
    data = write_synthetic_mmeb(root / "data", rows=12, image_size=32, subsets=SUBSETS, eval_datasets=())
    VLM2Vec.tiny("qwen2_vl").save_pretrained(str(root / "model"))
    return root, data.train_dir, root / "model"


def test_help_lists_every_option():
    text = build_parser().format_help()
    for flag in ("--model", "--data", "--out", "--num_negatives", "--subsets", "--pool", "--rank_range",
                 "--max_score_ratio", "--margin", "--sampling", "--seed", "--batch_size", "--overwrite",
                 "--strict", "--encoder", "--cache_dir"):  # fmt: skip
        assert flag in text
    proc = subprocess.run([sys.executable, "-m", "vlm2vec.mine", "--help"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "--num_negatives" in proc.stdout


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_mines_writes_report_and_the_trainer_reads_it(tiny, tmp_path):
    from vlm2vec.data import TrainBatches, load_train_data

    root, data, model = tiny
    out = tmp_path / "mined"
    args = ["--model", str(model), "--data", str(data), "--num_negatives", "3", "--rank_range", "1:9",
            "--sampling", "random", "--seed", "3", "--batch_size", "8", "--no_progress"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "vlm2vec.mine", *args, "--out", str(out)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.jsonl" for s in SUBSETS] + ["mining_report.json", "mining_report.md", "scores.png"]
    )
    report = json.loads((out / "mining_report.json").read_text())
    src = {s: _read_jsonl(data / f"{s}.jsonl") for s in SUBSETS}
    for s in SUBSETS:
        rows = _read_jsonl(out / f"{s}.jsonl")
        entry = report["subsets"][s]
        assert entry["rows"] == len(rows) == 12 and entry["pool_size"] == len(
            {r["pos_text"] + r["pos_image_path"] for r in src[s]}
        )
        assert entry["rows_with_fewer_than_k"] == sum(len(r["neg_text"]) < 3 for r in rows)
        assert sum(entry["histogram"]["positive"]) == 12
        for r, orig in zip(rows, src[s]):
            assert r["qry"] == orig["qry"] and r["pos_text"] == orig["pos_text"]
            assert len(r["neg_text"]) == len(r["neg_image_path"]) <= 3
            pos = (r["pos_text"], r["pos_image_path"])
            assert pos not in set(zip(r["neg_text"], r["neg_image_path"]))  # never its own positive
            for p in [r["qry_image_path"], r["pos_image_path"], *r["neg_image_path"]]:
                assert p == "" or (Path(p).is_absolute() and Path(p).is_file())
    assert "rows < K" in (out / "mining_report.md").read_text()
    # the same seed again (embeddings from the cache this time): the same files
    again = tmp_path / "again"
    assert main([*args, "--out", str(again), "--cache_dir", str(tmp_path / "mined.cache")]) == 0
    for s in SUBSETS:
        assert (again / f"{s}.jsonl").read_text() == (out / f"{s}.jsonl").read_text()
    # round trip through the trainer's reader and batches (short rows masked, the default)
    train = load_train_data(str(out), num_negatives=3)
    assert train.sizes() == {s: 12 for s in SUBSETS}
    batch = TrainBatches(train, 8, seed=0)[0]
    assert batch.targets.tolist() == batch.group_starts() and len(batch.cand_texts) == sum(
        batch.group_sizes()
    )


def test_cli_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys):
    root, data, model = tiny
    base = ["--model", str(model), "--data", str(data), "--no_progress", "--num_negatives", "2"]
    (tmp_path / "exists").mkdir()
    assert main([*base, "--out", str(tmp_path / "exists")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists; pass --overwrite" in err
    assert main([*base, "--out", str(tmp_path / "o"), "--rank_range", "0:1"]) == 2
    assert "fewer than --num_negatives" in capsys.readouterr().err
    # a pool of one distinct positive: nothing can be a negative
    one = tmp_path / "one"
    one.mkdir()
    rows = _read_jsonl(data / "ShapeRetrieval_i2t.jsonl")[:3]
    for r in rows:
        r["pos_text"], r["qry_image_path"] = "a red circle", str(data / r["qry_image_path"])
    (one / "Single.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--model", str(model), "--data", str(one), "--num_negatives", "1", "--no_progress",
                 "--out", str(tmp_path / "o1"), "--no_cache"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "subset 'Single': the pool holds 1 distinct candidate(s)" in err and not (tmp_path / "o1").exists()


def test_cli_strict_and_overwrite(tiny, tmp_path, capsys):
    root, data, model = tiny
    out = tmp_path / "o"
    # a small margin with the untrained model's close scores: fewer than K -> a warning with counts,
    # or --strict's error
    base = ["--model", str(model), "--data", str(data), "--subsets", "ShapeClassification", "--num_negatives",
            "2", "--margin", "0.02", "--max_score_ratio", "none", "--no_progress",
            "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert main([*base, "--out", str(out), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "fewer than K=2 negatives after the filters (ShapeClassification:" in err and "--strict" in err
    assert not out.exists()
    assert main([*base, "--out", str(out)]) == 0
    assert "warning: rows with fewer than K=2" in capsys.readouterr().err
    first = (out / "ShapeClassification.jsonl").read_text()
    assert main([*base, "--out", str(out), "--overwrite", "--margin", "none"]) == 0
    assert (out / "ShapeClassification.jsonl").read_text() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temp folders left


def test_cli_refuses_data_the_model_cannot_embed_or_write(tmp_path, capsys):
    from vlm2vec.model import VLM2Vec
    from vlm2vec.synthetic import write_synthetic_v2_train

    train = write_synthetic_v2_train(tmp_path / "v2", rows=4)
    VLM2Vec.tiny("llava_next").save_pretrained(str(tmp_path / "llava"))
    common = ["--data", str(train), "--num_negatives", "1", "--no_progress", "--no_cache"]
    assert main(["--model", str(tmp_path / "llava"), *common, "--subsets", "VideoCaption",
                 "--out", str(tmp_path / "a")]) == 2  # fmt: skip
    assert "video" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["--model", str(tmp_path / "llava"), *common, "--subsets", "DocRetrieval",
                 "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    assert "image lists" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["--model", str(tmp_path / "llava"), *common, "--encoder", "probe",
                 "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "no frozen image features" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_mine_what_one_rank_mines(tiny, tmp_path):
    root, data, model = tiny
    args = ["--model", str(model), "--data", str(data), "--num_negatives", "2", "--rank_range", "0:6",
            "--pool", "all", "--batch_size", "4", "--no_progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "vlm2vec.mine", *args, "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for s in SUBSETS:
        assert (tmp_path / "two" / f"{s}.jsonl").read_text() == (tmp_path / "one" / f"{s}.jsonl").read_text()
    parts = [p.name for p in (tmp_path / "two.cache" / SUBSETS[0]).glob("part-*.pt")]
    assert any(p.startswith("part-r0") for p in parts) and any(p.startswith("part-r1") for p in parts)
    report = json.loads((tmp_path / "two" / "mining_report.json").read_text())
    assert {e["pool_size"] for e in report["subsets"].values()} == {
        report["subsets"][SUBSETS[0]]["pool_size"]
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, said",
    [
        (["--subsets", "ShapeClassification", "--margin", "0.02", "--max_score_ratio", "none", "--strict"],
         "nothing written (--strict)"),  # rank 0's own, after the embedding
        (["--subsets", "NoSuchSet"], "not found"),  # every rank's, before it
    ],
)  # fmt: skip
def test_two_ranks_say_an_error_once_and_both_end(tiny, tmp_path, extra, said):
    """An error on 2 ranks: one message (from rank 0), exit 2, both processes end (no hang, no abort:
    after rank 0's own error rank 1 waits for it in distributed.finish()), nothing written."""
    root, data, model = tiny
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "vlm2vec.mine", "--model", str(model), "--data", str(data),
           "--num_negatives", "2", "--no_progress", "--out", str(out), *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("python -m vlm2vec.mine: error:") == 1, proc.stderr[-3000:]
    assert said in proc.stderr and "exitcode  : 2" in proc.stderr
    assert "SIGABRT" not in proc.stderr and not out.exists()


@pytest.mark.slow
def test_zero3_two_ranks_train_on_mined_rows_with_fewer_than_k(tiny, tmp_path):
    """The mined output, rows of 0..K negatives, through the real deepspeed launcher: 2 ranks, ZeRO-3,
    GradCache chunks, --num_hard_negatives K with the default masking; the step's loss is finite."""
    root, data, model = tiny
    mined = tmp_path / "mined"
    assert main(["--model", str(model), "--data", str(data), "--num_negatives", "3", "--margin", "0.01",
                 "--max_score_ratio", "none", "--no_progress", "--out", str(mined)]) == 0  # fmt: skip
    counts = [len(r["neg_text"]) for s in SUBSETS for r in _read_jsonl(mined / f"{s}.jsonl")]
    assert min(counts) < 3 and max(counts) == 3, counts  # short and full rows
    from vlm2vec.data import TrainBatches, load_train_data

    train = load_train_data(str(mined), num_negatives=3)
    # the trainer's batches (default seed 42, size-weighted): candidates per rank at steps 0 and 1
    per_rank = [
        [
            len(TrainBatches(train, 8, weights="size", seed=42, rank=r, world_size=2)[s].cand_texts)
            for r in (0, 1)
        ]
        for s in (0, 1)
    ]
    assert any(a != b for a, b in per_rank), per_rank  # the ranks hold different candidate counts
    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "vlm2vec/train.py",
           "--ds_config", "configs/ds_zero3.json", "--model_name", "tiny:qwen2_vl",
           "--dataset_name", str(mined),
           "--num_hard_negatives", "3", "--per_device_train_batch_size", "4", "--grad_cache", "True",
           "--gc_q_chunk_size", "2", "--gc_p_chunk_size", "4", "--max_steps", "2", "--save_steps", "0",
           "--output_dir", str(out), "--disable_tqdm", "--eval_data", ""]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
