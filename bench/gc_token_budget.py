"""What GradCache chunks hold on a mixed MMEB-V2 batch: fixed row counts vs a token budget.

    python bench/gc_token_budget.py [--budget 8192]

A per-device batch of 32 queries like MMEB-V2 training (4 videos of 8 frames, 8 images, 20 text rows)
is prepared by a tiny Qwen2-VL whose processor uses the paper's bounds (256..1280 merged tokens per
image or frame), so the visual token counts are those of the real model (text counts come from the tiny
tokenizer). Printed per chunking: number of chunks, the largest chunk's tokens (what sets peak
activation memory) and the padded tokens of all chunks (the compute spent)."""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from vlm2vec.backbones import ProcessorSettings
from vlm2vec.data import ChunkCollator, ContrastiveBatch
from vlm2vec.families.qwen import default_pixels
from vlm2vec.model import VLM2Vec


def batch(seed: int = 0) -> ContrastiveBatch:
    rng = np.random.default_rng(seed)

    def pic(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    texts, images, videos = [], [], []
    for k in range(32):
        if k < 4:
            texts.append("<|video_1|> Describe what happens in the video.")
            images.append(None)
            videos.append([pic(448, 336) for _ in range(8)])
        elif k < 12:
            texts.append("<|image_1|> Represent the given image with the following question: what is shown?")
            images.append(pic(640, 480))
            videos.append(None)
        else:
            texts.append(
                f"Find a video that contains the following visual content: a person cooking, take {k}"
            )
            images.append(None)
            videos.append(None)
    order = rng.permutation(32).tolist()
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    captions = [f"caption {k}" for k in range(32)]
    return ContrastiveBatch(
        pick(texts), pick(images), captions, [None] * 32, np.arange(32), ["mix"] * 32, 0,
        query_videos=pick(videos), cand_videos=[],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=8192)
    args = parser.parse_args()
    model = VLM2Vec.tiny("qwen2_vl", settings=ProcessorSettings("native", *default_pixels(14)))
    b = batch()
    setups = {
        "rows: 2 per chunk": dict(query_chunk_size=2),
        "rows: 8 per chunk": dict(query_chunk_size=8),
        f"tokens: <= {args.budget} per chunk": dict(query_chunk_size=None, max_tokens=args.budget),
        f"tokens: <= {args.budget}, packed": dict(query_chunk_size=None, max_tokens=args.budget, packed=True),
    }
    print(f"{'chunking':32} {'chunks':>6} {'largest chunk':>14} {'padded tokens':>14}")
    for name, kwargs in setups.items():
        prepared = ChunkCollator(model, sort_by_length=True, **kwargs)(b)
        sizes = [c["input_ids"].numel() for c in prepared.query_chunks]  # packed: [1, T], no padding
        print(f"{name:32} {len(sizes):>6} {max(sizes):>14} {sum(sizes):>14}")


if __name__ == "__main__":
    main()
