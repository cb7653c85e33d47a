"""Small synthetic MMEB-format data for tests and demos: coloured shapes drawn with Pillow, whose
texts name what is drawn ("a red circle"), so a model can actually learn the pairing.

    python -m vlm2vec.synthetic --out DIR --rows N [--eval-rows M] [--format jsonl|parquet|arrow]

writes DIR/train/<Subset>.<fmt> + DIR/train/images/..., DIR/eval/<Dataset>.<fmt> + DIR/eval/images/...
(image paths relative to DIR/train resp. DIR/eval, the readers' default image roots). Deterministic by seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlm2vec.mmeb_tables import IMAGE_PLACEHOLDER

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 30),
    "purple": (140, 60, 180), "orange": (240, 140, 20), "black": (20, 20, 20), "cyan": (30, 190, 200),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
IMAGE_PROMPT = f"{IMAGE_PLACEHOLDER}\nRepresent the given image."

# train subset -> kind; eval datasets reuse the names (MMEB-eval format, ground truth at candidate 0)
TRAIN_SUBSETS = ("ShapeClassification", "ShapeVQA", "ShapeRetrieval_t2i", "ShapeRetrieval_i2t")
EVAL_DATASETS = ("ShapeClassification", "ShapeVQA", "ShapeRetrieval_t2i")


def draw_shape(color: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """One RGB image of a `color` `shape` at a random place and scale on a light, slightly tinted ground."""
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "star":
        pts = [
            (cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return img


def write_rows(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write rows as .jsonl, .parquet or .arrow (an Arrow IPC stream, as `datasets.save_to_disk`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path
    import pyarrow as pa

    table = pa.Table.from_pylist(list(rows))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif path.suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        raise ValueError(f"path must end in .jsonl, .parquet or .arrow, got {path}")
    return path


class _Painter:
    """Draws and saves images under one root, returning paths relative to that root."""

    def __init__(self, root: Path, folder: str, size: int, rng: random.Random):
        self.root, self.folder, self.size, self.rng, self.n = root, folder, size, rng, 0
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)

    def __call__(self, color: str, shape: str) -> str:
        rel = f"images/{self.folder}/{self.n:05d}.png"
        draw_shape(color, shape, self.size, self.rng).save(self.root / rel)
        self.n += 1
        return rel


def _label(color: str, shape: str) -> str:
    return f"{color} {shape}"


def _train_rows(subset: str, n: int, root: Path, size: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}/train/{subset}")
    paint = _Painter(root, subset, size, rng)
    rows = []
    for _ in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        other_color = rng.choice([c for c in COLORS if c != color])
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        if subset == "ShapeClassification":  # 2 hard negatives as lists: same colour / same shape
            row = dict(
                qry=f"{IMAGE_PLACEHOLDER}\nRepresent the given image for classification",
                qry_image_path=paint(color, shape), pos_text=_label(color, shape), pos_image_path="",
                neg_text=[_label(color, other_shape), _label(other_color, shape)], neg_image_path=["", ""],
            )  # fmt: skip
        elif subset == "ShapeVQA":  # no hard negatives (empty strings, as most MMEB-train rows)
            question, answer = rng.choice(
                [("What color is the shape?", color), ("What shape is drawn?", shape)]
            )
            row = dict(
                qry=f"{IMAGE_PLACEHOLDER}\nRepresent the given image with the following question: {question}",
                qry_image_path=paint(color, shape), pos_text=answer, pos_image_path="",
                neg_text="", neg_image_path="",
            )  # fmt: skip
        elif subset == "ShapeRetrieval_t2i":  # one hard negative image (same shape, other colour)
            row = dict(
                qry=f"Find an image that matches the given caption: a {_label(color, shape)}.",
                qry_image_path="", pos_text=IMAGE_PROMPT, pos_image_path=paint(color, shape),
                neg_text=IMAGE_PROMPT, neg_image_path=paint(other_color, shape),
            )  # fmt: skip
        elif subset == "ShapeRetrieval_i2t":
            row = dict(
                qry=f"{IMAGE_PLACEHOLDER}\nFind a caption describing the given image.",
                qry_image_path=paint(color, shape), pos_text=f"a {_label(color, shape)}", pos_image_path="",
                neg_text="", neg_image_path="",
            )  # fmt: skip
        else:
            raise ValueError(f"unknown synthetic subset {subset!r}")
        rows.append(row)
    return rows


def _eval_rows(dataset: str, n: int, num_candidates: int, root: Path, size: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}/eval/{dataset}")
    paint = _Painter(root, dataset, size, rng)
    classes = [(c, s) for c in COLORS for s in SHAPES]
    rows = []
    for _ in range(n):
        color, shape = rng.choice(classes)
        if dataset == "ShapeClassification":
            others = rng.sample(
                [_label(c, s) for c, s in classes if (c, s) != (color, shape)], num_candidates - 1
            )
            rows.append(dict(
                qry_text=f"{IMAGE_PLACEHOLDER}\nRepresent the given image for classification",
                qry_img_path=paint(color, shape), tgt_text=[_label(color, shape), *others],
                tgt_img_path=[""] * num_candidates,
            ))  # fmt: skip
        elif dataset == "ShapeVQA":
            k = min(num_candidates, len(COLORS))
            others = rng.sample([c for c in COLORS if c != color], k - 1)
            rows.append(dict(
                qry_text=f"{IMAGE_PLACEHOLDER}\nRepresent the given image with the following question: "
                "What color is the shape?",
                qry_img_path=paint(color, shape), tgt_text=[color, *others], tgt_img_path=[""] * k,
            ))  # fmt: skip
        elif dataset == "ShapeRetrieval_t2i":
            others = rng.sample([cs for cs in classes if cs != (color, shape)], num_candidates - 1)
            rows.append(dict(
                qry_text=f"Find an image that matches the given caption: a {_label(color, shape)}.",
                qry_img_path="", tgt_text=[IMAGE_PROMPT] * num_candidates,
                tgt_img_path=[paint(color, shape), *(paint(c, s) for c, s in others)],
            ))  # fmt: skip
        else:
            raise ValueError(f"unknown synthetic eval dataset {dataset!r}")
    return rows


@dataclass
class SyntheticMMEB:
    """Where the generator wrote what."""

    train_dir: Path
    eval_dir: Path
    train_subsets: tuple[str, ...]
    eval_datasets: tuple[str, ...]


def write_synthetic_mmeb(
    out_dir: str | Path,
    *,
    rows: int = 32,
    eval_rows: int | None = None,
    num_candidates: int = 8,
    image_size: int = 64,
    seed: int = 0,
    fmt: str = "jsonl",
    subsets: Sequence[str] = TRAIN_SUBSETS,
    eval_datasets: Sequence[str] = EVAL_DATASETS,
) -> SyntheticMMEB:
    """Write `rows` train rows per subset and `eval_rows` (default rows // 2, at least 1) eval rows per
    dataset with `num_candidates` candidates each. Same arguments -> byte-identical files."""
    if rows < 1 or image_size < 8 or not 2 <= num_candidates <= len(COLORS) * len(SHAPES):
        raise ValueError(
            f"need rows >= 1, image_size >= 8, 2 <= num_candidates <= {len(COLORS) * len(SHAPES)}; "
            f"got rows={rows}, image_size={image_size}, num_candidates={num_candidates}"
        )
    if fmt not in ("jsonl", "parquet", "arrow"):
        raise ValueError(f"fmt must be 'jsonl', 'parquet' or 'arrow', got {fmt!r}")
    eval_rows = max(1, rows // 2) if eval_rows is None else eval_rows
    out = Path(out_dir)
    train_dir, eval_dir = out / "train", out / "eval"
    for subset in subsets:
        write_rows(train_dir / f"{subset}.{fmt}", _train_rows(subset, rows, train_dir, image_size, seed))
    for dataset in eval_datasets:
        data = _eval_rows(dataset, eval_rows, num_candidates, eval_dir, image_size, seed)
        write_rows(eval_dir / f"{dataset}.{fmt}", data)
    return SyntheticMMEB(train_dir, eval_dir, tuple(subsets), tuple(eval_datasets))


# MMEB-train's 20 subsets by row shape: (query has an image, query instruction, target has an image, target
# instruction). Instructions paraphrase the released rows' style (instruction first, then the row's data
# text); `{long}` marks the long data texts of VisDial dialogues and WebQA passages.
MMEB_TRAIN_SHAPES: dict[str, tuple[bool, str, bool, str]] = {
    **{s: (True, "Represent the given image for classification", False, "{label}")
       for s in ("ImageNet_1K", "VOC2007", "SUN397")},
    "N24News": (True, "Represent the given news image with the following caption for domain "
                "classification: {label}", False, "{label}"),
    "HatefulMemes": (True, "Represent the given image for binary classification to determine whether it "
                     "constitutes hateful speech or not", False, "No"),
    **{s: (True, "Represent the given image with the following question: What is drawn?", False, "{label}")
       for s in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    "VisDial": (False, "Represent the given dialogue about an image, which is used for image retrieval: "
                "{long}", True, "Represent the given image."),
    "CIRR": (True, "Given an image, find a similar everyday image with the described changes: make it "
             "{label}", True, "Represent the given image."),
    "VisualNews_t2i": (False, "Retrieve an image of this news caption. {label}", True,
                       "Represent the given image."),
    "VisualNews_i2t": (True, "Find a caption for the news in the given photo.", False, "{label}"),
    "MSCOCO_t2i": (False, "Find me an everyday image that matches the given caption: {label}", True,
                   "Represent the given image."),
    "MSCOCO_i2t": (True, "Find an image caption describing the given everyday image.", False, "{label}"),
    "NIGHTS": (True, "Find a day-to-day image that looks similar to the provided image.", True,
               "Represent the given image."),
    "WebQA": (False, "Find a Wikipedia image that answers this question: What is drawn?", True,
              "Represent the given image with related text information: {long}"),
    "MSCOCO": (True, "Select the portion of the image that isolates the object of the given label: "
               "{label}", True, "Represent the given cropped image of the object"),
}  # fmt: skip


def write_mmeb_train_shapes(
    out_dir: str | Path, *, rows: int = 2, image_size: int = 64, long_words: int = 300, seed: int = 0
) -> Path:
    """A synthetic MMEB-train copy: one file per real subset name (MMEB_TRAIN_SHAPES) holding `rows` rows of
    that subset's shape (which side has an image, instruction first, `long_words` words of data text
    where the subset has long texts), with the released columns (negatives empty). Images alternate
    between square and 2:1 (Phi-3.5-V's crop grid follows the aspect ratio). Returns the train folder."""
    out = Path(out_dir)
    rng = random.Random(f"{seed}/mmeb-train-shapes")
    for subset, (q_img, q_text, p_img, p_text) in MMEB_TRAIN_SHAPES.items():
        paint = _Painter(out, subset, image_size, rng)
        data = []
        for k in range(rows):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            words = [rng.choice([*COLORS, *SHAPES]) for _ in range(long_words)]
            fill = dict(label=_label(color, shape), long=" ".join(words))

            def image(k: int = k, color: str = color, shape: str = shape, paint: _Painter = paint) -> str:
                rel = paint(color, shape)
                if k % 2:  # every other image 2:1
                    Image.open(out / rel).resize((2 * image_size, image_size)).save(out / rel)
                return rel

            data.append(dict(
                qry=(f"{IMAGE_PLACEHOLDER}\n" if q_img else "") + q_text.format(**fill),
                qry_image_path=image() if q_img else "",
                pos_text=(f"{IMAGE_PLACEHOLDER}\n" if p_img else "") + p_text.format(**fill),
                pos_image_path=image() if p_img else "", neg_text="", neg_image_path="",
            ))  # fmt: skip
        write_rows(out / f"{subset}.jsonl", data)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm2vec.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (train/ and eval/ are created)")
    parser.add_argument("--rows", type=int, default=32, help="train rows per subset")
    parser.add_argument("--eval-rows", type=int, default=None, help="eval rows per dataset (default rows/2)")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per eval row")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jsonl", "parquet", "arrow"), default="jsonl")
    args = parser.parse_args(argv)
    made = write_synthetic_mmeb(
        args.out, rows=args.rows, eval_rows=args.eval_rows, num_candidates=args.candidates,
        image_size=args.image_size, seed=args.seed, fmt=args.format,
    )  # fmt: skip
    print(f"train: {made.train_dir} subsets {', '.join(made.train_subsets)}")
    print(f"eval:  {made.eval_dir} datasets {', '.join(made.eval_datasets)}")


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------------------------------ MMEB-V2
def moving_shape(color: str, shape: str, n_frames: int, size: int, rng: random.Random) -> list[Image.Image]:
    """Frames of a `color` `shape` crossing the picture left to right (a tiny, decodable "video")."""
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    r = size * 0.2
    frames = []
    for k in range(n_frames):
        cx = r + 1 + (size - 2 * r - 2) * k / max(1, n_frames - 1)
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        box = [cx - r, size / 2 - r, cx + r, size / 2 + r]
        draw.ellipse(box, fill=COLORS[color]) if shape == "circle" else draw.rectangle(
            box, fill=COLORS[color]
        )
        frames.append(img)
    return frames


