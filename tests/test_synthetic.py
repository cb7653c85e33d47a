"""The synthetic MMEB generator: deterministic files, readable by the readers, texts that describe
the drawings (so there is something to learn), and its CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm2vec.data import TrainBatches, load_eval_dataset, load_train_data
from vlm2vec.synthetic import COLORS, EVAL_DATASETS, SHAPES, TRAIN_SUBSETS, main, write_synthetic_mmeb


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_synthetic_mmeb(tmp_path / "a", rows=6, image_size=24, seed=1)
    write_synthetic_mmeb(tmp_path / "b", rows=6, image_size=24, seed=1)
    write_synthetic_mmeb(tmp_path / "c", rows=6, image_size=24, seed=2)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb and len(fa) > 40
    assert fa.keys() == fc.keys() and fa != fc
    assert a.train_subsets == TRAIN_SUBSETS and a.eval_datasets == EVAL_DATASETS


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_readers_accept_every_format(tmp_path, fmt):
    made = write_synthetic_mmeb(tmp_path, rows=5, eval_rows=3, num_candidates=4, image_size=24, fmt=fmt)
    data = load_train_data(made.train_dir, num_negatives=1, missing_negatives="sample")
    assert data.sizes() == {s: 5 for s in TRAIN_SUBSETS} and data.bad_rows.count == 0
    batch = TrainBatches(data, 8, seed=0)[0]
    assert len(batch.cand_texts) == 16 and all(i is None or i.size == (24, 24) for i in batch.query_images)
    for name in EVAL_DATASETS:
        ev = load_eval_dataset(made.eval_dir, name, check_images=True)
        assert len(ev) == 3 and all(len(e.cand_texts) == 4 for e in ev.examples)


def _dominant_colour(img: Image.Image) -> np.ndarray:
    px = np.asarray(img, dtype=np.int64).reshape(-1, 3)
    shape = px[px.min(axis=1) < 215]  # the light ground is >= 225 in every channel
    colours, counts = np.unique(shape, axis=0, return_counts=True)
    return colours[counts.argmax()], len(shape) / len(px)


def test_texts_describe_the_drawings(tmp_path):
    made = write_synthetic_mmeb(tmp_path, rows=24, eval_rows=8, image_size=48, seed=3)
    data = load_train_data(made.train_dir)
    for ex in data.subsets["ShapeClassification"]:
        colour, shape = ex.pos_text.split()
        assert colour in COLORS and shape in SHAPES
        assert ex.neg_texts[0] != ex.pos_text and ex.neg_texts[1] != ex.pos_text
        drawn, area = _dominant_colour(Image.open(made.train_dir / ex.query_image).convert("RGB"))
        assert tuple(drawn) == COLORS[colour]
        if shape == "square":
            assert area > 0.18
    ev = load_eval_dataset(made.eval_dir, "ShapeRetrieval_t2i")
    for i, ex in enumerate(ev.examples):  # candidate 0 shows the colour the query names
        colour = ex.query_text.split("caption: a ")[1].split()[0]
        assert tuple(_dominant_colour(ev.cand_image(i, 0))[0]) == COLORS[colour]
    vqa = load_eval_dataset(made.eval_dir, "ShapeVQA")
    for i, ex in enumerate(vqa.examples):
        assert tuple(_dominant_colour(vqa.query_image(i))[0]) == COLORS[ex.cand_texts[0]]


def test_cli(tmp_path):
    main(["--out", str(tmp_path / "x"), "--rows", "3", "--format", "parquet", "--image-size", "16"])
    assert sorted(p.name for p in (tmp_path / "x" / "train").glob("*.parquet")) == sorted(
        f"{s}.parquet" for s in TRAIN_SUBSETS
    )
    done = subprocess.run(
        [sys.executable, "-m", "vlm2vec.synthetic", "--out", str(tmp_path / "y"), "--rows", "2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "ShapeVQA" in done.stdout and (tmp_path / "y" / "eval" / "ShapeVQA.jsonl").is_file()
    with pytest.raises(ValueError, match="num_candidates"):
        write_synthetic_mmeb(tmp_path / "z", rows=2, num_candidates=1)
