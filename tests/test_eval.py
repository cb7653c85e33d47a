"""MMEB evaluation: known answers through the whole path (files -> dedup -> embed -> cache -> score ->
outputs), resume after an interruption, bad input, and a 2-process gloo run with a real tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm2vec.data import DataError
from vlm2vec.eval import build_parser, main
from vlm2vec.eval_v1 import evaluate

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def known_answer_data(root: Path) -> Path:
    """Two datasets whose P@1 follows from `vector_of` by construction.

    Colours: image->name retrieval. Query k shows colour k; candidates are the three colour names with the
    right one first. The blue image sits halfway between the names 'red' and 'blue', so the blue query
    scores them equally: a tie (a miss for us, a hit for the reference). Expected P@1: 2/3, ties-as-hits 3/3.

    Shapes (ImageNet-1K, a real MMEB name so the table knows its meta-task): text->text with label
    sets; 1 of 2 queries right."""
    for name, rgb in COLOURS.items():
        _png(root / "img" / f"{name}.png", rgb)
    names = list(COLOURS)
    colours = []
    for name in names:
        others = [n for n in names if n != name]
        colours.append({"qry_text": "<|image_1|> name the colour", "qry_img_path": f"img/{name}.png",
                        "tgt_text": [name, *others], "tgt_img_path": ["", "", ""]})  # fmt: skip
    _write(root / "Colours.jsonl", colours)
    no_images = {"qry_img_path": "", "tgt_img_path": ["", ""]}
    _write(root / "ImageNet-1K.jsonl", [
        {"qry_text": "a round thing", "tgt_text": ["circle", "square"], **no_images},
        {"qry_text": "a boxy thing", "tgt_text": ["triangle", "square"], **no_images},
    ])  # fmt: skip
    (root / "datasets.json").write_text(json.dumps({"Colours": {"meta_task": "Retrieval", "ood": True}}))
    return root


IMAGE_VECTORS = {"red": [1.0, 0, 0, 0], "green": [0, 1.0, 0, 0], "blue": [0.6, 0, 0, 0.6]}
VECTORS = {
    "red": [1.0, 0, 0, 0], "green": [0, 1.0, 0, 0], "blue": [0, 0, 0, 1.0],
    "circle": [0, 0, 1.0, 0], "square": [0, 0, 0, 1.0], "triangle": [0, 0, 0.9, 0.1],
    "a round thing": [0, 0, 1.0, 0], "a boxy thing": [0, 0, 0.2, 1.0],
}  # fmt: skip


class KnownEncoder:
    """Embeds by a fixed table (images by their colour) and records every input it is asked for."""

    def __init__(self, fail_after: int | None = None):
        self.seen: list[tuple[str, tuple | None]] = []
        self.fail_after = fail_after

    def __call__(self, texts, images):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        rows = []
        for text, image in zip(texts, images):
            colour = image.getpixel((0, 0)) if image is not None else None
            self.seen.append((text, colour))
            if image is not None:
                name = next(n for n, c in COLOURS.items() if c == colour)
                rows.append(IMAGE_VECTORS[name])
            else:
                rows.append(VECTORS[text])
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


def test_known_answers_dedup_outputs_and_table(tmp_path):
    data = known_answer_data(tmp_path / "data")
    enc = KnownEncoder()
    scores = evaluate(
        enc, str(data), out_dir=tmp_path / "out", fingerprint="known", batch_size=2, show_progress=False
    )
    colours, shapes = scores["datasets"]["Colours"], scores["datasets"]["ImageNet-1K"]
    assert colours["p_at_1"] == pytest.approx(2 / 3) and colours["p_at_1_ties_as_hits"] == 1.0
    assert colours["n_ties_at_top"] == 1 and colours["n_queries"] == 3 and colours["n_candidates_max"] == 3
    assert shapes["p_at_1"] == pytest.approx(1 / 2) and shapes["meta_task"] == "Classification"
    # every distinct (text, image) input embedded exactly once per dataset: 3 queries + 3 names, 2 + 3
    assert len(enc.seen) == 6 + 5
    assert colours["n_distinct_inputs"] == 6 and shapes["n_distinct_inputs"] == 5
    agg = scores["aggregate"]
    assert agg["Overall"]["p_at_1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert agg["Overall"]["p_at_1_ties_as_hits"] == pytest.approx((1 + 1 / 2) / 2)
    assert agg["Retrieval"]["n_datasets"] == 1 and agg["OOD"]["p_at_1"] == pytest.approx(2 / 3)
    assert agg["IND"]["p_at_1"] == pytest.approx(1 / 2)
    on_disk = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert on_disk["datasets"]["Colours"]["p_at_1"] == pytest.approx(2 / 3)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| Model | Classification | VQA | Retrieval | Grounding | IND | OOD | Overall |" in table
    assert "| this model | 50.0 | - | 66.7 | - | 50.0 | 66.7 | 58.3 |" in table
    assert "ties counted as hits" in table and "(paper)" in table


def test_cache_resume_after_interruption(tmp_path):
    data = known_answer_data(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # dies after 4 inputs, i.e. inside the first dataset
        evaluate(KnownEncoder(fail_after=4), str(data), out_dir=out, fingerprint="m1", batch_size=2,
                 show_progress=False)  # fmt: skip
    parts = list((out / "embeddings" / "Colours").glob("part-*.pt"))
    assert parts, "the finished batches must be on disk"
    resumed = KnownEncoder()
    scores = evaluate(resumed, str(data), out_dir=out, fingerprint="m1", batch_size=2, show_progress=False)
    assert len(resumed.seen) == 11 - 4  # only what the interrupted run had not finished
    assert scores["datasets"]["Colours"]["p_at_1"] == pytest.approx(2 / 3)
    again = KnownEncoder()
    evaluate(again, str(data), out_dir=out, fingerprint="m1", batch_size=2, show_progress=False)
    assert again.seen == []  # everything cached
    other_model = KnownEncoder()
    with pytest.warns(UserWarning, match="another model"):
        evaluate(other_model, str(data), out_dir=out, fingerprint="m2", batch_size=2, show_progress=False)
    assert len(other_model.seen) == 11  # a different model never reuses embeddings
    no_cache = KnownEncoder()
    evaluate(no_cache, str(data), out_dir=tmp_path / "out2", use_cache=False, show_progress=False)
    assert len(no_cache.seen) == 11 and not (tmp_path / "out2" / "embeddings").exists()


def test_bad_input_names_dataset_and_row(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    _png(root / "a.png", (1, 2, 3))
    ok = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["x", "y"], "tgt_img_path": ["", ""]}
    _write(root / "Ragged.jsonl", [ok, ok, {**ok, "tgt_text": ["x", "y", "z"], "tgt_img_path": ["", "", ""]}])
    with pytest.raises(ValueError, match=r"dataset 'Ragged', row 2 .*3 candidates, but row 0 has 2"):
        evaluate(KnownEncoder(), str(root), ["Ragged"], show_progress=False)
    scores = evaluate(lambda t, i: torch.ones(len(t), 2), str(root), ["Ragged"], allow_ragged=True,
                      show_progress=False)  # fmt: skip
    assert scores["datasets"]["Ragged"]["p_at_1"] == 0.0  # all ties: no hits
    _write(
        root / "NoImage.jsonl",
        [ok, {**ok, "tgt_text": ["<|image_1|> x", "y"], "tgt_img_path": ["gone.png", ""]}],
    )
    with pytest.raises(
        ValueError, match=r"dataset 'NoImage', row 1 .*candidate 0 image not found: .*gone.png"
    ):
        evaluate(KnownEncoder(), str(root), ["NoImage"], show_progress=False)
    _write(root / "Empty.jsonl", [ok, {**ok, "tgt_text": [], "tgt_img_path": []}])
    with pytest.raises(DataError, match=r"dataset 'Empty'.*row 1.*no candidates"):
        evaluate(KnownEncoder(), str(root), ["Empty"], show_progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate(KnownEncoder(), str(root), ["Missing"], show_progress=False)


def test_help_lists_every_option():
    text = build_parser().format_help()
    flags = ["--model", "--data", "--out", "--datasets", "--image-root", "--batch-size", "--max-rows",
             "--cache-dir", "--no-cache", "--allow-ragged-candidates", "--dtype", "--device", "--pooling",
             "--max-len", "--resolution", "--attn-implementation", "--label", "--no-progress"]  # fmt: skip
    for flag in flags:
        assert flag in text


@pytest.mark.slow
def test_cli_two_gloo_processes_match_one_process(tmp_path):
    """A real tiny Qwen2-VL saved to disk, evaluated by torchrun with 2 gloo ranks (each embeds half) and
    in-process by main(); the scores agree, and only rank 0 writes."""
    from vlm2vec.model import VLM2Vec

    data = known_answer_data(tmp_path / "data")
    model_dir = tmp_path / "model"
    VLM2Vec.tiny("qwen2_vl").save_pretrained(str(model_dir))
    common = ["--model", str(model_dir), "--data", str(data), "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "vlm2vec.eval", *common, "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "scores.json").read_text())
    one = json.loads((tmp_path / "one" / "scores.json").read_text())
    for name in ("Colours", "ImageNet-1K"):
        for key in ("p_at_1", "p_at_1_ties_as_hits", "mrr", "n_distinct_inputs"):
            assert two["datasets"][name][key] == pytest.approx(one["datasets"][name][key]), (name, key)
    parts = sorted(p.name for p in (tmp_path / "two" / "embeddings" / "Colours").glob("part-*.pt"))
    assert any(p.startswith("part-r0") for p in parts) and any(p.startswith("part-r1") for p in parts)
