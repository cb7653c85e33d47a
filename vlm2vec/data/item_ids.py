"""Item ids of a step's candidates: equal ids <=> the same item (what the model is given is the same).

The loss (`contrastive_loss(candidate_ids=...)`) keeps a copy of a query's positive out of that query's
negatives; the copies it must find lie in other GradCache chunks and on other processes. An id is a hash
of the candidate's content, so every process computes the same id for the same item without talking to
the others, whatever the chunking or the row order.

The content is exactly what the collator hands the model for the row: the text (image placeholders
already replaced when the rows were read) and the pixels of each image / video frame. Hashing pixels
rather than file paths also finds one picture stored under two paths, and needs no paths in the batch
(the same path always loads the same pixels); SHA-256 (hardware-accelerated on current CPUs) takes about
0.5 ms for a 512x512 RGB image, small next to the processor's own work on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


def _add_image(h: Any, image: Image.Image) -> None:
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())


def _add_visual(h: Any, tag: bytes, visual: Image.Image | Sequence[Image.Image] | None) -> None:
    """One image, several images (pages) or none, tagged so that a text row and a row whose only
    difference is an image never collide, nor one image and the same image repeated."""
    if visual is None:
        return
    images = [visual] if isinstance(visual, Image.Image) else list(visual)
    h.update(tag + str(len(images)).encode() + b":")
    for image in images:
        _add_image(h, image)


def item_id(text: str, image: Any = None, video: Sequence[Image.Image] | None = None) -> int:
    """The int64 id of one candidate: its text, its image(s) and its video frames, as the model gets them."""
    h = hashlib.sha256()
    data = text.encode("utf-8")
    h.update(b"t" + str(len(data)).encode() + b":" + data)
    _add_visual(h, b"i", image)
    _add_visual(h, b"v", video)
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def item_ids(
    texts: Sequence[str], images: Sequence[Any], videos: Sequence[Any] | None = None
) -> torch.Tensor:
    """int64 [n]: `item_id` of each row (`videos` None: no row has a video)."""
    videos = videos if videos is not None else [None] * len(texts)
    if not len(texts) == len(images) == len(videos):
        raise ValueError(f"item_ids: {len(texts)} texts, {len(images)} images, {len(videos)} videos")
    return torch.tensor([item_id(t, i, v) for t, i, v in zip(texts, images, videos)], dtype=torch.long)
