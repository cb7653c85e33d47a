"""GradCache chunks sized by a token budget (ChunkCollator(max_tokens=...)): on a mixed text / image /
multi-image / video batch the loss and every parameter's gradient equal the unchunked full-batch step
(float64, tiny Qwen2-VL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm2vec.data import ChunkCollator, ContrastiveBatch
from vlm2vec.gradcache import contrastive_step
from vlm2vec.model import VLM2Vec, pool


def pics(n: int, seed: int, size: tuple[int, int] = (28, 56)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def mixed_batch() -> ContrastiveBatch:
    frames, images = pics(6, 0), pics(5, 1)
    q_texts = [
        "<|video_1|> What happens here?",
        "find the photo of a red square on a table",
        "<|image_1|> Represent the given image.",
        "<|image_1|> <|image_2|> which one is brighter?",
        "a short query",
        "<|video_1|> Describe the clip.",
    ]
    q_images = [None, None, images[0], [images[1], images[2]], None, None]
    q_videos = [frames, None, None, None, None, frames[:2]]
    c_texts = [
        "a video of shapes",
        "<|image_1|> a photo",
        "a bright one",
        "<|video_1|> the clip",
        "text",
        "clip",
    ]
    c_images = [None, images[3], None, None, None, None]
    c_videos = [None, None, None, pics(4, 2), None, None]
    return ContrastiveBatch(
        q_texts, q_images, c_texts, c_images, torch.arange(6), ["mix"] * 6, 0,
        query_videos=q_videos, cand_videos=c_videos,
    )  # fmt: skip


def float64_encoder(model):
    """VLM2Vec.forward without its final cast to fp32 (kept for bf16 training), so the whole step stays
    in float64 and chunked vs full can be compared to ~1e-12."""

    def encode(inputs):
        inputs = model._to_device(inputs)
        return F.normalize(
            pool(model.family.hidden_states(model.hf_model, inputs), inputs, model.pooling), dim=-1
        )

    return encode


def step(model, prepared, grad_cache: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)

    def loss_fn(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(q @ c.T / 0.02, prepared.targets)

    loss = contrastive_step(
        float64_encoder(model), prepared.query_chunks, prepared.cand_chunks, loss_fn, grad_cache=grad_cache
    )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_chunks_equal_the_full_batch_step(packed: bool) -> None:
    model = VLM2Vec.tiny("qwen2_vl").double()
    model.enable_full_finetuning()
    model.train()
    batch = mixed_batch()
    lengths = [
        model.count_tokens(t, i, v)
        for t, i, v in zip(batch.query_texts, batch.query_images, batch.videos("query"))
    ]
    budget = sorted(lengths)[-1] + 4  # the longest row fits; two long rows do not
    chunked = ChunkCollator(
        model, query_chunk_size=None, sort_by_length=True, max_tokens=budget, packed=packed
    )(batch)
    full = ChunkCollator(model, query_chunk_size=6, sort_by_length=True, packed=packed)(batch)
    assert len(full.query_chunks) == len(full.cand_chunks) == 1
    rows = [
        int(c["cu_seqlens"].numel() - 1) if packed else c["input_ids"].shape[0] for c in chunked.query_chunks
    ]
    assert len(chunked.query_chunks) >= 3 and len(set(rows)) > 1  # uneven chunks: sized by tokens, not rows
    for chunk in chunked.query_chunks + chunked.cand_chunks:
        tokens = chunk["input_ids"].numel()
        assert tokens <= budget or (chunk["input_ids"].shape[0] == 1 and not packed) or rows == [1]
    loss_c, grads_c = step(model, chunked, grad_cache=True)
    loss_f, grads_f = step(model, full, grad_cache=False)
    assert loss_f.dtype == torch.float64
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-12, atol=1e-12)
    assert grads_c.keys() == grads_f.keys() and len(grads_f) > 10
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().max() > 0 for g in grads_f.values())


def test_min_chunks_splits_without_changing_the_step() -> None:
    """ZeRO-3 processes agree on a chunk count (train.align_processes); a rank with fewer chunks
    re-collates with `min_chunks`: more chunks, the same row order and targets, the same loss and
    gradients (float64)."""
    model = VLM2Vec.tiny("qwen2_vl").double()
    model.enable_full_finetuning()
    model.train()
    batch = mixed_batch()
    collate = ChunkCollator(model, query_chunk_size=None, sort_by_length=True, max_tokens=10_000)
    base = collate(batch)
    more = collate(batch, min_chunks=(len(base.query_chunks) + 2, 6))
    assert len(more.query_chunks) == len(base.query_chunks) + 2 and len(more.cand_chunks) == 6
    assert torch.equal(more.targets, base.targets) and torch.equal(more.query_order, base.query_order)
    assert torch.equal(more.cand_order, base.cand_order)
    assert len(collate(batch, min_chunks=(50, 50)).query_chunks) == 6  # at most one row per chunk
    loss_b, grads_b = step(model, base, grad_cache=True)
    loss_m, grads_m = step(model, more, grad_cache=True)
    torch.testing.assert_close(loss_m, loss_b, rtol=1e-12, atol=1e-12)
    for name in grads_b:
        torch.testing.assert_close(grads_m[name], grads_b[name], rtol=1e-9, atol=1e-12, msg=name)


def test_budget_packs_text_rows_and_isolates_long_rows() -> None:
    model = VLM2Vec.tiny("qwen2_vl")
    batch = mixed_batch()
    collate = ChunkCollator(model, query_chunk_size=None, sort_by_length=True, max_tokens=1)
    prepared = collate(batch)
    assert [c["input_ids"].shape[0] for c in prepared.query_chunks] == [1] * 6  # every row over budget: alone
    roomy = ChunkCollator(model, query_chunk_size=None, sort_by_length=True, max_tokens=10_000, packed=True)
    assert len(roomy(batch).query_chunks) == 1  # packed: all rows fit one chunk
    padded = ChunkCollator(model, query_chunk_size=None, sort_by_length=True, max_tokens=10_000)(batch)
    lengths = [
        model.count_tokens(t, i, v)
        for t, i, v in zip(batch.query_texts, batch.query_images, batch.videos("query"))
    ]
    sizes = [c["input_ids"].shape[0] for c in padded.query_chunks]
    start = 0
    for size in sizes:  # padded: no row shorter than half its chunk's longest (no doubling by padding)
        rows = [lengths[r] for r in padded.query_order[start : start + size].tolist()]
        assert 2 * min(rows) >= max(rows)
        start += size
    assert len(sizes) < 6
    with pytest.raises(ValueError, match="query_chunk_size is required"):
        ChunkCollator(model, query_chunk_size=None)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("resolution", ["native", "low"])
def test_count_tokens_without_pixels_equals_the_prepared_length(family: str, resolution: str) -> None:
    from vlm2vec.backbones import ProcessorSettings

    model = VLM2Vec.tiny(family, settings=ProcessorSettings(resolution))
    assert model.family.count_tokens is not None  # the Qwen families count from image sizes alone
    rows = [
        ("<|video_1|> what happens", None, pics(5, 3, size=(60, 34))),
        ("<|video_1|> one frame", None, pics(1, 4, size=(29, 83))),
        ("two: <|image_1|> and <|image_2|>", pics(2, 5, size=(111, 47)), None),
        ("<|image_1|> a tall one", pics(1, 6, size=(20, 200))[0], None),
        ("just text, no pictures at all", None, None),
    ]
    for text, images, video in rows:
        prepared = model.prepare([text], [images], videos=[video] if video is not None else None)
        assert model.count_tokens(text, images, video) == prepared["input_ids"].shape[1], text
