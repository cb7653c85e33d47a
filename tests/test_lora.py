"""LoRA / DoRA (peft) and QLoRA (bitsandbytes NF4, CPU) on tiny random models of every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec import VLM2Vec
from vlm2vec.backbones import tiny_families
from vlm2vec.lora import lora_target_names

ALL = tiny_families()


def image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


TEXTS = ["<|image_1|> Represent the given image.", "a dog on the grass", "two cats on a blue sofa"]
IMAGES = [image(60, 90, 1), None, None]


def embed(model: VLM2Vec) -> torch.Tensor:
    return model.encode(TEXTS, IMAGES, show_progress=False)


@pytest.mark.parametrize("name", ALL)
def test_lora_save_load_merge_reproduces_embeddings(name: str, tmp_path) -> None:
    model = VLM2Vec.tiny(name)
    base = embed(model)
    model.add_lora(r=4, alpha=8, init=False)  # random B: the adapter changes the output
    adapted = embed(model)
    assert (adapted - base).abs().max() > 1e-2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    tower_names = {n for n, _ in model.vision_tower.named_modules()}
    assert not any("lora" in n for n in tower_names)  # vision tower untouched
    model.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / "vlm2vec.json").read_text())
    assert meta["base"] == "base" and (tmp_path / "adapter_config.json").exists()
    loaded = VLM2Vec.from_pretrained(str(tmp_path))
    assert loaded.is_peft and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(embed(loaded), adapted, rtol=0, atol=1e-6)
    loaded.merge_lora()
    assert not loaded.is_peft
    torch.testing.assert_close(embed(loaded), adapted, rtol=0, atol=1e-5)
    loaded.save_pretrained(str(tmp_path / "merged"))  # merged = a plain full model again
    torch.testing.assert_close(
        embed(VLM2Vec.from_pretrained(str(tmp_path / "merged"))), adapted, rtol=0, atol=1e-5
    )
    trainable_again = VLM2Vec.from_pretrained(str(tmp_path), is_trainable=True)
    assert any(p.requires_grad for p in trainable_again.parameters())


def test_adapter_of_a_saved_base_records_the_base_path(tmp_path) -> None:
    VLM2Vec.tiny("qwen2_vl").save_pretrained(str(tmp_path / "base_model"))
    model = VLM2Vec.from_pretrained(str(tmp_path / "base_model")).add_lora(init=False)
    model.save_pretrained(str(tmp_path / "adapter"))
    meta = json.loads((tmp_path / "adapter" / "vlm2vec.json").read_text())
    assert meta["base"] == str(tmp_path / "base_model") and not (tmp_path / "adapter" / "base").exists()
    torch.testing.assert_close(
        embed(VLM2Vec.from_pretrained(str(tmp_path / "adapter"))), embed(model), rtol=0, atol=1e-6
    )


def test_dora_and_gaussian_init(tmp_path) -> None:
    model = VLM2Vec.tiny("llava_next")
    base = embed(model)
    model.add_lora()  # paper defaults: r=8, alpha=16, dropout=0.1, gaussian init (B = 0)
    config = model.backbone.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (
        8,
        16,
        0.1,
        "gaussian",
    )
    assert set(n.rsplit(".", 1)[-1] for n in config.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "down_proj",
    }
    torch.testing.assert_close(embed(model), base, rtol=0, atol=1e-6)  # identity at init
    dora = VLM2Vec.tiny("llava_next").add_lora(dora=True, init=False, targets=["q_proj", "v_proj"])
    assert dora.backbone.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())
    adapted = embed(dora)
    dora.save_pretrained(str(tmp_path))
    loaded = VLM2Vec.from_pretrained(str(tmp_path))
    torch.testing.assert_close(embed(loaded), adapted, rtol=0, atol=1e-6)
    torch.testing.assert_close(embed(loaded.merge_lora()), adapted, rtol=0, atol=1e-5)


def test_target_resolution_skips_the_vision_tower() -> None:
    model = VLM2Vec.tiny("llava_next")
    every = lora_target_names(model.hf_model, ["q_proj"])
    lm_only = lora_target_names(model.hf_model, ["q_proj"], exclude=model.vision_tower)
    assert any("vision_tower" in n for n in every)  # CLIP uses q_proj too
    assert lm_only and not any("vision_tower" in n for n in lm_only) and len(lm_only) == 2
    with pytest.raises(ValueError, match="match no Linear"):
        model.add_lora(targets=["nothing_like_this"])
    with pytest.raises(ValueError, match="init"):
        model.add_lora(init="uniform")
    with pytest.raises(ValueError, match="r must be"):
        model.add_lora(r=0)
    model.add_lora()
    with pytest.raises(ValueError, match="already has a LoRA"):
        model.add_lora()
    with pytest.raises(ValueError, match="merge_lora"):
        model.enable_full_finetuning()


@pytest.mark.parametrize("name", ALL)
def test_qlora_nf4_forward_backward_reaches_lora_only(name: str, tmp_path) -> None:
    import bitsandbytes as bnb

    VLM2Vec.tiny(name).save_pretrained(str(tmp_path / "base"))
    model = VLM2Vec.from_pretrained(str(tmp_path / "base"), quantization="nf4")
    four_bit = [n for n, m in model.hf_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and not any(n.startswith(("model.visual", "model.vision", "lm_head")) for n in four_bit)
    model.add_lora(init=False).train()
    out = model(model.prepare(TEXTS, IMAGES))
    assert torch.isfinite(out).all()
    (out[0] @ out[1:].T).sum().backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n
    )
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    model.eval()
    adapted = embed(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = VLM2Vec.from_pretrained(str(tmp_path / "adapter"), quantization="nf4")
    torch.testing.assert_close(embed(reloaded), adapted, rtol=0, atol=1e-5)