def write_tiny_mmeb_v2(
    root: str | Path, *, rows: int = 3, frames: int = 6, size: int = 32, seed: int = 0
) -> list[str]:
    """A tiny local MMEB-V2 copy in the forms the reference reads (vlm2vec/mmeb_v2.py), one task per
    kind: ImageNet-1K (MMEB_Test_Instruct rows as a hub parquet, local), HMDB51 (video classification,
    global over the reference's 51 labels; every other video only as an mp4), MSR-VTT (config test_1k,
    global), QVHighlight (moment retrieval, local), Video-MME (video QA, local), ViDoRe_arxivqa (BEIR
    configs with graded qrels, NDCG@5). Returns the task names."""
    from vlm2vec.media import write_frames, write_video
    from vlm2vec.mmeb_v2 import get_task
    from vlm2vec.mmeb_v2_labels import HMDB51_LABELS

    root = Path(root)
    rng = random.Random(f"{seed}/mmeb-v2")
    shapes = ("circle", "square")
    classes = [(c, s) for c in list(COLORS)[:4] for s in shapes]

    def video(task_name: str, video_id: str, color: str, shape: str, as_file: bool = False) -> None:
        task = get_task(task_name)
        clip = moving_shape(color, shape, frames, size, rng)
        if as_file:
            write_video(root / task.video_root / f"{video_id}.mp4", clip)
        else:
            write_frames(root / task.frame_root / video_id, clip)

    # image: MMEB_Test_Instruct rows (hub layout <config>/test-*.parquet), images under image-tasks/
    image_rows = []
    for row in _eval_rows("ShapeClassification", rows, 4, root / "image-tasks", size, seed):
        image_rows.append(dict(qry_inst="<|image_1|> Represent the given image for classification",
                               qry_text="", qry_img_path=row["qry_img_path"], tgt_inst="",
                               tgt_text=row["tgt_text"], tgt_img_path=row["tgt_img_path"]))  # fmt: skip
    write_rows(
        root / get_task("ImageNet-1K").data / "ImageNet-1K" / "test-00000-of-00001.parquet", image_rows
    )
    # video classification (global over the reference's label list); videos named by label
    cls_rows = []
    for k in range(rows):
        c, s = classes[k % len(classes)]
        video("HMDB51", f"v{k}", c, s, as_file=k % 2 == 1)
        cls_rows.append({"video_id": f"v{k}", "pos_text": HMDB51_LABELS[k % len(HMDB51_LABELS)]})
    write_rows(root / get_task("HMDB51").data / "data" / "test-00000-of-00001.parquet", cls_rows)
    # video retrieval (global over the videos), config test_1k
    ret_rows = []
    for k in range(rows):
        c, s = classes[(k + 1) % len(classes)]
        video("MSR-VTT", f"video{k}", c, s)
        ret_rows.append(
            {"video_id": f"video{k}", "video": f"video{k}.mp4", "caption": f"a {c} {s} moves right"}
        )
    write_rows(root / get_task("MSR-VTT").data / "test_1k" / "test-00000-of-00001.parquet", ret_rows)
    # moment retrieval: per video a query video and its clips (positive + negatives)
    mret_rows = []
    for k in range(rows):
        base = get_task("QVHighlight").frame_root
        (c, s), *others = rng.sample(classes, 4)
        write_frames(root / base / f"vid{k}" / "query", moving_shape(c, s, frames, size, rng))
        write_frames(root / base / f"vid{k}" / "positive_0", moving_shape(c, s, frames // 2, size, rng))
        for j, (oc, os_) in enumerate(others):
            write_frames(
                root / base / f"vid{k}" / f"negative_{j}", moving_shape(oc, os_, frames // 2, size, rng)
            )
        mret_rows.append({"query": f"the {c} {s}", "video_path": f"videos/vid{k}.mp4"})
    write_rows(root / get_task("QVHighlight").data / "test.jsonl", mret_rows)
    # video QA: multiple choice over the options ("A. text"), answer a letter
    qa_rows = []
    for k in range(rows):
        c, s = classes[k % len(classes)]
        video("Video-MME", f"qa{k}", c, s)
        options = rng.sample([x for x in COLORS if x != c], 3) + [c]
        rng.shuffle(options)
        qa_rows.append({"videoID": f"qa{k}", "question": "What color is the moving shape?",
                        "options": [f"{'ABCD'[j]}. {o}" for j, o in enumerate(options)],
                        "answer": "ABCD"[options.index(c)], "question_id": f"{k:03d}-1",
                        "domain": "synthetic", "sub_category": "color"})  # fmt: skip
    write_rows(root / get_task("Video-MME").data / "test.jsonl", qa_rows)
    # document retrieval: BEIR configs as a hub snapshot; pages as PNG bytes (the hub's Image feature)
    import io

    doc = root / get_task("ViDoRe_arxivqa").data
    corpus, queries, qrels = [], [], []
    for j in range(rows + 2):
        c, s = classes[j % len(classes)]
        buf = io.BytesIO()
        draw_shape(c, s if s != "square" else "triangle", size * 2, rng).save(buf, "PNG")
        corpus.append({"corpus-id": f"page{j}", "image": {"bytes": buf.getvalue(), "path": None}})
    for k in range(rows):
        queries.append({"query-id": f"q{k}", "query": f"which page shows the {_label(*classes[k])}?"})
        qrels += [{"query-id": f"q{k}", "corpus-id": f"page{k}", "score": 2},
                  {"query-id": f"q{k}", "corpus-id": f"page{k + 1}", "score": 1}]  # fmt: skip
    for config, table in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        write_rows(doc / config / "test-00000-of-00001.parquet", table)
    return ["ImageNet-1K", "HMDB51", "MSR-VTT", "QVHighlight", "Video-MME", "ViDoRe_arxivqa"]


def write_synthetic_v2_train(out_dir: str | Path, *, rows: int = 8, frames: int = 4, size: int = 32,
                             seed: int = 0) -> Path:  # fmt: skip
    """MMEB-V2-style training rows in the MMEB-train layout plus video and multi-page columns: subsets
    ShapeRetrieval_i2t (one image), VideoCaption (query video -> caption; frame folders, every other one
    an mp4) and DocRetrieval (query -> document page image, every other document two pages). Returns
    the train directory (paths relative to it)."""
    from vlm2vec.media import write_frames, write_video

    train = Path(out_dir) / "train"
    rng = random.Random(f"{seed}/v2-train")
    write_rows(train / "ShapeRetrieval_i2t.jsonl", _train_rows("ShapeRetrieval_i2t", rows, train, size, seed))
    video_rows, doc_rows = [], []
    for k in range(rows):
        color, shape = rng.choice(list(COLORS)), rng.choice(("circle", "square"))
        clip = moving_shape(color, shape, frames, size, rng)
        if k % 2:
            rel = f"videos/clip{k}.mp4"
            write_video(train / rel, clip)
        else:
            rel = f"videos/clip{k}"
            write_frames(train / rel, clip)
        video_rows.append(dict(qry="<|video_1|> Describe the video.", qry_image_path="", qry_video_path=rel,
                               pos_text=f"a {color} {shape} moving right", pos_image_path="",
                               neg_text="", neg_image_path=""))  # fmt: skip
        pages = []
        for p in range(1 + k % 2):
            rel_page = f"pages/doc{k}_p{p}.png"
            (train / "pages").mkdir(parents=True, exist_ok=True)
            draw_shape(color, rng.choice(SHAPES), size * 2, rng).save(train / rel_page)
            pages.append(rel_page)
        marks = "".join(f"<|image_{p + 1}|>" for p in range(len(pages)))
        doc_rows.append(
            dict(
                qry=f"Find a document image that matches the given query: the {color} page",
                qry_image_path="",
                pos_text=f"{marks} Understand the content of the provided document image.",
                pos_image_path=pages,
                neg_text="",
                neg_image_path="",
            )
        )
    write_rows(train / "VideoCaption.jsonl", video_rows)
    write_rows(train / "DocRetrieval.jsonl", doc_rows)
    return train
