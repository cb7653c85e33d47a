"""Builds the embedded demo's MMEB-format data set from files Debian installs (no download).

Images come from the Noto Color Emoji font (`fonts-noto-color-emoji`), names and groups from the Unicode
emoji test file (`unicode-data`). Fully-qualified emoji without skin-tone modifiers give 1,870 items;
a seeded permutation splits them into 870 training pairs and 1,000 held-out items, which become three
MMEB-eval style data sets:

- `EmojiI2T`   image -> name retrieval over all 1,000 held-out names (ground truth first),
- `EmojiT2I`   name -> image retrieval over all 1,000 held-out images,
- `EmojiGroup` image -> emoji-group classification over the 9 group labels.

Layout written under `out_dir` (image paths are relative to the eval/ or train/ folder they are in):

    eval/EmojiI2T.jsonl ...     MMEB-eval columns: qry_text, qry_img_path, tgt_text[], tgt_img_path[]
    eval/datasets.json          meta-task and IND/OOD of each eval set (read by vlm2vec.eval)
    eval/images/NNNN.png        the 1,000 held-out emoji
    train/EmojiI2T.jsonl ...    MMEB-train columns: qry, qry_image_path, pos_text, pos_image_path,
                                neg_text, neg_image_path (one row per training emoji, no hard negatives)
    train/images/NNNN.png       the 870 training emoji
    items.jsonl                 every item: index, chars, name, group, subgroup, split, image
    manifest.json               settings, counts, source files (written last: marks a complete build)

IND/OOD in the demo's table: image<->name retrieval is trained (on other emoji), so IND; the group
classification task is never trained, so OOD (as MMEB calls a task without a training set).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

EMOJI_TEST_FILE = "/usr/share/unicode/emoji/emoji-test.txt"
EMOJI_FONT_FILE = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Noto Color Emoji is a bitmap font: 109 px is its one native strike (136 x 128 glyph cells).
FONT_SIZE = 109
CANVAS = 136
SKIN_TONES = range(0x1F3FB, 0x1F400)
IMAGE_PLACEHOLDER = "<|image_1|>"
N_TRAIN = 870
N_EVAL = 1000
SPLIT_SEED = 0

# Instructions in the MMEB style: the query carries the task, image targets a fixed prompt, text raw.
# (short: every token of the instruction costs training time on the CPU)
I2T_QUERY = f"{IMAGE_PLACEHOLDER} Find the name of this emoji."
T2I_QUERY = "Find the emoji for this name: {name}"
GROUP_QUERY = f"{IMAGE_PLACEHOLDER} Classify this emoji into its group."
IMAGE_TARGET = f"{IMAGE_PLACEHOLDER} Represent the given image."

EVAL_SETS = {
    "EmojiI2T": {"meta_task": "Retrieval", "ood": False},
    "EmojiT2I": {"meta_task": "Retrieval", "ood": False},
    "EmojiGroup": {"meta_task": "Classification", "ood": True},
}
TRAIN_SETS = ("EmojiI2T", "EmojiT2I")

_LINE = re.compile(r"^(?P<cps>[0-9A-F ]+?)\s*;\s*(?P<status>[a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+)$")


@dataclass(frozen=True)
class Emoji:
    chars: str
    name: str
    group: str
    subgroup: str


def parse_emoji_test(path: str | os.PathLike = EMOJI_TEST_FILE) -> list[Emoji]:
    """Fully-qualified emoji without skin-tone modifiers, in file (CLDR) order.

    The "Component" group (bare skin tones and hair styles) is left out: it has no fully-qualified
    entries once skin tones are dropped, which leaves 9 groups as class labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"emoji test file {path} not found: install the Debian package `unicode-data`"
        )
    group = subgroup = ""
    emoji: list[Emoji] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("# group:"):
            group = raw.split(":", 1)[1].strip()
        elif raw.startswith("# subgroup:"):
            subgroup = raw.split(":", 1)[1].strip()
        elif raw and not raw.startswith("#"):
            match = _LINE.match(raw)
            if match is None:
                raise ValueError(f"{path}: cannot parse line {raw!r}")
            if match["status"] != "fully-qualified" or group == "Component":
                continue
            code_points = [int(cp, 16) for cp in match["cps"].split()]
            if any(cp in SKIN_TONES for cp in code_points):
                continue
            emoji.append(Emoji("".join(map(chr, code_points)), match["name"].strip(), group, subgroup))
    return emoji


def load_emoji_font(path: str | os.PathLike = EMOJI_FONT_FILE) -> ImageFont.FreeTypeFont:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"emoji font {path} not found: install the Debian package `fonts-noto-color-emoji`"
        )
    return ImageFont.truetype(str(path), FONT_SIZE)


