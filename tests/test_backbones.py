"""Backbone families on tiny random models (fp32, CPU): pooling, padding sides, mixed text/image
batches, packing, length checks, the registry, and the Phi-3.5-V parts built from stock transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec.backbones import (
    FAMILIES,
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    RESOLUTIONS,
    BackboneFamily,
    ProcessorSettings,
    family_of,
    get_family,
    register_family,
    tiny_families,
)
from vlm2vec.model import VLM2Vec

ALL = tiny_families()
ATOL = 2e-5  # fp32, different padded lengths change the reduction order of attention


def image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def mixed_rows() -> tuple[list[str], list[Image.Image | None]]:
    texts = [
        "<|image_1|> Represent the given image.",
        "a dog runs on the grass next to a small red car in the city at night",
        "<|image_1|> What is shown in this picture?",
        "two cats",
    ]
    return texts, [image(60, 130, 1), None, image(56, 56, 2), None]


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: VLM2Vec.tiny(name) for name in ALL}


def test_builtin_families_are_registered_with_their_facts() -> None:
    assert set(ALL) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "phi3_v"}
    for name in ALL:
        fam = get_family(name)
        assert fam.name == name and name in FAMILIES
        assert fam.padding_side in ("left", "right") and fam.lora_targets
    # the reference's bare pad (VLM2Vec's layout; the wrapped one is prompt_layout="native")
    assert get_family("qwen2_vl").image_token == "<|image_pad|>"
    assert get_family("llava_next").image_token == "<image>"
    assert get_family("phi3_v").image_token == "<|image_1|>"
    assert get_family("phi3_v").default_settings.num_crops == 4
    q = get_family("qwen2_vl").default_settings
    assert (q.min_pixels, q.max_pixels) == (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS) == (4 * 28 * 28, 1280 * 28 * 28)
    assert get_family("qwen3_vl").default_settings.max_pixels == 1280 * 32 * 32  # same token budget, patch 16
    assert RESOLUTIONS["low"] == (336, 336) and RESOLUTIONS["high"] == (1344, 1344)
    with pytest.raises(ValueError, match="unknown backbone family"):
        get_family("nope")


def test_register_family_and_detection(models: dict, tmp_path) -> None:
    for name, model in models.items():
        assert family_of(model.hf_model.config) is get_family(name)
    fam = get_family("llava_next")
    with pytest.raises(ValueError, match="already registered"):
        register_family(BackboneFamily(**{**fam.__dict__}))
    with pytest.raises(TypeError):
        register_family("llava_next")
    with pytest.raises(ValueError, match="padding_side"):
        BackboneFamily(**{**fam.__dict__, "name": "x", "padding_side": "middle"})
    custom = register_family(
        BackboneFamily(**{**fam.__dict__, "name": "test_custom", "model_types": ("zzz",)})
    )
    try:
        assert get_family("test_custom") is custom
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "zzz"}))
        assert family_of(str(tmp_path)) is custom  # plain checkpoint dir: via config.model_type
    finally:
        FAMILIES.pop("test_custom")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "unknown_vlm"}))
    with pytest.raises(ValueError, match="unknown_vlm"):
        family_of(str(tmp_path))


def test_settings_validation() -> None:
    assert ProcessorSettings("low").image_size == (336, 336)
    assert ProcessorSettings().image_size is None
    with pytest.raises(ValueError, match="resolution"):
        ProcessorSettings("medium")
    with pytest.raises(ValueError, match="num_crops"):
        ProcessorSettings(num_crops=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ALL)
def test_pooling_picks_last_real_token(models: dict, name: str, side: str) -> None:
    model = models[name]
    model.padding_side = side
    texts, images = mixed_rows()
    lengths = [model.prepare([t], [i])["input_ids"].shape[1] for t, i in zip(texts, images)]
    inputs = model.prepare(texts, images)
    width = inputs["input_ids"].shape[1]
    assert width == max(lengths)  # padded only to this call's longest row
    expected = [width - 1 if side == "left" else n - 1 for n in lengths]
    with torch.no_grad():
        hidden = model.family.hidden_states(model.hf_model, inputs)
        try:
            model.normalize, model.pooling = False, "last"
            last = model(inputs)
            model.pooling = "mean"
            mean = model(inputs)
        finally:
            model.normalize, model.pooling = True, "last"
    for row, idx in enumerate(expected):
        torch.testing.assert_close(last[row], hidden[row, idx], rtol=0, atol=0)
        real = slice(width - lengths[row], width) if side == "left" else slice(0, lengths[row])
        torch.testing.assert_close(mean[row], hidden[row, real].mean(0), rtol=1e-5, atol=1e-6)
    model.padding_side = model.family.padding_side


@pytest.mark.parametrize("name", ALL)
def test_mixed_batch_equals_rows_alone_both_sides_and_packed(models: dict, name: str) -> None:
    model = models[name]
    texts, images = mixed_rows()
    with torch.no_grad():
        alone = torch.cat([model(model.prepare([t], [i])) for t, i in zip(texts, images)])
        assert (alone[0] - alone[2]).abs().max() > 1e-3  # different images give different vectors
        for side in ("left", "right"):
            model.padding_side = side
            torch.testing.assert_close(model(model.prepare(texts, images)), alone, rtol=0, atol=ATOL)
        packed = model.prepare(texts, images, packed=True)
        assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
        torch.testing.assert_close(model(packed), alone, rtol=0, atol=ATOL)
    model.padding_side = model.family.padding_side


@pytest.mark.parametrize("name", ALL)
def test_vision_tower_runs_only_for_image_rows(models: dict, name: str) -> None:
    model = models[name]
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, args, kwargs_out: calls.append(args))
    try:
        with torch.no_grad():
            model(model.prepare(["just text", "more text here"]))
            assert calls == []
            texts, images = mixed_rows()
            inputs = model.prepare(texts, images)
            model(inputs)
    finally:
        hook.remove()
    assert len(calls) == 1
    n_images = sum(i is not None for i in images)
    grid = inputs.get("image_grid_thw")
    assert (grid.shape[0] if grid is not None else inputs["pixel_values"].shape[0]) == n_images


@pytest.mark.parametrize("name", ALL)
def test_max_len_counts_text_tokens_and_never_cuts_image_tokens(models: dict, name: str) -> None:
    """max_len is the paper's max text length: an image row keeps all its image tokens and its first
    max_len text tokens (no row is refused for its image); a text-only row is cut to max_len."""
    model = models[name]
    texts, images = mixed_rows()
    old = model.max_len

    def length(k: int, row: int) -> int:
        model.max_len = k
        return int(model.prepare([texts[row]], [images[row]])["attention_mask"].sum())

    try:
        model.max_len = 4
        model.prepare(texts, images)  # every row fits: image tokens do not count toward max_len
        whole = length(10_000, 2)
        one = length(1, 2)
        assert one > 4 and length(4, 2) == one + 3  # 1 vs 4 text tokens beside the same image tokens
        assert whole - one + 1 > 4 and length(whole, 2) == whole  # the row has more than 4 text tokens
        assert length(4, 1) == 4  # text-only rows are truncated, not rejected
    finally:
        model.max_len = old


@pytest.mark.parametrize("name", ALL)
def test_placeholder_rules(models: dict, name: str) -> None:
    model = models[name]
    with pytest.raises(ValueError, match="row 1.*no image"):
        model.prepare(["text", "<|image_1|> caption"], [None, None])
    with pytest.raises(ValueError, match="row 0.*image placeholders"):
        model.prepare(["<|image_1|> <|image_1|>"], [image(56, 56, 0)])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        model.prepare(["<|image_1|>"], [np.zeros((4, 4, 3))])
    img = image(56, 56, 3)
    with torch.no_grad():
        explicit = model(model.prepare(["<|image_1|> a photo"], [img]))
        implicit = model(model.prepare(["a photo"], [img]))  # placeholder prepended
        native = model(model.prepare([f"{model.family.image_token} a photo"], [img]))  # already replaced
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    torch.testing.assert_close(native, explicit, rtol=0, atol=0)


def test_resolution_presets_resize_before_processing(models: dict) -> None:
    model = models["llava_next"]
    img = image(40, 90, 4)
    native = model.prepare(["<|image_1|>"], [img])["image_sizes"]
    try:
        model.settings = ProcessorSettings("low")
        low = model.prepare(["<|image_1|>"], [img])["image_sizes"]
    finally:
        model.settings = ProcessorSettings()
    assert native.tolist() == [[40, 90]] and low.tolist() == [[336, 336]]
    qwen = models["qwen2_vl"]
    try:
        qwen.settings = ProcessorSettings(min_pixels=56 * 56, max_pixels=56 * 56)
        grid = qwen.prepare(["<|image_1|>"], [image(200, 200, 5)])["image_grid_thw"]
    finally:
        qwen.settings = ProcessorSettings()
    assert grid.tolist() == [[1, 4, 4]]  # 56x56 pixels = 4x4 patches of 14


# --------------------------------------------------------------------------------------- Phi-3.5-V
def test_phi3_v_hd_transform_matches_released_token_arithmetic() -> None:
    from vlm2vec.phi3_v import Phi3VImageProcessor

    ip = Phi3VImageProcessor(num_crops=4)  # released sizes: 336 crops, 12x12 merged tokens per crop
    out = ip([image(500, 1000, 6)])  # ratio 2 -> 2 crops of 336 side by side
    assert out["image_sizes"].tolist() == [[336, 672]]
    assert out["num_img_tokens"] == [(2 + 1) * 144 + 1 + (1 + 1) * 12] == [457]
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert out["pixel_values"][0, 3:].abs().sum() == 0  # padding crops
    tall = ip([image(900, 300, 7)], num_crops=16)
    h, w = tall["image_sizes"][0].tolist()
    assert h % 336 == 0 and w % 336 == 0 and (h // 336) * (w // 336) <= 16 and h > w
    # the white padding band is normalised white in every channel
    wide = ip([image(100, 1000, 8)], num_crops=4)["pixel_values"][0, 1]
    white = (1.0 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    torch.testing.assert_close(wide[:, 0, 0], white)


def test_phi3_v_module_names_follow_released_layout(models: dict) -> None:
    import re

    from vlm2vec.phi3_v import RELEASED_LAYOUT, convert_released_state_dict, released_name

    model = models["phi3_v"].hf_model
    keys = list(model.state_dict())
    released = [released_name(k) for k in keys]
    for key in released:
        assert any(re.fullmatch(p, key) for p in RELEASED_LAYOUT), key
    for pattern in RELEASED_LAYOUT:
        assert any(re.fullmatch(pattern, k) for k in released), pattern
    sd = {r: torch.zeros(1) for r in released}
    sd["model.vision_embed_tokens.wte.weight"] = torch.zeros(1)
    assert set(convert_released_state_dict(sd, model)) == set(keys)  # wte alias dropped, names mapped back
    with pytest.raises(ValueError, match="unexpected key"):
        convert_released_state_dict({"model.layers.0.self_attn.q_proj.weight": torch.zeros(1)}, model)


def test_phi3_v_loads_a_released_style_directory(models: dict, tmp_path) -> None:
    """A directory laid out like microsoft/Phi-3.5-vision-instruct (remote-code config fields, longrope,
    released weight names with the `wte` alias, released preprocessor config) loads without remote code,
    through from_pretrained and through the explicit mapping."""
    from safetensors.torch import save_file

    from vlm2vec import VLM2Vec
    from vlm2vec.phi3_v import Phi3VConfig, Phi3VForCausalLM, load_released_weights, released_name

    src = models["phi3_v"]
    cfg = src.hf_model.config.to_dict()
    head_half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    cfg.update(
        architectures=["Phi3VForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * head_half,
            "long_factor": [2.0] * head_half,
        },
    )
    cfg.pop("rope_parameters", None)
    cfg.pop("image_token_id", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {released_name(k): v.contiguous() for k, v in src.hf_model.state_dict().items()}
    assert "model.vision_embed_tokens.img_processor.vision_model.embeddings.class_embedding" in state
    state["model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    src.processor.tokenizer.save_pretrained(str(tmp_path))
    ip = src.processor.image_processor
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
                "image_processor_type": "Phi3VImageProcessor",
                "num_crops": 4,
                "do_convert_rgb": True,
                "image_mean": list(ip.image_mean),
                "image_std": list(ip.image_std),
                "crop_size": ip.crop_size,
                "tokens_per_side": ip.tokens_per_side,
            }
        )
    )
    assert not os.path.exists(tmp_path / "vlm2vec.json")
    loaded = VLM2Vec.from_pretrained(str(tmp_path))
    assert loaded.family.name == "phi3_v" and loaded.settings.num_crops == 4
    texts, images = mixed_rows()
    expected = src.encode(texts, images, show_progress=False)
    torch.testing.assert_close(loaded.encode(texts, images, show_progress=False), expected, rtol=0, atol=1e-6)
    explicit = Phi3VForCausalLM(Phi3VConfig.from_pretrained(str(tmp_path)))
    load_released_weights(explicit, str(tmp_path))
    for key, value in src.hf_model.state_dict().items():
        torch.testing.assert_close(explicit.state_dict()[key], value, rtol=0, atol=0)
