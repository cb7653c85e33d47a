"""Token rows and positions of one image / video row, per family, against the VLM2Vec reference's own
construction written out by hand (main src/model/processor.py, v1 src/model_utils.py, the reference's
vendored Qwen2-VL get_rope_index), at the released processor settings (Qwen2-VL: patch 14, merge 2,
temporal patch 2, pixels 4*28*28..1280*28*28; LLaVA-NeXT: 336 crops, llava-v1.6 pinpoints; Phi-3.5-V:
336 crops, 4 crops). Plus: the layout is recorded in a saved model and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec.backbones import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, ProcessorSettings, get_family
from vlm2vec.families import qwen
from vlm2vec.model import META_FILE, VLM2Vec

TEXT = " Represent the given image."
QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def released_qwen(name: str, layout: str) -> VLM2Vec:
    """A tiny Qwen model whose processor runs at the released settings (patch 14 / 16, merge 2,
    temporal patch 2, 4..1280 merged tokens)."""
    unit = (16 if name == "qwen3_vl" else 14) * 2
    settings = ProcessorSettings("native", 4 * unit * unit, 1280 * unit * unit, prompt_layout=layout)
    return VLM2Vec.tiny(name, settings=settings)


def ids_of(model: VLM2Vec, *tokens: str) -> list[int]:
    return model.processor.tokenizer.convert_tokens_to_ids(list(tokens))


def text_ids(model: VLM2Vec, text: str) -> list[int]:
    return model.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def positions(model: VLM2Vec, inputs: dict) -> torch.Tensor:
    """[3, N, L] positions the model gets (1-D positions are repeated on the three rope axes, as the
    model does with a [N, L] position tensor)."""
    pos = qwen.position_ids(model.hf_model.model, inputs)
    return pos.expand(3, -1, -1) if pos.ndim == 2 else pos


# ------------------------------------------------------------------------------------------- Qwen
@pytest.mark.parametrize("name", QWEN_FAMILIES)
def test_qwen_reference_layout_image_row_is_a_bare_pad_run_with_1d_positions(name: str) -> None:
    model = released_qwen(name, "reference")
    # 60x100 (h x w): Qwen2-VL smart_resize to multiples of 28 -> 56x112 = 2x4 merged tokens = 8;
    # Qwen3-VL (32 px per merged token): 64x96 -> 2x3 = 6
    n = 6 if name == "qwen3_vl" else 8
    inputs = model.prepare([f"<|image_1|>{TEXT}"], [image(60, 100)])
    # reference: "<|image_pad|> Represent..." (processor.py:65-90, process_input_text), pad run expanded
    # by the processor, no vision start / end, no BOS (Qwen tokenizers add none)
    (pad,) = ids_of(model, "<|image_pad|>")
    expected = [pad] * n + text_ids(model, TEXT)
    assert inputs["input_ids"][0].tolist() == expected
    # reference get_rope_index: no <|vision_start|> -> image_nums = 0 -> arange on all three axes
    length = len(expected)
    assert positions(model, inputs).tolist() == [[list(range(length))]] * 3
    # get_rope_index of transformers 5 would give these runs 2-D M-RoPE: ours must not call it here
    rope, _ = model.hf_model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    assert rope.tolist() != positions(model, inputs).tolist()


@pytest.mark.parametrize("name", QWEN_FAMILIES)
def test_qwen_native_layout_image_row_is_wrapped_with_mrope_positions(name: str) -> None:
    model = released_qwen(name, "native")
    inputs = model.prepare([f"<|image_1|>{TEXT}"], [image(60, 100)])
    rows, cols = (2, 3) if name == "qwen3_vl" else (2, 4)
    start, pad, end = ids_of(model, "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    text = text_ids(model, TEXT)
    assert inputs["input_ids"][0].tolist() == [start] + [pad] * (rows * cols) + [end] + text
    # Qwen's M-RoPE: vision start at 0; image token (r, c) at (t, h, w) = (1, 1 + r, 1 + c); the text
    # after it continues from the largest image position + 1
    t = [0] + [1] * (rows * cols)
    h = [0] + [1 + r for r in range(rows) for _ in range(cols)]
    w = [0] + [1 + c for _ in range(rows) for c in range(cols)]
    after = max(rows, cols) + 1
    tail = list(range(after, after + 1 + len(text)))
    assert positions(model, inputs).tolist() == [[t + tail], [h + tail], [w + tail]]


@pytest.mark.parametrize("name", QWEN_FAMILIES)
def test_qwen_left_padding_keeps_the_reference_row_positions(name: str) -> None:
    model = released_qwen(name, "reference")
    long_text = "a dog runs on the grass next to a small red car in the city at night " * 3
    inputs = model.prepare([f"<|image_1|>{TEXT}", long_text], [image(60, 100), None])
    mask = inputs["attention_mask"][0].bool()
    real = positions(model, inputs)[:, 0, mask]
    assert real.tolist() == [list(range(int(mask.sum())))] * 3
    with torch.no_grad():  # and the batched row embeds as the row alone
        alone = model(model.prepare([f"<|image_1|>{TEXT}"], [image(60, 100)]))
        torch.testing.assert_close(model(inputs)[:1], alone, rtol=0, atol=2e-5)
        packed = model(model.prepare([f"<|image_1|>{TEXT}", long_text], [image(60, 100), None], packed=True))
        torch.testing.assert_close(packed[:1], alone, rtol=0, atol=2e-5)


def test_qwen2_vl_reference_video_row_is_a_bare_pad_run_with_1d_positions() -> None:
    model = released_qwen("qwen2_vl", "reference")
    frames = [image(56, 56, k) for k in range(4)]
    inputs = model.prepare(["<|video_1|> Describe the video."], videos=[frames])
    # reference: "<|video_pad|> Describe..." (VLM_VIDEO_TOKENS, process_input_text); 4 frames of 56x56
    # -> grid (t, h, w) = (4 / 2, 4, 4) -> 2 * 16 / 4 = 8 pads
    (pad,) = ids_of(model, "<|video_pad|>")
    expected = [pad] * 8 + text_ids(model, " Describe the video.")
    assert inputs["input_ids"][0].tolist() == expected
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert positions(model, inputs).tolist() == [[list(range(len(expected)))]] * 3
    native = released_qwen("qwen2_vl", "native").prepare(["<|video_1|> Describe the video."], videos=[frames])
    start, end = ids_of(model, "<|vision_start|>", "<|vision_end|>")
    assert native["input_ids"][0].tolist() == [start] + [pad] * 8 + [end] + expected[8:]


def test_qwen3_vl_reference_video_has_no_timestamps_native_has_them() -> None:
    frames = [image(64, 64, k) for k in range(4)]
    ref = released_qwen("qwen3_vl", "reference")
    native = released_qwen("qwen3_vl", "native")
    (pad,) = ids_of(ref, "<|video_pad|>")
    ref_ids = ref.prepare(["<|video_1|> clip"], videos=[frames])["input_ids"][0].tolist()
    assert ref_ids == [pad] * 8 + text_ids(ref, " clip")
    native_ids = native.prepare(["<|video_1|> clip"], videos=[frames])["input_ids"][0]
    native_text = native.processor.tokenizer.decode(native_ids)
    assert "<0.5 seconds><|vision_start|>" in native_text and "<2.5 seconds><|vision_start|>" in native_text


def test_qwen_small_images_are_resized_to_56_as_the_reference() -> None:
    model = released_qwen("qwen2_vl", "reference")
    # processor.py:328-331: a side under 28 px -> the image becomes 56x56 -> 4x4 patches
    grid = model.prepare(["<|image_1|>"], [image(20, 300)])["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]
    assert model.count_tokens("<|image_1|>", image(20, 300)) == 4


def test_qwen_defaults_follow_the_reference() -> None:
    fam = get_family("qwen2_vl")
    assert (fam.default_settings.min_pixels, fam.default_settings.max_pixels) == (4 * 784, 1280 * 784)
    assert (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS) == (4 * 28 * 28, 1280 * 28 * 28)
    assert fam.default_settings.prompt_layout == "reference" and fam.image_token == "<|image_pad|>"
    assert get_family("qwen2_5_vl").default_settings.prompt_layout == "reference"
    assert get_family("qwen3_vl").default_settings.prompt_layout == "native"  # no reference recipe
    assert VLM2Vec.tiny("qwen2_vl").settings.prompt_layout == "reference"
    assert VLM2Vec.tiny("llava_next").settings.prompt_layout == "reference"
    model = VLM2Vec.tiny("qwen3_vl")
    model.settings = ProcessorSettings("low")  # a layout left open resolves to the family's, on assignment
    assert model.settings.prompt_layout == "native" and model.settings.resolution == "low"
    with pytest.raises(ValueError, match="prompt_layout"):
        ProcessorSettings(prompt_layout="chat")


@pytest.mark.parametrize("layout", ["reference", "native"])
def test_saved_model_reloads_with_its_layout(tmp_path, layout: str) -> None:
    model = released_qwen("qwen2_vl", layout)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / META_FILE).read_text())["settings"]["prompt_layout"] == layout
    loaded = VLM2Vec.from_pretrained(str(tmp_path))
    assert loaded.settings.prompt_layout == layout
    args = (["<|image_1|> a photo"], [image(60, 100)])
    assert torch.equal(loaded.prepare(*args)["input_ids"], model.prepare(*args)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(loaded.prepare(*args)), model(model.prepare(*args)), rtol=0, atol=0)
    other = "native" if layout == "reference" else "reference"
    assert VLM2Vec.from_pretrained(str(tmp_path), prompt_layout=other).settings.prompt_layout == other


def test_a_model_saved_before_layouts_were_recorded_reloads_native(tmp_path) -> None:
    model = released_qwen("qwen2_vl", "native")
    model.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["settings"]["prompt_layout"]  # what this code wrote before the setting existed
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    assert VLM2Vec.from_pretrained(str(tmp_path)).settings.prompt_layout == "native"


# ------------------------------------------------------------------------------------- LLaVA-NeXT
def released_llava() -> VLM2Vec:
    """The tiny LLaVA-NeXT model with the processor arithmetic of llava-hf/llava-v1.6-mistral-7b-hf
    (336 crops, patch 14, its anyres pinpoints, CLS dropped by the `default` strategy)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    model = VLM2Vec.tiny("llava_next", settings=ProcessorSettings("high"))
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    model.processor = LlavaNextProcessor(
        image_processor=ip, tokenizer=model.processor.tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    return model


def test_llava_next_image_row_matches_the_reference() -> None:
    model = released_llava()
    inputs = model.prepare([f"<|image_1|>{TEXT}"], [image(90, 200)])
    # reference: "<|image_1|>" -> "<image>" in place (v1 dataset.py:126), spacing kept; high resolution
    # resizes to 1344x1344 (v1 dataset.py:16-20) -> best pinpoint 672x672 -> base 24*24 = 576 features +
    # a 48x48 anyres grid with one newline per row (48*48 + 48) = 2928 `<image>` tokens after the BOS
    tok = model.processor.tokenizer
    (image_id,) = ids_of(model, "<image>")
    expected = [tok.bos_token_id] + [image_id] * 2928 + text_ids(model, TEXT)
    assert inputs["input_ids"][0].tolist() == expected
    assert inputs["image_sizes"].tolist() == [[1344, 1344]]


# -------------------------------------------------------------------------------------- Phi-3.5-V
def test_phi3_v_image_row_matches_the_reference() -> None:
    from vlm2vec.phi3_v import Phi3VImageProcessor

    model = VLM2Vec.tiny("phi3_v")
    model.processor.image_processor = Phi3VImageProcessor(num_crops=4)  # released: 336 crops, 12x12
    inputs = model.prepare([f"<|image_1|>{TEXT}"], [image(336, 336)])
    # reference processing_phi3_v.py `_convert_images_texts_to_inputs` (v1 src/vlm_backbone/phi3_v, main
    # src/model/baseline_backbone/phi3_v): `prompt_chunks = [tokenizer(chunk).input_ids for chunk in
    # re.split(pattern, texts)]`, then `offset = 0; input_ids.extend(x[offset:])`: every chunk keeps its
    # own BOS, the empty one before the image too. The image is 4 crops of 336 (2x2) ->
    # (2*2 + 1) * 144 + 1 + (2 + 1) * 12 = 757 image positions
    tok = model.processor.tokenizer
    bos = tok.bos_token_id
    text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    expected = [bos] + [model.processor.image_token_id] * 757 + [bos] + text_ids
    assert inputs["input_ids"][0].tolist() == expected


@pytest.mark.parametrize("flag", [[], ["--prompt_layout", "native"]])
def test_training_records_the_layout_it_used(tmp_path, flag: list[str]) -> None:
    from vlm2vec.build import build_model
    from vlm2vec.config_parse import load_config

    config = load_config(["--model_name", "tiny:qwen2_vl", "--lora", "true", *flag], validate=False)
    model = build_model(config)
    layout = "native" if flag else "reference"  # new runs default to the paper's (reference) layout
    assert model.settings.prompt_layout == layout
    model.save_pretrained(str(tmp_path))
    assert VLM2Vec.from_pretrained(str(tmp_path)).settings.prompt_layout == layout


@pytest.mark.parametrize("layout", ["reference", "native"])
@pytest.mark.parametrize("name", QWEN_FAMILIES)
def test_qwen_count_tokens_equals_the_prepared_length_in_both_layouts(name: str, layout: str) -> None:
    model = released_qwen(name, layout)
    frames = [image(64, 64, k) for k in range(3)]
    for text, img, video in [
        (f"<|image_1|>{TEXT}", image(60, 100), None),
        (f"<|image_1|>{TEXT}", image(20, 300), None),
        ("<|video_1|> clip", None, frames),
    ]:
        prepared = model.prepare([text], [img], videos=[video] if video else None)
        assert model.count_tokens(text, img, video) == prepared["input_ids"].shape[1]