def render_emoji(chars: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The font's colour bitmap on a white square canvas (RGB, CANVAS x CANVAS)."""
    image = Image.new("RGB", (CANVAS, CANVAS), "white")
    left, top, right, bottom = font.getbbox(chars)
    offset = ((CANVAS - (right - left)) // 2 - left, (CANVAS - (bottom - top)) // 2 - top)
    ImageDraw.Draw(image).text(offset, chars, font=font, embedded_color=True)
    return image


def split_indices(n_items: int, n_train: int = N_TRAIN, n_eval: int = N_EVAL, seed: int = SPLIT_SEED):
    """A fixed seeded permutation: the first n_train items train, the next n_eval are held out."""
    if n_train + n_eval > n_items:
        raise ValueError(f"n_train + n_eval = {n_train + n_eval} exceeds the {n_items} emoji available")
    order = np.random.default_rng(seed).permutation(n_items)
    return sorted(order[:n_train].tolist()), sorted(order[n_train : n_train + n_eval].tolist())


def rotate_first(items: list, position: int) -> list:
    """The list with items[position] moved to the front (MMEB: ground truth is candidate 0)."""
    return [items[position]] + items[:position] + items[position + 1 :]


def eval_rows(items: list[Emoji], images: list[str], groups: list[str]) -> dict[str, list[dict]]:
    """The three held-out MMEB-eval data sets; every query ranks all held-out names/images/groups."""
    names = [e.name for e in items]
    no_image = [""] * len(items)
    i2t, t2i, group = [], [], []
    for i, emoji in enumerate(items):
        i2t.append(
            {
                "qry_text": I2T_QUERY,
                "qry_img_path": images[i],
                "tgt_text": rotate_first(names, i),
                "tgt_img_path": no_image,
            }
        )
        t2i.append(
            {
                "qry_text": T2I_QUERY.format(name=emoji.name),
                "qry_img_path": "",
                "tgt_text": [IMAGE_TARGET] * len(items),
                "tgt_img_path": rotate_first(images, i),
            }
        )
        g = groups.index(emoji.group)
        group.append(
            {
                "qry_text": GROUP_QUERY,
                "qry_img_path": images[i],
                "tgt_text": rotate_first(groups, g),
                "tgt_img_path": [""] * len(groups),
            }
        )
    return {"EmojiI2T": i2t, "EmojiT2I": t2i, "EmojiGroup": group}


def train_rows(items: list[Emoji], images: list[str]) -> dict[str, list[dict]]:
    """MMEB-train style pairs (no hard negatives: in-batch negatives only) for the training emoji."""
    i2t = [
        {
            "qry": I2T_QUERY,
            "qry_image_path": img,
            "pos_text": e.name,
            "pos_image_path": "",
            "neg_text": "",
            "neg_image_path": "",
        }
        for e, img in zip(items, images)
    ]
    t2i = [
        {
            "qry": T2I_QUERY.format(name=e.name),
            "qry_image_path": "",
            "pos_text": IMAGE_TARGET,
            "pos_image_path": img,
            "neg_text": "",
            "neg_image_path": "",
        }
        for e, img in zip(items, images)
    ]
    return {"EmojiI2T": i2t, "EmojiT2I": t2i}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines, written to a temporary file first (a build never leaves half a file)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_emoji_dataset(
    out_dir: str | os.PathLike,
    *,
    n_train: int = N_TRAIN,
    n_eval: int = N_EVAL,
    seed: int = SPLIT_SEED,
    emoji_test_file: str | os.PathLike = EMOJI_TEST_FILE,
    font_file: str | os.PathLike = EMOJI_FONT_FILE,
    show_progress: bool = True,
) -> Path:
    """Render and write the demo data set (idempotent: an existing complete build is reused).

    Smaller `n_train` / `n_eval` give a subset with the same layout (for tests); the full demo uses
    870 / 1,000 of the 1,870 emoji.
    """
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    settings = {"n_train": n_train, "n_eval": n_eval, "seed": seed, "font_size": FONT_SIZE, "canvas": CANVAS}
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("settings") == settings:
        return out
    emoji = parse_emoji_test(emoji_test_file)
    train_idx, eval_idx = split_indices(len(emoji), n_train, n_eval, seed)
    groups = sorted({e.group for e in emoji})
    font = load_emoji_font(font_file)
    image_of = {}
    jobs = [(i, "train") for i in train_idx] + [(i, "eval") for i in eval_idx]
    for split in ("train", "eval"):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
    for i, split in tqdm(jobs, desc="render emoji", disable=not show_progress):
        image_of[i] = f"images/{i:04d}.png"
        render_emoji(emoji[i].chars, font).save(out / split / image_of[i])
    held_out = eval_rows([emoji[i] for i in eval_idx], [image_of[i] for i in eval_idx], groups)
    for name, rows in held_out.items():
        write_jsonl(out / "eval" / f"{name}.jsonl", rows)
    (out / "eval" / "datasets.json").write_text(json.dumps(EVAL_SETS, indent=2) + "\n")
    for name, rows in train_rows([emoji[i] for i in train_idx], [image_of[i] for i in train_idx]).items():
        write_jsonl(out / "train" / f"{name}.jsonl", rows)
    split_of = {**{i: "train" for i in train_idx}, **{i: "eval" for i in eval_idx}}
    table = [
        {"index": i, **asdict(emoji[i]), "split": split_of[i], "image": f"{split_of[i]}/{image_of[i]}"}
        for i in sorted(split_of)
    ]
    write_jsonl(out / "items.jsonl", table)
    manifest = {
        "settings": settings,
        "source": {"emoji_test_file": str(emoji_test_file), "font_file": str(font_file)},
        "n_emoji_available": len(emoji),
        "groups": groups,
        "eval_sets": EVAL_SETS,
        "train_sets": list(TRAIN_SETS),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the build complete
    return out


def load_items(data_dir: str | os.PathLike, split: str | None = None) -> list[dict]:
    """The item table of a built data set (image paths relative to data_dir), optionally one split."""
    rows = [
        json.loads(line) for line in (Path(data_dir) / "items.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    return [r for r in rows if split is None or r["split"] == split]
