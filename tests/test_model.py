"""VLM2Vec encoder API on tiny random models (fp32, CPU): encode + backward, save/load round trip,
replay of frozen vision features, full fine-tuning, attention choice and argument errors."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec import VLM2Vec
from vlm2vec.backbones import tiny_families
from vlm2vec.model import last_token_index, pool, resolve_attn_implementation

ALL = tiny_families()


def image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


TEXTS = [
    "<|image_1|> Represent the given image.",
    "a dog on the grass",
    "<|image_1|> Find the caption.",
    "two cats sleep on a blue sofa",
    "a man rides a bicycle",
]
IMAGES = [image(60, 90, 1), None, image(56, 112, 2), None, None]


@pytest.mark.parametrize("name", ALL)
def test_encode_and_backward(name: str) -> None:
    model = VLM2Vec.tiny(name)
    emb = model.encode(TEXTS, IMAGES, batch_size=2, show_progress=False)
    assert emb.shape == (5, model.embedding_dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    assert torch.isfinite(emb).all() and torch.pdist(emb).min() > 1e-3  # rows differ
    in_order = model.encode(TEXTS, IMAGES, batch_size=2, show_progress=False, sort_by_length=False)
    torch.testing.assert_close(in_order, emb, rtol=0, atol=2e-5)  # batching by length keeps the row order
    torch.testing.assert_close(model.encode(TEXTS[1:2], show_progress=False)[0], emb[1], rtol=0, atol=2e-5)
    assert model.training is False  # VLM2Vec.tiny() returns an eval model; encode restores the mode it found
    model.train()
    model.encode(TEXTS[:1], IMAGES[:1], show_progress=False)
    assert model.training is True
    out = model(model.prepare(TEXTS, IMAGES))
    (out @ out.T).logsumexp(-1).sum().backward()
    tower = {id(p) for p in model.vision_tower.parameters()}
    used = [p for n, p in model.named_parameters() if id(p) not in tower and "lm_head" not in n]
    assert used and all(p.requires_grad and p.grad is not None for p in used)  # incl. projector, separators
    assert model.hf_model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = VLM2Vec.tiny(name, pooling="mean", max_len=77)
    model.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / "vlm2vec.json").read_text())
    assert meta["family"] == name and meta["pooling"] == "mean" and meta["max_len"] == 77
    loaded = VLM2Vec.from_pretrained(str(tmp_path))
    assert loaded.family is model.family and loaded.pooling == "mean" and loaded.max_len == 77
    assert loaded.padding_side == model.padding_side
    torch.testing.assert_close(
        loaded.encode(TEXTS, IMAGES, show_progress=False),
        model.encode(TEXTS, IMAGES, show_progress=False),
        rtol=0,
        atol=0,
    )
    override = VLM2Vec.from_pretrained(str(tmp_path), pooling="last", dtype=torch.bfloat16, device="cpu")
    assert override.pooling == "last" and override.dtype == torch.bfloat16
    emb = override.encode(TEXTS, IMAGES, show_progress=False)
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "llava_next", "phi3_v"])
def test_reuse_vision_features_replays_the_frozen_tower(name: str) -> None:
    model = VLM2Vec.tiny(name).train()
    inputs = model.prepare(TEXTS, IMAGES)
    torch.manual_seed(0)
    reference = model(inputs)
    reference.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    tower = model.vision_tower
    calls = []
    first_layer = next(iter(tower.children()))  # runs only when the tower really computes
    hook = first_layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with model.reuse_vision_features() as stats:
            with torch.no_grad():
                first = model(inputs)  # GradCache's no-grad pass
            torch.manual_seed(0)
            second = model(inputs)  # re-forward with grad: tower replayed
            second.sum().backward()
            model(model.prepare(TEXTS[:1], [image(56, 56, 9)]))  # a different image is computed
    finally:
        hook.remove()
    assert stats == {"computed": 2, "reused": 1}
    assert len(calls) == 2  # the real tower ran twice, not three times
    assert "forward" not in tower.__dict__  # restored
    torch.testing.assert_close(first, reference.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(second, reference, rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7)


def test_full_finetuning_and_trainable_tower_refuses_reuse() -> None:
    model = VLM2Vec.tiny("llava_next")
    model.enable_full_finetuning()
    assert all(p.requires_grad for n, p in model.named_parameters() if "language_model" in n)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    model.enable_full_finetuning(train_vision=True)
    assert all(p.requires_grad for p in model.vision_tower.parameters())
    with pytest.raises(ValueError, match="trainable"):
        with model.reuse_vision_features():
            pass
    model.gradient_checkpointing_enable().train()
    out = model(model.prepare(TEXTS, IMAGES))
    out.sum().backward()
    assert next(model.vision_tower.parameters()).grad is not None


def test_pool_helpers_left_right_packed() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 3]
    hidden = torch.arange(24.0).reshape(3, 4, 2)
    torch.testing.assert_close(pool(hidden, {"attention_mask": mask}, "last"), hidden[[0, 1, 2], [3, 2, 3]])
    torch.testing.assert_close(pool(hidden, {"attention_mask": mask}, "mean")[1], hidden[1, :3].mean(0))
    packed = hidden.reshape(1, 12, 2)
    cu = torch.tensor([0, 5, 7, 12])
    torch.testing.assert_close(pool(packed, {"cu_seqlens": cu}, "last"), packed[0, [4, 6, 11]])
    torch.testing.assert_close(pool(packed, {"cu_seqlens": cu}, "mean")[1], packed[0, 5:7].mean(0))


def test_attention_implementation_choice(monkeypatch) -> None:
    assert resolve_attn_implementation(None, "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda") == "eager"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable
    assert resolve_attn_implementation("auto", "cuda") == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # importable
    assert resolve_attn_implementation(None, "cuda") == "flash_attention_2"
    assert resolve_attn_implementation(None, "cpu") == "sdpa"


def test_eager_attention_gives_the_same_embeddings(tmp_path) -> None:
    model = VLM2Vec.tiny("qwen2_vl")
    model.save_pretrained(str(tmp_path))
    eager = VLM2Vec.from_pretrained(str(tmp_path), attn_implementation="eager")
    assert eager.hf_model.config._attn_implementation == "eager"
    torch.testing.assert_close(
        eager.encode(TEXTS, IMAGES, show_progress=False),
        model.encode(TEXTS, IMAGES, show_progress=False),
        rtol=0,
        atol=2e-5,
    )


def test_argument_errors(tmp_path) -> None:
    model = VLM2Vec.tiny("qwen2_vl")
    with pytest.raises(TypeError, match="list of strings"):
        model.encode("one string", show_progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        model.prepare(["a", 3])
    with pytest.raises(ValueError, match="images has 1 entries but texts has 2"):
        model.prepare(["a", "b"], [None])
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["a"], batch_size=0, show_progress=False)
    with pytest.raises(ValueError, match="pooling"):
        VLM2Vec.tiny("qwen2_vl", pooling="cls")
    with pytest.raises(ValueError, match="max_len"):
        VLM2Vec.tiny("qwen2_vl", max_len=0)
    with pytest.raises(ValueError, match="quantization"):
        VLM2Vec.from_pretrained(str(tmp_path), quantization="int3")
    with pytest.raises(ValueError, match="merge_lora"):
        model.merge_lora()
    assert model.encode([], show_progress=False).shape == (0, model.embedding_dim)
    os.makedirs(tmp_path / "empty", exist_ok=True)
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="names no base model"):
        VLM2Vec.from_pretrained(str(tmp_path / "empty"))


def test_tiny_builds_other_sizes_through_the_family_builder():
    """`VLM2Vec.tiny(..., build=...)` is how benchmarks get a released model's sizes (bench/train_step.py):
    the overrides reach the config, and the model still encodes an image row."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    build = dict(
        text_dims=dict(hidden_size=128, num_attention_heads=4, intermediate_size=192, rope_parameters=rope),
        vision_dims=dict(hidden_size=128),
    )
    model = VLM2Vec.tiny("qwen2_vl", build=build)
    assert model.hf_model.config.text_config.hidden_size == 128
    assert model.hf_model.config.vision_config.hidden_size == 128
    emb = model.encode(["<|image_1|> what is it?"], [Image.new("RGB", (56, 56), "red")], show_progress=False)
    assert emb.shape == (1, 128) and torch.isfinite(emb).all()


def test_alignment_names_stay_importable_from_model() -> None:
    """The ZeRO-3 alignment lives in vision_alignment.py; the trainer still imports its names from
    vlm2vec.model, so they must be the same objects there."""
    from vlm2vec import model, vision_alignment

    assert model.DUMMY_VISION_KEY is vision_alignment.DUMMY_VISION_KEY
    assert model.visual_calls is vision_alignment.visual_calls
    assert model.visual_calls({"input_ids": 0, "pixel_values": 1, "pixel_values_videos": 2}) == 2
    assert model.visual_calls({"input_ids": 0}) == 0


def test_feature_replay_without_a_tower_counts_nothing() -> None:
    """A text-only backbone (no vision tower) enters the replay block as a no-op with zero counters."""
    from vlm2vec.feature_replay import replay_frozen_features

    with replay_frozen_features(None) as stats:
        pass
    assert stats == {"computed": 0, "reused": 0}
