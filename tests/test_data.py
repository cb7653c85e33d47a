"""MMEB readers, step-indexed sampling, per-chunk collation and bad-input handling (vlm2vec.data)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec.data import (
    IMAGE_PLACEHOLDER,
    ChunkCollator,
    DataError,
    StepSampler,
    TrainBatches,
    find_eval_source,
    load_eval_dataset,
    load_train_data,
    read_train_file,
)
from vlm2vec.mmeb_tables import EVAL_DATASET_INFO, MMEB_EVAL_DATASETS, eval_dataset_info, eval_datasets
from vlm2vec.synthetic import write_rows

QWEN_TOKEN = "<|vision_start|><|image_pad|><|vision_end|>"
IMG_Q = f"{IMAGE_PLACEHOLDER}\nRepresent the given image with the following question: what is it?"
IMG_T = f"{IMAGE_PLACEHOLDER}\nRepresent the given image."


# ------------------------------------------------------------------------------------------ helpers


class TokenizerEncoder:
    """A real minimal `prepare(texts, images)`: a BPE tokenizer trained in-process (HF fast tokenizer),
    `<|image_1|>` expanded to one `<image>` token per 16x16 pixels, padding to the longest row of the
    call, and a ValueError naming the row when max_len would cut image tokens (the encoder's contract)."""

    def __init__(self, max_len: int = 48):
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        corpus = [
            "represent the given image with the following question what is it", "a red circle",
            "find an image that matches the given caption", "abcdefghijklmnopqrstuvwxyz 0123456789",
        ]  # fmt: skip
        tok.train_from_iterator(
            corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<unk>", "<image>"])
        )
        self.tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.max_len = max_len
        self.calls: list[int] = []  # rows per prepare call

    def prepare(self, texts: list[str], images: list | None = None) -> dict[str, torch.Tensor]:
        images = images if images is not None else [None] * len(texts)
        self.calls.append(len(texts))
        expanded = []
        for text, img in zip(texts, images):
            n = 0 if img is None else (img.width // 16) * (img.height // 16)
            expanded.append(text.replace(IMAGE_PLACEHOLDER, "<image>" * n))
        enc = self.tok(expanded, padding="longest", return_tensors="pt")
        if enc["input_ids"].shape[1] > self.max_len:
            for i, mask in enumerate(enc["attention_mask"]):
                if (enc["input_ids"][i][mask.bool()][self.max_len :] == self.image_id).any():
                    raise ValueError(f"row {i}: max_len={self.max_len} would cut its image tokens")
            enc = self.tok(
                expanded, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt"
            )
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        pix = [torch.from_numpy(np.asarray(i, dtype=np.float32)) for i in images if i is not None]
        if pix:
            out["pixel_values"] = torch.cat([p.reshape(-1, 3) for p in pix])
        return out

    def row_length(self, text: str, image) -> int:
        return int(self.prepare([text], [image])["attention_mask"].sum())


@pytest.fixture(scope="module")
def encoder() -> TokenizerEncoder:
    return TokenizerEncoder()


def _img(path: Path, color=(200, 30, 30), size=16) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path.name


def _row(q="what is this?", qi="", p="answer", pi="", nt="", ni="") -> dict:
    return {
        "qry": q,
        "qry_image_path": qi,
        "pos_text": p,
        "pos_image_path": pi,
        "neg_text": nt,
        "neg_image_path": ni,
    }


def _text_rows(prefix: str, n: int, **kw) -> list[dict]:
    return [_row(q=f"{prefix} query {i}", p=f"{prefix} target {i}", **kw) for i in range(n)]


# -------------------------------------------------------------------------------------------- tables


def test_eval_table_matches_design():
    assert len(MMEB_EVAL_DATASETS) == 36 and len(EVAL_DATASET_INFO) == 36
    assert sum(not d.ood for d in MMEB_EVAL_DATASETS) == 20 and sum(d.ood for d in MMEB_EVAL_DATASETS) == 16
    assert Counter(d.meta_task for d in MMEB_EVAL_DATASETS) == {
        "Classification": 10, "VQA": 10, "Retrieval": 12, "Grounding": 4,
    }  # fmt: skip
    ood = {d.name for d in MMEB_EVAL_DATASETS if d.ood}
    assert ood == {
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211", "ScienceQA", "VizWiz", "GQA",
        "TextVQA", "OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ", "Visual7W-Pointing", "RefCOCO",
        "RefCOCO-Matching",
    }  # fmt: skip
    assert (
        eval_dataset_info("MSCOCO").meta_task == "Grounding"
        and eval_dataset_info("MSCOCO_t2i").split == "IND"
    )
    assert [d.name for d in eval_datasets("Grounding", ood=True)] == [
        "Visual7W-Pointing",
        "RefCOCO",
        "RefCOCO-Matching",
    ]
    with pytest.raises(ValueError, match="unknown MMEB-eval dataset"):
        eval_dataset_info("ImageNet_1K")


# ------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_read_each_format(tmp_path, fmt):
    _img(tmp_path / "images" / "a.png")
    rows = [  # list-valued negatives (a column holds one type in parquet/arrow)
        _row(q=IMG_Q, qi="images/a.png", p="a cat", nt=["a dog", "a cow"], ni=["", ""]),
        _row(q="find a cat", p=IMG_T, pi="images/a.png", nt=[IMG_T], ni=["images/a.png"]),
        _row(q="plain", p="target", nt=[], ni=[]),
    ]
    write_rows(tmp_path / f"Lists.{fmt}", rows)
    single = [
        _row(q="find a cat", p=IMG_T, pi="images/a.png", nt=IMG_T, ni="images/a.png"),
        _row(q="x", p="y"),
    ]
    write_rows(tmp_path / f"Strings.{fmt}", single)  # one negative as a plain string; "" = none
    data = load_train_data(tmp_path)
    assert sorted(data.subsets) == ["Lists", "Strings"] and data.image_root == tmp_path
    ex = data.subsets["Lists"]
    assert [e.row for e in ex] == [0, 1, 2] and ex[0].source == str(tmp_path / f"Lists.{fmt}")
    assert (ex[0].query_text, ex[0].query_image, ex[0].pos_text, ex[0].pos_image) == (
        IMG_Q, "images/a.png", "a cat", None,
    )  # fmt: skip
    assert ex[0].neg_texts == ["a dog", "a cow"] and ex[0].neg_images == [None, None]
    assert ex[1].neg_texts == [IMG_T] and ex[1].neg_images == ["images/a.png"] and ex[1].query_image is None
    assert ex[2].neg_texts == [] and ex[2].neg_images == []
    strings = data.subsets["Strings"]
    assert (strings[0].neg_texts, strings[0].neg_images) == ([IMG_T], ["images/a.png"])
    assert (strings[1].neg_texts, strings[1].neg_images) == ([], [])
    assert read_train_file(tmp_path / f"Lists.{fmt}", max_rows=2) == ex[:2]


def test_folder_layout_and_split(tmp_path):
    write_rows(tmp_path / "A" / "original-00000-of-00001.parquet", _text_rows("orig", 3))
    write_rows(tmp_path / "A" / "diverse_instruction-00000-of-00001.parquet", _text_rows("div", 2))
    write_rows(tmp_path / "B.jsonl", _text_rows("b", 4))
    assert load_train_data(tmp_path, split="original").sizes() == {"A": 3, "B": 4}
    both = load_train_data(tmp_path)
    assert both.sizes() == {"A": 5, "B": 4}
    assert [e.query_text for e in both.subsets["A"]][:1] == ["div query 0"]  # sorted file order
    assert load_train_data(tmp_path, subsets=["B"]).sizes() == {"B": 4}
    with pytest.raises(DataError, match="no file of split 'test'"):
        load_train_data(tmp_path, split="test")
    with pytest.raises(ValueError, match=r"subsets \['C'\] not found"):
        load_train_data(tmp_path, subsets=["C"])
    with pytest.raises(FileNotFoundError, match="neither a local path"):
        load_train_data(tmp_path / "nothing_here")


def test_image_token_replacement(tmp_path):
    _img(tmp_path / "a.png")
    write_rows(
        tmp_path / "S.jsonl", [_row(q=IMG_Q, qi="a.png", p=IMG_T, pi="a.png", nt=[IMG_T], ni=["a.png"])]
    )
    ex = load_train_data(tmp_path, image_token=QWEN_TOKEN).subsets["S"][0]
    for text in (ex.query_text, ex.pos_text, ex.neg_texts[0]):
        assert text.startswith(QWEN_TOKEN + "\n") and IMAGE_PLACEHOLDER not in text
    kept = load_train_data(tmp_path).subsets["S"][0]
    assert kept.query_text == IMG_Q and kept.pos_text == IMG_T
    eval_row = {
        "qry_text": IMG_Q,
        "qry_img_path": "../a.png",
        "tgt_text": ["x", "y"],
        "tgt_img_path": ["", ""],
    }
    write_rows(tmp_path / "eval" / "E.jsonl", [eval_row])
    assert load_eval_dataset(tmp_path / "eval", "E", image_token="<image>")[0].query_text.startswith(
        "<image>\n"
    )


def test_caps_keep_first_valid_rows(tmp_path):
    write_rows(tmp_path / "A.jsonl", _text_rows("a", 10))
    write_rows(tmp_path / "B.jsonl", [_row(q="", p="bad"), *_text_rows("b", 6)])
    with pytest.warns(UserWarning, match="skipping bad row"):
        data = load_train_data(tmp_path, num_sample_per_subset=4, skip_bad_rows=True)
    assert data.sizes() == {"A": 4, "B": 4} and data.bad_rows.count == 1
    assert [e.query_text for e in data.subsets["B"]] == [f"b query {i}" for i in range(4)]
    assert load_train_data(tmp_path, num_sample_per_subset={"A": 2}, skip_bad_rows=True).sizes() == {
        "A": 2,
        "B": 6,
    }
    with pytest.raises(ValueError, match="num_sample_per_subset must be >= 1"):
        load_train_data(tmp_path, num_sample_per_subset=0)


# ------------------------------------------------------------------------------------------ sampling


def test_weights_set_subset_frequencies():
    sizes = {"A": 50, "B": 50, "C": 10}
    sampler = StepSampler(sizes, 16, weights={"A": 3.0, "B": 1.0}, seed=3)
    counts = Counter(s for step in range(250) for s, _ in sampler.rows(step))
    assert counts["C"] == 0
    assert abs(counts["A"] / 4000 - 0.75) < 0.03, counts
    by_size = Counter(s for step in range(250) for s, _ in StepSampler(sizes, 16, seed=3).rows(step))
    assert abs(by_size["C"] / 4000 - 10 / 110) < 0.02, by_size
    uniform = Counter(
        s for step in range(250) for s, _ in StepSampler(sizes, 16, weights="uniform").rows(step)
    )
    assert abs(uniform["C"] / 4000 - 1 / 3) < 0.03, uniform
    with pytest.raises(ValueError, match="unknown subsets"):
        StepSampler(sizes, 16, weights={"D": 1.0})


def test_epoch_covers_every_row_once():
    sampler = StepSampler({"A": 24}, 8, seed=5)
    first = [r for step in range(3) for _, r in sampler.rows(step)]
    second = [r for step in range(3, 6) for _, r in sampler.rows(step)]
    assert sorted(first) == list(range(24)) and sorted(second) == list(range(24)) and first != second


@pytest.mark.parametrize("group", [1, 4])
def test_every_epoch_is_a_permutation_across_draw_blocks(group):
    sizes = {"A": 70, "B": 30, "C": 9}
    sampler = StepSampler(sizes, 8, homogeneous_size=group, seed=7)
    sampler.block = 5  # many block boundaries (and a partial block) within the checked steps
    drawn: dict[str, list[int]] = {s: [] for s in sizes}
    for step in range(120):
        for s, r in sampler.rows(step):
            drawn[s].append(r)
    for s, rows in drawn.items():
        full = len(rows) // sizes[s] * sizes[s]
        assert full >= 2 * sizes[s], (s, len(rows))
        for e in range(0, full, sizes[s]):
            assert sorted(rows[e : e + sizes[s]]) == list(range(sizes[s])), (s, e)
        assert len(set(rows[full:])) == len(rows[full:])


def test_homogeneous_groups():
    sizes = {"A": 40, "B": 40, "C": 40}
    for step in range(20):
        rows = StepSampler(sizes, 12, homogeneous_size=4, seed=1).rows(step)
        assert all(len({s for s, _ in rows[g : g + 4]}) == 1 for g in range(0, 12, 4))
        assert len({s for s, _ in StepSampler(sizes, 12, homogeneous_size=12).rows(step)}) == 1
    mixed = [len({s for s, _ in StepSampler(sizes, 12, seed=1).rows(step)}) for step in range(20)]
    assert max(mixed) > 1
    with pytest.raises(ValueError, match="must divide"):
        StepSampler(sizes, 12, homogeneous_size=5)


def test_negatives_layout_and_targets(tmp_path):
    rows = [_row(q=f"q{i}", p=f"pos{i}", nt=[f"n{i}a", f"n{i}b", f"n{i}c"]) for i in range(6)]
    write_rows(tmp_path / "S.jsonl", rows)
    batch = TrainBatches(load_train_data(tmp_path, num_negatives=2), 6, seed=0)[0]
    assert batch.targets.tolist() == [0, 3, 6, 9, 12, 15] and len(batch.cand_texts) == 18
    for i, q in enumerate(batch.query_texts):
        n = q[1:]
        group = batch.cand_texts[3 * i : 3 * i + 3]
        assert (
            group[0] == f"pos{n}"
            and set(group[1:]) <= {f"n{n}a", f"n{n}b", f"n{n}c"}
            and len(set(group)) == 3
        )


def test_missing_negatives_error_or_sample(tmp_path):
    rows = [_row(q=f"q{i}", p=f"pos{i % 4}", nt=[f"neg{i}"] if i % 2 else "") for i in range(8)]
    write_rows(tmp_path / "S.jsonl", rows)
    with pytest.raises(DataError, match=r"S\.jsonl, row 0 .*0 hard negatives but num_negatives=1"):
        load_train_data(tmp_path, num_negatives=1, missing_negatives="error")
    data = load_train_data(tmp_path, num_negatives=2, missing_negatives="sample")
    batch = TrainBatches(data, 8, seed=2)[0]
    assert batch.targets.tolist() == [0, 3, 6, 9, 12, 15, 18, 21]
    for i, q in enumerate(batch.query_texts):
        k = int(q[1:])
        pos, *negs = batch.cand_texts[3 * i : 3 * i + 3]
        assert pos == f"pos{k % 4}"
        sampled = [n for n in negs if n != f"neg{k}"]
        assert len(sampled) == (1 if k % 2 else 2) and all(n.startswith("pos") and n != pos for n in sampled)
        assert len(set(negs)) == 2


def test_determinism_and_resume(tmp_path):
    for name, color in (("A", (200, 0, 0)), ("B", (0, 0, 200))):
        _img(tmp_path / f"{name}.png", color)
        write_rows(
            tmp_path / f"{name}.jsonl", [_row(q=IMG_Q, qi=f"{name}.png", p=f"{name} {i}") for i in range(7)]
        )
    data = load_train_data(tmp_path)

    def key(b):
        return (b.query_texts, b.cand_texts, b.subsets, [np.asarray(i).tobytes() for i in b.query_images])

    run = TrainBatches(data, 4, seed=11, num_steps=8)
    straight = [key(b) for b in run]
    assert straight == [key(b) for b in TrainBatches(data, 4, seed=11, num_steps=8)]
    assert straight != [key(b) for b in TrainBatches(data, 4, seed=12, num_steps=8)]
    assert key(run[5]) == straight[5]  # batch n is a pure function of (seed, n)
    first = TrainBatches(data, 4, seed=11, num_steps=8)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state["step"] == 3
    resumed = TrainBatches(data, 4, seed=11, num_steps=8)
    resumed.load_state_dict(state)
    assert [key(b) for b in resumed] == straight[3:]
    with pytest.raises(ValueError, match="data state was saved for"):
        TrainBatches(data, 4, seed=99).load_state_dict(state)
    halves = [TrainBatches(data, 4, seed=11, rank=r, world_size=2)[6] for r in (0, 1)]
    assert halves[0].query_texts + halves[1].query_texts == straight[6][0]


# ------------------------------------------------------------------------------------------ collator


def _mixed_batch(tmp_path, n=10, k=1):
    return TrainBatches(load_train_data(_mixed_batch_dir(tmp_path, n), num_negatives=k), n, seed=4)[0]


def _mixed_batch_dir(tmp_path, n=10) -> Path:
    """Queries/candidates of very different lengths (text-only and 32x32 images = 4 image tokens)."""
    _img(tmp_path / "big.png", size=32)
    rows = []
    for i in range(n):
        words = " ".join(["represent the given image"] * (1 + (i * 7) % 5))
        if i % 3 == 0:
            rows.append(
                _row(q=f"{IMG_Q} {words}", qi="big.png", p=f"a red circle {i}", nt=IMG_T, ni="big.png")
            )
        else:
            pos, pos_image = (IMG_T, "big.png") if i % 2 else (f"t {i}", "")
            rows.append(_row(q=f"find {i} {words}", p=pos, pi=pos_image, nt=[f"neg {i} " + words], ni=[""]))
    write_rows(tmp_path / "S.jsonl", rows)
    return tmp_path


@pytest.mark.parametrize("sort", [False, True])
def test_chunks_padded_to_their_own_longest_row(tmp_path, encoder, sort):
    batch = _mixed_batch(tmp_path)
    prepared = ChunkCollator(encoder, query_chunk_size=3, cand_chunk_size=4, sort_by_length=sort)(batch)
    assert [c["input_ids"].shape[0] for c in prepared.query_chunks] == [3, 3, 3, 1]
    assert [c["input_ids"].shape[0] for c in prepared.cand_chunks] == [4, 4, 4, 4, 4]
    for chunks, order, texts, images, size in (
        (prepared.query_chunks, prepared.query_order, batch.query_texts, batch.query_images, 3),
        (prepared.cand_chunks, prepared.cand_order, batch.cand_texts, batch.cand_images, 4),
    ):
        lengths = [encoder.row_length(texts[r], images[r]) for r in order.tolist()]
        widths = [c["input_ids"].shape[1] for c in chunks]
        assert widths == [max(lengths[s : s + size]) for s in range(0, len(lengths), size)]
        assert len(set(widths)) > 1 and min(widths) < max(lengths)  # never padded to the whole batch
        for c, start in zip(chunks, range(0, len(lengths), size)):
            assert c["attention_mask"].sum(1).tolist() == lengths[start : start + size]
    # targets point at each query's own positive, whatever the order
    for i, q in enumerate(prepared.query_order.tolist()):
        assert prepared.cand_order[prepared.targets[i]].item() == batch.targets[q].item()
    if not sort:
        assert prepared.targets.tolist() == batch.targets.tolist()
    else:
        assert sorted(prepared.query_order.tolist()) == list(range(len(batch)))


def test_dataloader_workers_build_the_same_batches(tmp_path, encoder):
    batch_fn = TrainBatches(load_train_data(_mixed_batch_dir(tmp_path), num_negatives=1), 4, seed=4)
    collator = ChunkCollator(encoder, query_chunk_size=2, cand_chunk_size=3)
    loader = torch.utils.data.DataLoader(
        batch_fn, batch_size=None, sampler=range(1, 4), collate_fn=collator, num_workers=2
    )
    for step, got in zip(range(1, 4), loader, strict=True):
        want = collator(batch_fn[step])
        assert got.targets.tolist() == want.targets.tolist()
        for a, b in zip(
            got.query_chunks + got.cand_chunks, want.query_chunks + want.cand_chunks, strict=True
        ):
            assert all(torch.equal(a[k], b[k]) for k in b)


def test_sorting_reduces_padding(tmp_path, encoder):
    batch = _mixed_batch(tmp_path, n=12)

    def padded(sort):
        p = ChunkCollator(encoder, query_chunk_size=3, cand_chunk_size=3, sort_by_length=sort)(batch)
        return sum(c["input_ids"].numel() for c in p.query_chunks + p.cand_chunks)

    assert padded(True) < padded(False)


# ---------------------------------------------------------------------------------------- bad input


def _write_case(tmp_path, case) -> Path:
    """A subset of 4 rows whose row 1 is bad in the way `case` says."""
    _img(tmp_path / "ok.png")
    rows = [_row(q=IMG_Q, qi="ok.png", p=f"target {i}") for i in range(4)]
    if case == "missing_image":
        rows[1]["qry_image_path"] = "nope.png"
    elif case == "unreadable_image":
        (tmp_path / "broken.png").write_bytes(b"not a png at all")
        rows[1]["qry_image_path"] = "broken.png"
    elif case == "empty_query":
        rows[1].update(qry="  ", qry_image_path="")
    elif case == "missing_column":
        del rows[1]["pos_text"]
    elif case == "placeholder_without_image":
        rows[1]["qry_image_path"] = ""
    elif case == "image_tokens_cut":
        _img(tmp_path / "huge.png", size=128)  # 64 image tokens > max_len 48
        rows[1]["qry_image_path"] = "huge.png"
    path = tmp_path / "S.jsonl"
    write_rows(path, rows)
    if case == "bad_json":
        lines = path.read_text().splitlines()
        lines[1] = lines[1][:-5]
        path.write_text("\n".join(lines) + "\n")
    return path


READ_TIME = ["empty_query", "missing_column", "placeholder_without_image", "bad_json"]
BATCH_TIME = ["missing_image", "unreadable_image"]


@pytest.mark.parametrize("case", READ_TIME + BATCH_TIME + ["image_tokens_cut"])
def test_bad_input_raises_naming_file_and_row(tmp_path, encoder, case):
    path = _write_case(tmp_path, case)
    where = f"{path}, row 1"
    with pytest.raises(DataError) as info:
        data = load_train_data(tmp_path)
        batch = TrainBatches(data, 4, seed=0)[0]
        ChunkCollator(encoder, query_chunk_size=2)(batch)
    assert where in str(info.value), str(info.value)
    expected = {"missing_image": "nope.png", "unreadable_image": "broken.png", "empty_query": "empty text",
                "missing_column": "missing column 'pos_text'", "placeholder_without_image": "no image path",
                "bad_json": "invalid JSON", "image_tokens_cut": "would cut its image tokens"}  # fmt: skip
    assert expected[case] in str(info.value)


@pytest.mark.parametrize("case", READ_TIME)
def test_skip_bad_rows_at_read_time_counts(tmp_path, case):
    _write_case(tmp_path, case)
    with pytest.warns(UserWarning, match="skipping bad row"):
        data = load_train_data(tmp_path, skip_bad_rows=True)
    assert data.bad_rows.count == 1 and len(data) == 3
    assert [e.row for e in data.subsets["S"]] == [0, 2, 3]
    assert "row 1" in data.bad_rows.messages[0]


@pytest.mark.parametrize("case", BATCH_TIME)
def test_skip_bad_rows_at_batch_time_counts(tmp_path, case):
    _write_case(tmp_path, case)
    data = load_train_data(tmp_path)
    with pytest.warns(UserWarning, match="skipping bad row"):
        batch = TrainBatches(data, 4, seed=0, skip_bad_rows=True)[0]
    assert data.bad_rows.count == 1 and data.bad_rows.by_kind == {"image": 1}
    assert len(batch) == 4 and len(batch.skipped) == 1 and "row 1" in batch.skipped[0]
    assert "target 1" not in batch.cand_texts and all(img is not None for img in batch.query_images)
    again = TrainBatches(data, 4, seed=0, skip_bad_rows=True)[0]  # replacement is deterministic
    assert again.query_texts == batch.query_texts and again.cand_texts == batch.cand_texts
    assert data.bad_rows.count == 1 and "(known bad)" in again.skipped[0]  # counted once, listed per batch
    early = (
        load_train_data(tmp_path, check_images=True, skip_bad_rows=True) if case == "missing_image" else None
    )
    if early is not None:
        assert early.bad_rows.count == 1 and len(early) == 3


def test_skip_rows_whose_image_tokens_would_be_cut(tmp_path, encoder):
    _write_case(tmp_path, "image_tokens_cut")
    batch = TrainBatches(load_train_data(tmp_path), 4, seed=0)[0]
    collator = ChunkCollator(encoder, query_chunk_size=2, skip_bad_rows=True)
    with pytest.warns(UserWarning, match="skipping bad row"):
        prepared = collator(batch)
    assert collator.bad_rows.count == 1 and prepared.num_queries == 3 and prepared.num_candidates == 3
    assert len(prepared.skipped) == 1 and "S.jsonl, row 1" in prepared.skipped[0]
    bad = next(i for i in range(4) if batch.sources[i].endswith("row 1"))
    good = [i for i in range(4) if i != bad]
    assert prepared.query_order.tolist() == good and prepared.cand_order.tolist() == good
    clean = ChunkCollator(encoder, query_chunk_size=2)(batch.select(good))
    for a, b in zip(
        prepared.query_chunks + prepared.cand_chunks, clean.query_chunks + clean.cand_chunks, strict=True
    ):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert prepared.targets.tolist() == [0, 1, 2]


def test_missing_column_in_parquet_and_arrow_schema(tmp_path):
    rows = _text_rows("x", 3)
    for r in rows:
        del r["neg_image_path"], r["pos_image_path"]
    for fmt in ("parquet", "arrow"):
        path = write_rows(tmp_path / fmt / f"P.{fmt}", rows)
        with pytest.raises(DataError, match=rf"P\.{fmt}, row 0: missing column 'pos_image_path'"):
            load_train_data(path)
        no_negatives = [{k: v for k, v in r.items()} | {"pos_image_path": ""} for r in rows]
        ok = write_rows(tmp_path / fmt / f"N.{fmt}", no_negatives)
        assert len(load_train_data(ok).subsets["N"]) == 3  # negatives unused: their columns may be absent
        with pytest.raises(DataError, match=rf"N\.{fmt}, row 0: missing column 'neg_image_path'"):
            load_train_data(ok, num_negatives=1)
        # skipping counts every row; a subset left with no rows is an error, not an empty subset
        with (
            pytest.warns(UserWarning, match="skipping bad row"),
            pytest.raises(DataError, match="no usable rows"),
        ):
            load_train_data(path, skip_bad_rows=True)


# --------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_eval_reader(tmp_path, fmt):
    _img(tmp_path / "imgs" / "q.png")
    rows = [
        {"qry_text": IMG_Q, "qry_img_path": "imgs/q.png", "tgt_text": ["cat", "dog", "cow"],
         "tgt_img_path": ["", "", ""]},
        {"qry_text": "find a cat", "qry_img_path": "", "tgt_text": [IMG_T, IMG_T],
         "tgt_img_path": ["imgs/q.png", "imgs/q.png"]},
    ]  # fmt: skip
    write_rows(tmp_path / f"ImageNet-1K.{fmt}", rows)
    ev = load_eval_dataset(tmp_path, "ImageNet-1K")
    assert len(ev) == 2 and ev.info is not None and ev.info.meta_task == "Classification"
    assert ev[0].cand_texts[0] == "cat" and ev[0].cand_images == [None, None, None]
    assert ev[1].query_image is None and ev[1].cand_images == ["imgs/q.png"] * 2
    assert (
        ev.query_image(0).size == (16, 16)
        and ev.cand_image(1, 1).mode == "RGB"
        and ev.cand_image(0, 0) is None
    )
    assert load_eval_dataset(tmp_path, "ImageNet-1K", max_rows=1).examples == ev.examples[:1]


def test_eval_reader_layouts_and_bad_rows(tmp_path):
    row = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ""}
    write_rows(tmp_path / "X" / "test-00000-of-00001.parquet", [row])
    assert find_eval_source(tmp_path, "X") == [tmp_path / "X" / "test-00000-of-00001.parquet"]
    assert (
        load_eval_dataset(tmp_path, "X")[0].cand_images == [None, None]
        and load_eval_dataset(tmp_path, "X").info is None
    )
    with pytest.raises(FileNotFoundError, match="no Y.jsonl"):
        load_eval_dataset(tmp_path, "Y")
    bad = [{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", "", ""]},
           {"qry_text": "", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]},
           {"qry_text": "ok", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}]  # fmt: skip
    write_rows(tmp_path / "Z.jsonl", bad)
    with pytest.raises(DataError, match=r"Z\.jsonl, row 0 \(line 1\): 2 tgt_text but 3 tgt_img_path"):
        load_eval_dataset(tmp_path, "Z")
    with pytest.warns(UserWarning):
        ev = load_eval_dataset(tmp_path, "Z", skip_bad_rows=True)
    assert ev.bad_rows.count == 2 and len(ev) == 1 and ev[0].row == 2
    assert json.loads((tmp_path / "Z.jsonl").read_text().splitlines()[2])["qry_text"] == ev[0].query_text

    # candidates are checked once per distinct (text, image): a bad one is still caught in every row
    shared = ["good", "<|image_1|> placeholder without an image"]
    rows = [{"qry_text": f"q{i}", "qry_img_path": "", "tgt_text": shared[::-1] if i % 2 else shared,
             "tgt_img_path": ""} for i in range(3)] + [
            {"qry_text": "q3", "qry_img_path": "", "tgt_text": ["good"], "tgt_img_path": ""}]  # fmt: skip
    write_rows(tmp_path / "W.jsonl", rows)
    with pytest.warns(UserWarning):
        ev = load_eval_dataset(tmp_path, "W", skip_bad_rows=True)
    assert ev.bad_rows.count == 3 and [ex.row for ex in ev] == [3]


def test_collator_with_tiny_qwen2_vl(tmp_path):
    """The same per-chunk contract through the real encoder (tiny Qwen2-VL: dynamic image tokens,
    left padding), and its max_len error re-raised with the file and row."""
    from vlm2vec.model import VLM2Vec

    model = VLM2Vec.tiny("qwen2_vl", max_len=512)
    batch = _mixed_batch(tmp_path, n=8)
    prepared = ChunkCollator(model, query_chunk_size=3, cand_chunk_size=5)(batch)
    for chunks, texts, images, size in (
        (prepared.query_chunks, batch.query_texts, batch.query_images, 3),
        (prepared.cand_chunks, batch.cand_texts, batch.cand_images, 5),
    ):
        lengths = [int(model.prepare([t], [i])["attention_mask"].sum()) for t, i in zip(texts, images)]
        widths = [c["input_ids"].shape[1] for c in chunks]
        assert widths == [max(lengths[s : s + size]) for s in range(0, len(lengths), size)]
        assert len(set(widths)) > 1
    assert prepared.targets.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    packed = ChunkCollator(model, query_chunk_size=3, packed=True)(batch)  # flash-attention varlen layout
    for chunk, start in zip(packed.query_chunks, range(0, 8, 3)):
        rows = range(start, min(start + 3, 8))
        lengths = [
            int(model.prepare([batch.query_texts[r]], [batch.query_images[r]])["attention_mask"].sum())
            for r in rows
        ]
        assert (
            chunk["input_ids"].shape == (1, sum(lengths)) and chunk["cu_seqlens"].diff().tolist() == lengths
        )
    _img(tmp_path / "huge.png", size=512)
    rows = [_row(q=IMG_Q, qi="big.png", p="x"), _row(q=IMG_Q, qi="huge.png", p="y")]
    write_rows(tmp_path / "big" / "S.jsonl", rows)
    big_batch = TrainBatches(load_train_data(tmp_path / "big", image_root=tmp_path), 2, seed=0)[0]
    model.max_len = 12  # text tokens: image rows longer than that are kept whole, text cut to 12
    chunk = ChunkCollator(model, query_chunk_size=2)(big_batch).query_chunks[0]
    tok = model.processor.tokenizer
    marks = torch.tensor([tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")])
    text = (
        (chunk["mm_token_type_ids"] == 0)
        & (chunk["attention_mask"] == 1)
        & ~torch.isin(chunk["input_ids"], marks)
    )
    assert text.sum(1).tolist() == [12, 12] and (chunk["mm_token_type_ids"] == 1).sum(1).max() > 12


# ------------------------------------------------------------------ fewer than K negatives: masking


def _short_rows_dir(tmp_path: Path, n: int = 6, k: int = 2) -> Path:
    """Row i has i % (k + 1) negatives (0, 1, .., k): what mining leaves after its filters."""
    rows = [
        _row(q=f"q{i} what is it", p=f"pos{i}", nt=[f"n{i}x{j}" for j in range(i % (k + 1))], ni="")
        for i in range(n)
    ]
    write_rows(tmp_path / "S.jsonl", rows)
    return tmp_path


def test_mask_is_the_default_and_short_rows_train_on_what_they_have(tmp_path):
    data = load_train_data(_short_rows_dir(tmp_path), num_negatives=2)
    assert data.missing_negatives == "mask" and len(data) == 6
    batch = TrainBatches(data, 6, seed=0)[0]
    sizes = batch.group_sizes()
    assert sorted(sizes) == [1, 1, 2, 2, 3, 3] and batch.cand_counts == sizes
    assert batch.targets.tolist() == batch.group_starts() == [sum(sizes[:i]) for i in range(6)]
    assert len(batch.cand_texts) == sum(sizes) == 12
    for i, q in enumerate(batch.query_texts):
        n = int(q[1 : q.index(" ")])
        group = batch.cand_texts[batch.group_starts()[i] : batch.group_starts()[i] + sizes[i]]
        assert group == [f"pos{n}"] + [f"n{n}x{j}" for j in range(n % 3)]  # never the positive twice
    # full rows keep the fixed layout (no cand_counts), as before
    full = TrainBatches(load_train_data(_short_rows_dir(tmp_path / "f"), num_negatives=0), 6, seed=0)[0]
    assert full.cand_counts == [] and full.targets.tolist() == list(range(6))


def test_mask_select_keeps_each_group(tmp_path):
    batch = TrainBatches(load_train_data(_short_rows_dir(tmp_path), num_negatives=2), 6, seed=0)[0]
    keep = [0, 2, 5]
    part = batch.select(keep)
    starts = batch.group_starts()
    assert part.cand_counts == [batch.group_sizes()[i] for i in keep]
    want = [batch.cand_texts[starts[i] : starts[i] + batch.group_sizes()[i]] for i in keep]
    assert [part.cand_texts[s : s + n] for s, n in zip(part.group_starts(), part.cand_counts)] == want
    assert part.targets.tolist() == part.group_starts()


@pytest.mark.parametrize("sort,group_size", [(False, None), (True, None), (True, 3)])
def test_collator_targets_and_orders_with_short_groups(tmp_path, encoder, sort, group_size):
    batch = TrainBatches(load_train_data(_short_rows_dir(tmp_path), num_negatives=2), 6, seed=0)[0]
    prepared = ChunkCollator(encoder, query_chunk_size=2, cand_chunk_size=3, sort_by_length=sort,
                             group_size=group_size)(batch)  # fmt: skip
    assert sorted(prepared.cand_order.tolist()) == list(range(len(batch.cand_texts)))
    for i, q in enumerate(prepared.query_order.tolist()):
        assert prepared.cand_order[prepared.targets[i]].item() == batch.targets[q].item()
    if group_size:  # task-wise batching: no candidate chunk mixes the two groups of 3 queries
        owner = [q for q, n in enumerate(batch.group_sizes()) for _ in range(n)]
        at = 0
        for chunk in prepared.cand_chunks:
            rows = prepared.cand_order[at : at + chunk["input_ids"].shape[0]].tolist()
            assert len({owner[c] // 3 for c in rows}) == 1
            at += len(rows)


def test_collator_drops_a_bad_row_from_a_short_group_batch(tmp_path, encoder):
    """skip_bad_rows with uneven groups: the bad query's whole group goes, the others keep theirs and
    cand_order still indexes the batch as given."""
    _short_rows_dir(tmp_path)
    _img(tmp_path / "huge.png", size=128)  # 64 image tokens > max_len 48: prepare rejects the row
    rows = [json.loads(line) for line in (tmp_path / "S.jsonl").read_text().splitlines()]
    rows[4]["neg_text"], rows[4]["neg_image_path"] = [IMG_T], ["huge.png"]  # its only negative is bad
    write_rows(tmp_path / "S.jsonl", rows)
    batch = TrainBatches(load_train_data(tmp_path, num_negatives=2), 6, seed=0)[0]
    bad = next(i for i in range(6) if batch.sources[i].endswith("row 4"))
    with pytest.warns(UserWarning, match="skipping bad row"):
        prepared = ChunkCollator(encoder, query_chunk_size=2, skip_bad_rows=True)(batch)
    good = [i for i in range(6) if i != bad]
    assert prepared.query_order.tolist() == good and "negative 1" in prepared.skipped[0]
    starts, sizes = batch.group_starts(), batch.group_sizes()
    assert prepared.cand_order.tolist() == [c for i in good for c in range(starts[i], starts[i] + sizes[i])]
    for i, q in enumerate(prepared.query_order.tolist()):
        assert prepared.cand_order[prepared.targets[i]].item() == starts[q]


def test_mask_rows_through_the_loss_equal_the_reference(tmp_path):
    """The fused loss on a batch with uneven groups (explicit targets) equals float64 cross-entropy over
    the candidates that exist: masked slots are simply absent."""
    from vlm2vec_kernels import contrastive_loss

    batch = TrainBatches(load_train_data(_short_rows_dir(tmp_path), num_negatives=2), 6, seed=0)[0]
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(len(batch.cand_texts), 16, generator=g), dim=-1)
    got = contrastive_loss(q, c, 0.05, targets=batch.targets)
    want = torch.nn.functional.cross_entropy((q.double() @ c.double().T) / 0.05, batch.targets)
    assert torch.allclose(got.double(), want, atol=1e-5)
