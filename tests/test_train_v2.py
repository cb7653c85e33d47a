"""Training on MMEB-V2-style rows: a tiny Qwen2-VL trains GradCache steps on mixed image + video +
document batches under `deepspeed --num_gpus 2` with ZeRO-2, chunks sized by a token budget."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mixed_rows_are_read_and_batched(tmp_path) -> None:
    from vlm2vec.data import DataError, TrainBatches, load_train_data
    from vlm2vec.synthetic import write_synthetic_v2_train

    train = write_synthetic_v2_train(tmp_path, rows=4)
    data = load_train_data(train, check_images=True)
    assert data.sizes() == {"DocRetrieval": 4, "ShapeRetrieval_i2t": 4, "VideoCaption": 4}
    docs = data.subsets["DocRetrieval"]
    assert docs[1].pos_image == ("pages/doc1_p0.png", "pages/doc1_p1.png")  # two pages: a tuple
    assert data.subsets["VideoCaption"][1].query_video == "videos/clip1.mp4"
    batch = TrainBatches(data, 12, seed=0, weights="uniform")[0]
    kinds = {s: [] for s in data.subsets}
    for s, img, vid in zip(batch.subsets, batch.query_images, batch.videos("query")):
        kinds[s].append((type(img).__name__, None if vid is None else len(vid)))
    assert all(k == ("NoneType", 4) for k in kinds["VideoCaption"])
    assert all(k == ("Image", None) for k in kinds["ShapeRetrieval_i2t"])
    # a missing video names its file and row when loaded
    (train / "VideoCaption.jsonl").write_text(
        json.dumps(
            dict(
                qry="<|video_1|> x",
                qry_image_path="",
                qry_video_path="videos/none",
                pos_text="y",
                pos_image_path="",
                neg_text="",
                neg_image_path="",
            )
        )
        + "\n"  # fmt: skip
    )
    broken = load_train_data(train, subsets=["VideoCaption"])
    with pytest.raises(
        DataError, match=r"VideoCaption.jsonl, row 0 qry_video_path: video not found.*videos/none"
    ):
        TrainBatches(broken, 1, seed=0)[0]
    with pytest.raises(DataError, match="has a video but 0 '<|video_1|>'"):
        (train / "Bad.jsonl").write_text(
            json.dumps(
                dict(
                    qry="x",
                    qry_image_path="",
                    qry_video_path="videos/clip0",
                    pos_text="y",
                    pos_image_path="",
                    neg_text="",
                    neg_image_path="",
                )
            )
            + "\n"  # fmt: skip
        )
        load_train_data(train, subsets=["Bad"])


def _chunk_counts(train, budget: int, steps: int) -> list[list[tuple[int, int]]]:
    """(query, candidate) GradCache chunk counts per step and rank, as the trainer collates them."""
    from vlm2vec.config_parse import load_config
    from vlm2vec.model import VLM2Vec
    from vlm2vec.train_data import load_data, make_batches

    argv = ["--model_name", "tiny:qwen2_vl", "--dataset_name", str(train), "--max_steps", str(steps),
            "--per_device_train_batch_size", "3", "--gc_max_visual_tokens", str(budget),
            "--subset_weights", "uniform"]  # fmt: skip
    config = load_config(argv)
    model, data = VLM2Vec.tiny("qwen2_vl"), load_data(config)
    counts = []
    for step in range(steps):
        per_rank = []
        for rank in (0, 1):
            batches, collate, _ = make_batches(config, data, model, rank, 2)
            prepared = collate(batches[step])
            per_rank.append((len(prepared.query_chunks), len(prepared.cand_chunks)))
        counts.append(per_rank)
    return counts


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_train_on_image_video_document_batches(tmp_path, stage) -> None:
    """ZeRO-2, and ZeRO-3 (every parameter partitioned) where the ranks' rows give them different
    numbers of token-budget chunks and different visual inputs in the same step (checked first):
    `train.align_processes` must make both run the same forward passes, or the collectives diverge."""
    import torch

    from vlm2vec.data import TrainBatches, load_train_data
    from vlm2vec.model import VLM2Vec
    from vlm2vec.synthetic import write_synthetic_v2_train

    train = write_synthetic_v2_train(tmp_path / "data", rows=6)
    ds_config = os.path.join(REPO, "configs", f"ds_zero{stage}.json")
    if stage == 3:
        counts = _chunk_counts(train, 60, 2)
        assert any(c[0] != c[1] for c in counts), f"ranks never differ in chunk counts: {counts}"
        with open(ds_config) as f:
            ds = json.load(f)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        ds_config = str(tmp_path / "ds_zero3.json")
        with open(ds_config, "w") as f:
            json.dump(ds, f)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "vlm2vec/train.py",
        "--ds_config", ds_config, "--output_dir", str(out), "--model_name", "tiny:qwen2_vl",
        "--dataset_name", str(train), "--max_steps", "2", "--per_device_train_batch_size", "3",
        "--gc_max_visual_tokens", "60", "--subset_weights", "uniform", "--disable_tqdm",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 for r in log)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["world_size"] == 2 and saved["deepspeed"]["zero_optimization"]["stage"] == stage
    assert saved["options"]["gc_max_visual_tokens"] == 60
    # step 1's global batch (a pure function of seed and step) held image, video and document rows
    rows = TrainBatches(load_train_data(train), 6, seed=saved["options"]["seed"], weights="uniform")[0]
    assert {"ShapeRetrieval_i2t", "VideoCaption", "DocRetrieval"} <= set(rows.subsets)
    model = VLM2Vec.from_pretrained(str(out))
    frames = [f for f in sorted((train / "videos" / "clip0").iterdir())]
    emb = model.encode(
        ["<|video_1|> Describe the video."], videos=[[str(f) for f in frames]], show_progress=False
    )
    assert emb.shape[0] == 1 and torch.isfinite(emb).all()


def test_weighted_sources_and_task_wise_chunks(tmp_path) -> None:
    from collections import Counter

    from vlm2vec.data import ChunkCollator, TrainBatches, load_train_mix, parse_sources
    from vlm2vec.model import VLM2Vec
    from vlm2vec.synthetic import write_synthetic_mmeb, write_synthetic_v2_train

    assert parse_sources("a=0.7, hub/name=0.3,b") == [("a", 0.7), ("hub/name", 0.3), ("b", None)]
    with pytest.raises(ValueError, match="must be a number"):
        parse_sources("a=x")
    images = write_synthetic_mmeb(tmp_path / "img", rows=4, image_size=32).train_dir
    mixed = write_synthetic_v2_train(tmp_path / "v2", rows=4)
    data = load_train_mix(f"{images}=0.25,{mixed}=0.75", weights="size")
    assert sum(data.weights.values()) == pytest.approx(1.0)
    assert data.weights["0:train/ShapeVQA"] == pytest.approx(0.25 / 4)  # 4 equal subsets share 0.25
    assert "1:train/VideoCaption" in data.subsets  # both folders are called train: numbered
    video = "1:train/VideoCaption"
    batches = TrainBatches(data, 6, seed=3, weights=data.weights, homogeneous_size=3)
    groups = [batches.sampler.rows(step)[k][0] for step in range(200) for k in (0, 3)]
    drawn = Counter(g.startswith("1:") for g in groups)
    assert abs(drawn[True] / sum(drawn.values()) - 0.75) < 0.06  # groups drawn by source weight
    assert (
        batches[5].subsets
        == TrainBatches(data, 6, seed=3, weights=data.weights, homogeneous_size=3)[5].subsets
    )
    step = next(s for s in range(50) if video in batches[s].subsets and len(set(batches[s].subsets)) == 2)
    batch = batches[step]
    assert batch.subsets[:3] == [batch.subsets[0]] * 3 and batch.subsets[3:] == [batch.subsets[3]] * 3
    model = VLM2Vec.tiny("qwen2_vl")
    prepared = ChunkCollator(
        model, query_chunk_size=None, sort_by_length=True, max_tokens=10_000, group_size=3
    )(batch)
    assert len(prepared.query_chunks) == 2  # one chunk per group even though one chunk would fit all
    assert sorted(prepared.query_order[:3].tolist()) == [0, 1, 2]


def test_num_frames_of_training_videos(tmp_path) -> None:
    from vlm2vec.config_parse import load_config
    from vlm2vec.data import TrainBatches, load_train_data
    from vlm2vec.errors import ConfigError
    from vlm2vec.synthetic import write_synthetic_v2_train

    train = write_synthetic_v2_train(tmp_path, rows=2, frames=5)
    data = load_train_data(train, subsets=["VideoCaption"], num_frames=2)
    batch = TrainBatches(data, 2, seed=0)[0]
    assert [len(v) for v in batch.query_videos] == [2, 2]
    with pytest.raises(ConfigError, match="--num_frames must be >= 1"):
        load_config(["--num_frames", "0", "--dataset_name", str(train)])
