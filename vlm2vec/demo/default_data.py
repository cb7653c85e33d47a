"""The default run's data: the emoji set and the OpenClipArt set, merged into one MMEB-format directory.

Both come from Debian packages (fonts-noto-color-emoji + unicode-data, openclipart-png + -svg) and are
built once under `root` (reused while their settings are the same):

    root/emoji/...  root/clipart/...   the two builds (emoji_data.py, clipart_data.py)
    root/train/     every training subset of both (EmojiI2T, EmojiT2I, ClipArtI2T, ClipArtT2I)
    root/eval/      every held-out task of both, with one datasets.json
    root/features-grid0.pt             frozen EfficientNet features of every image (the demo model's)

Merged rows point into the builds through links (`root/train/images/emoji -> ../../emoji/train/images`),
so each image exists once. A plain MMEB directory: `--dataset_name root/train --eval_data root/eval`
trains on it like any other data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from vlm2vec.demo.clipart_data import N_EVAL as CLIPART_N_EVAL
from vlm2vec.demo.clipart_data import build_clipart_dataset
from vlm2vec.demo.emoji_data import N_EVAL as EMOJI_N_EVAL
from vlm2vec.demo.emoji_data import N_TRAIN as EMOJI_N_TRAIN
from vlm2vec.demo.emoji_data import build_emoji_dataset

PATH_KEYS = ("qry_img_path", "tgt_img_path", "qry_image_path", "pos_image_path", "neg_image_path")
FEATURE_FILE = "features-grid0.pt"
# shown by the trainer's report; the first task of datasets.json is the run's headline
DESCRIPTIONS = {
    "ClipArtI2T": "image->title over all held-out OpenClipArt titles",
    "EmojiI2T": "image->name over all held-out emoji names",
}


def _prefixed(value: Any, prefix: str) -> Any:
    if isinstance(value, list):
        return [_prefixed(v, prefix) for v in value]
    if isinstance(value, str) and value:
        if not value.startswith("images/"):
            raise ValueError(f"unexpected image path {value!r} (both builders write images/...)")
        return f"images/{prefix}/{value[len('images/') :]}"
    return value


def _merge(sources: dict[str, Path], out: Path) -> None:
    """out/images/<name> -> <source>/images per source, and every JSONL of the sources with its image
    paths moved under that link (only images live there: an eval folder holding tables is a dataset)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    for name, src in sources.items():
        link = out / "images" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(src / "images", link.parent), target_is_directory=True)
        for jsonl in sorted(src.glob("*.jsonl")):
            rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line]
            for row in rows:
                for key in PATH_KEYS:
                    if key in row:
                        row[key] = _prefixed(row[key], name)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            (out / jsonl.name).write_text(text, encoding="utf-8")
        if (src / "datasets.json").is_file():
            for task, info in json.loads((src / "datasets.json").read_text()).items():
                meta[task] = {**info, **({"description": DESCRIPTIONS[task]} if task in DESCRIPTIONS else {})}
    if meta:
        (out / "datasets.json").write_text(json.dumps(meta, indent=2) + "\n")


def build_default_dataset(
    root: str | os.PathLike,
    *,
    emoji_n_train: int = EMOJI_N_TRAIN,
    emoji_n_eval: int = EMOJI_N_EVAL,
    clipart_n_eval: int = CLIPART_N_EVAL,
    clipart_limit: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Build (or reuse) both sets, merge them, and cache the frozen image features; returns `root`.
    Smaller sizes / `clipart_limit` give a quick subset with the same layout (tests)."""
    from vlm2vec.demo.family import ImageFeaturizer

    out = Path(root)
    settings = {"emoji": [emoji_n_train, emoji_n_eval], "clipart": [clipart_n_eval, clipart_limit]}
    done = out / "manifest.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        return out
    emoji = build_emoji_dataset(out / "emoji", n_train=emoji_n_train, n_eval=emoji_n_eval,
                                show_progress=show_progress)  # fmt: skip
    clipart = build_clipart_dataset(out / "clipart", n_eval=clipart_n_eval, limit=clipart_limit,
                                    show_progress=show_progress)  # fmt: skip
    for split in ("train", "eval"):
        _merge({"clipart": clipart / split, "emoji": emoji / split}, out / split)
    featurizer = ImageFeaturizer(cache_file=str(out / FEATURE_FILE))
    images = []
    for path in sorted(p for build in (emoji, clipart) for p in build.glob("*/images/*.png")):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    if featurizer.precompute(images, show_progress=show_progress) or not (out / FEATURE_FILE).is_file():
        featurizer.save_cache()
    done.write_text(json.dumps({"settings": settings}, indent=2) + "\n")  # last: marks a complete build
    return out
