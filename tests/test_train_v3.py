"""The v3 loss options in the trainer: item ids from the collator, --positives, --matryoshka_dims and
--false_negative_margin through `train.step_loss_function` + GradCache's `contrastive_step` on a real tiny
Qwen2-VL, on one process and on two (gloo), against a float64 reference written naively here (loops
over rows, full similarity matrices, the global batch gathered by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from vlm2vec.data import ChunkCollator, ContrastiveBatch
from vlm2vec.data.item_ids import item_id, item_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
SPAWN_TIMEOUT_S = 600
REPRESENT = "<|image_1|> Represent the given image."


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _image(color: str) -> Image.Image:
    return Image.new("RGB", (56, 56), color)  # a new object each call: equal pixels, not the same object


# ------------------------------------------------------------------------------------------ reference
def reference_loss(
    q, c, targets, ids, tau, positives="none", margin=None, dims=None, symmetric=False
) -> float:
    """float64 InfoNCE of the global batch, as issue 24 defines it, one row and one prefix at a time.
    `symmetric`: also each positive against every query (its copies' queries are its positives), the
    two directions averaged per row."""
    q, c = q.double(), c.double()
    total = 0.0
    for d in dims or [q.shape[1]]:
        qd, cd = q[:, :d], c[:, :d]
        if dims:  # each prefix re-normalised (the full vectors come normalised from the model)
            qd, cd = F.normalize(qd, dim=-1), F.normalize(cd, dim=-1)
        rows = _rows(qd @ cd.T, targets.tolist(), ids.tolist(), tau, positives, margin)
        if symmetric:
            t = targets.tolist()
            rev = _rows(cd[t] @ qd.T, list(range(len(t))), [ids[j] for j in t], tau, positives, margin)
            rows = [(a + b) / 2 for a, b in zip(rows, rev)]
        total += float(torch.stack(rows).mean())
    return total


def _rows(s, targets, ids, tau, positives, margin) -> list:
    """Per-row losses of similarities s [rows, columns]; `ids` of the columns."""
    rows = []
    for i, t in enumerate(targets):
        same = [j for j in range(s.shape[1]) if positives != "none" and ids[j] == ids[t]] or [t]
        neg = [j for j in range(s.shape[1]) if j not in same]
        if margin is not None:
            neg = [j for j in neg if not s[i, j] > s[i, t] + margin]
        neg_l = s[i, neg] / tau
        if positives in ("none", "mask"):
            rows.append(-s[i, t] / tau + torch.logsumexp(torch.cat([s[i, [t]] / tau, neg_l]), 0))
        elif positives == "any":
            pos_l = s[i, same] / tau
            rows.append(-torch.logsumexp(pos_l, 0) + torch.logsumexp(torch.cat([pos_l, neg_l]), 0))
        else:  # each
            terms = [-s[i, p] / tau + torch.logsumexp(torch.cat([s[i, [p]] / tau, neg_l]), 0) for p in same]
            rows.append(torch.stack(terms).mean())
    return rows


# -------------------------------------------------------------------------------------------- item ids
def test_item_ids_follow_the_content():
    red, red2, green = _image("red"), _image("red"), _image("green")
    assert item_id("a red square") == item_id("a red square")
    assert item_id(REPRESENT, red) == item_id(REPRESENT, red2)  # equal pixels, other objects
    different = [
        item_id("a red square"),
        item_id("a red square "),  # the model sees the space: another input
        item_id("a red square", red),  # text alone vs text + image
        item_id(REPRESENT, green),
        item_id(REPRESENT, [red, green]),  # two pages
        item_id(REPRESENT, [red, red]),
        item_id(REPRESENT, None, [red]),  # one video frame vs one image
        item_id("", red),
        item_id(REPRESENT, red.resize((28, 28))),
    ]
    assert len(set(different)) == len(different) and item_id(REPRESENT, red) not in different
    ids = item_ids(["x", "y", "x"], [None, None, None])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1]
    with pytest.raises(ValueError, match="2 texts, 1 images"):
        item_ids(["x", "y"], [None])


def _batch(rows: list[tuple], k: int = 1) -> ContrastiveBatch:
    """rows: (query text, query image, [(cand text, cand image) x (1 + k)])."""
    cands = [c for _, _, cs in rows for c in cs]
    return ContrastiveBatch(
        query_texts=[r[0] for r in rows], query_images=[r[1] for r in rows],
        cand_texts=[t for t, _ in cands], cand_images=[i for _, i in cands],
        targets=torch.arange(len(rows)) * (k + 1), subsets=["s"] * len(rows), num_negatives=k,
        sources=[f"row {i}" for i in range(len(rows))],
    )  # fmt: skip


def rank_rows(rank: int) -> list[tuple]:
    """Each rank's 3 queries, a positive and a hard negative each. Copies of a positive: within the rank
    (in another GradCache chunk) and on the other rank, as a positive and as a hard negative."""
    if rank == 0:
        return [
            (
                "<|image_1|> what is shown here",
                _image("red"),
                [("a red square", None), ("a blue square", None)],
            ),
            ("find the green one", None, [(REPRESENT, _image("green")), ("a red square", None)]),
            ("caption: yellow", None, [("a yellow thing", None), (REPRESENT, _image("red"))]),
        ]
    return [
        ("another question about red", None, [("a red square", None), ("a purple ring", None)]),
        ("<|image_1|> the green picture", _image("yellow"), [(REPRESENT, _image("green")), ("blue", None)]),
        ("something purple", None, [("a purple ring", None), ("a yellow thing", None)]),
    ]


@pytest.fixture(scope="module")
def tiny():
    from vlm2vec.model import VLM2Vec

    torch.manual_seed(0)
    return VLM2Vec.tiny("qwen2_vl").eval()


def test_collated_ids_are_invariant_to_chunking_and_order(tiny):
    batch = _batch(rank_rows(0) + rank_rows(1))
    expected = item_ids(batch.cand_texts, batch.cand_images)
    seen = []
    for size, sort in ((1, False), (2, True), (3, True), (12, False)):
        prepared = ChunkCollator(tiny, query_chunk_size=size, sort_by_length=sort)(batch)
        ids = prepared.candidate_ids
        assert ids.dtype == torch.int64 and ids.shape == (12,)
        assert torch.equal(ids, expected[prepared.cand_order])  # ids follow the prepared order
        back = torch.empty_like(ids)
        back[prepared.cand_order] = ids
        seen.append(back)
    assert all(torch.equal(s, seen[0]) for s in seen)
    # the copies: "a red square" x3, the green picture x2, "a yellow thing" x2, "a purple ring" x2
    assert len(set(expected.tolist())) == 12 - 2 - 1 - 1 - 1


# ------------------------------------------------------------------------------- one process: options
def _config(*args: str):
    from vlm2vec.config_parse import load_config

    return load_config(["--model_name", "tiny:qwen2_vl", "--temperature", "0.05", *args])


def _loss_and_embeddings(model, prepared, config, group=None):
    """The trainer's loss of a step (real GradCache step, backward included) and the embeddings it saw."""
    from vlm2vec import train
    from vlm2vec.gradcache import contrastive_step, encode_chunks

    model.zero_grad(set_to_none=True)
    loss_fn = train.step_loss_function(config, prepared, group)
    loss = contrastive_step(model, prepared.query_chunks, prepared.cand_chunks, loss_fn, grad_cache=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        q = encode_chunks(model, prepared.query_chunks, grad_cache=False)
        c = encode_chunks(model, prepared.cand_chunks, grad_cache=False)
    return float(loss.detach()), q, c


def test_matryoshka_and_margin_through_a_train_step(tiny):
    prepared = ChunkCollator(tiny, query_chunk_size=2, sort_by_length=True)(
        _batch(rank_rows(0) + rank_rows(1))
    )
    ids, t = prepared.candidate_ids, prepared.targets
    losses = {}
    for name, args in {
        "none": ["--positives", "none"],
        "mask": [],
        "any": ["--positives", "any"],
        "each": ["--positives", "each"],
        "dims": ["--matryoshka_dims", "8,21,64"],
        "dims-no-D": ["--matryoshka_dims", "5,33", "--positives", "any"],
        "symmetric": ["--symmetric_loss", "true"],
        "symmetric-dims-each": [
            "--symmetric_loss",
            "true",
            "--matryoshka_dims",
            "8,64",
            "--positives",
            "each",
        ],
    }.items():
        config = _config(*args)
        loss, q, c = _loss_and_embeddings(tiny, prepared, config)
        dims, symmetric = config.matryoshka_dims, config.symmetric_loss
        ref = reference_loss(q, c, t, ids, 0.05, config.positives, None, dims, symmetric)
        assert loss == pytest.approx(ref, rel=1e-5, abs=1e-5), name
        losses[name] = loss
    assert abs(losses["mask"] - losses["none"]) > 1e-3  # the copies were negatives before
    # copies of an item embed identically (eval mode), so one term per copy is the masked loss
    assert losses["each"] == pytest.approx(losses["mask"], rel=1e-6)
    assert losses["any"] < losses["mask"] - 1e-3
    # the margin: halfway through the spread of (non-target - target) similarities, so some drop out
    s = q.double() @ c.double().T
    gaps = (s - s.gather(1, t[:, None])).flatten()
    margin = float(gaps[gaps != 0].median())
    config = _config(f"--false_negative_margin={margin}")
    loss, q, c = _loss_and_embeddings(tiny, prepared, config)
    ref = reference_loss(q, c, t, ids, 0.05, "mask", margin)
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert abs(loss - losses["mask"]) > 1e-3


def test_too_large_matryoshka_dim_is_refused(tiny):
    from vlm2vec.build import check_fit
    from vlm2vec.errors import ConfigError

    check_fit(_config("--matryoshka_dims", "16,64"), tiny)  # the full size may be listed
    with pytest.raises(ConfigError, match=r"--matryoshka_dims \[16, 65\]: 65 is more than the model's "):
        check_fit(_config("--matryoshka_dims", "16,65"), tiny)


# ---------------------------------------------------------------------------------- two processes
def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from vlm2vec.model import VLM2Vec

        torch.manual_seed(0)  # the same weights on both ranks
        model = VLM2Vec.tiny("qwen2_vl").eval()
        prepared = ChunkCollator(model, query_chunk_size=2, sort_by_length=True)(_batch(rank_rows(rank)))
        assert len(prepared.cand_chunks) == 3
        out = {"ids": prepared.candidate_ids, "targets": prepared.targets}
        for positives in ("mask", "none", "each", "mask-symmetric"):  # the default run: mask + symmetric
            mode, symmetric = positives.split("-")[0], str(positives.endswith("symmetric"))
            config = _config(
                "--positives", mode, "--false_negative_margin", "0.5", "--symmetric_loss", symmetric
            )
            loss, q, c = _loss_and_embeddings(model, prepared, config, dist.group.WORLD)
            out[positives] = loss
        out["q"], out["c"] = q, c
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_duplicates_across_chunks_and_ranks_leave_the_denominator(tmp_path):
    ctx = mp.start_processes(
        _two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False,
        start_method="spawn",
    )  # fmt: skip
    while not ctx.join(timeout=SPAWN_TIMEOUT_S):
        pass
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    q = torch.cat([p["q"] for p in parts])
    c = torch.cat([p["c"] for p in parts])
    ids = torch.cat([p["ids"] for p in parts])
    targets = torch.cat([parts[0]["targets"], parts[1]["targets"] + len(parts[0]["c"])])
    # the same item has the same id on both ranks: 12 candidates, 7 distinct items
    assert len(set(ids.tolist())) == 7
    assert set(parts[0]["ids"].tolist()) & set(parts[1]["ids"].tolist())
    for positives in ("mask", "none", "each", "mask-symmetric"):
        mean_over_ranks = sum(p[positives] for p in parts) / WORLD  # the group convention: the global loss
        mode, symmetric = positives.split("-")[0], positives.endswith("symmetric")
        ref = reference_loss(q, c, targets, ids, 0.05, mode, 0.5, symmetric=symmetric)
        assert mean_over_ranks == pytest.approx(ref, rel=1e-5, abs=1e-5), positives
    assert abs(parts[0]["mask"] + parts[1]["mask"] - parts[0]["none"] - parts[1]["none"]) > 1e-3


# ------------------------------------------------------------------------------ the entry point
def test_train_cli_records_matryoshka_dims(tmp_path):
    from vlm2vec.synthetic import write_synthetic_mmeb

    data = write_synthetic_mmeb(tmp_path / "data", rows=4, image_size=32, seed=1).train_dir
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "kernels")]),
    }
    base = [sys.executable, "vlm2vec/train.py", "--model_name", "tiny:qwen2_vl", "--dataset_name", str(data),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--false_negative_margin", "0.3",
            "--report_to", "none", "--save_steps", "0", "--disable_tqdm", "true"]  # fmt: skip

    def run(dims: str, where: str) -> subprocess.CompletedProcess:
        cmd = [*base, "--matryoshka_dims", dims, "--output_dir", str(tmp_path / where)]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    proc = run("16,32", "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "vlm2vec.json").read_text())["matryoshka_dims"] == [16, 32]
    from vlm2vec.model import VLM2Vec

    assert VLM2Vec.from_pretrained(str(tmp_path / "run")).matryoshka_dims == [16, 32]
    proc = run("16,128", "bad")
    assert proc.returncode == 2 and "128 is more than the model's embedding size 64" in proc.stderr
