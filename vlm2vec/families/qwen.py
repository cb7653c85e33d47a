"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: one image = `<|vision_start|><|image_pad|>*n<|vision_end|>`,
n = grid_t*grid_h*grid_w / merge_size^2, dynamic resolution bounded by min/max pixels, M-RoPE positions.

Image tokens are expanded here (the transformers Qwen processors cannot be built without torchvision).
Positions are always passed explicitly: M-RoPE from `get_rope_index` with the attention mask when the
chunk has images, mask-aware 1-D positions otherwise, so left padding never shifts a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlm2vec.backbones import BackboneFamily, LoadFn, ProcessorSettings, register_family
from vlm2vec.families._common import (
    ProcessorPair,
    build_tiny_tokenizer,
    expand_placeholder,
    fit_length,
    model_kwargs,
    pack_rows,
    pad_rows,
    positions_from_mask,
    resize_to_preset,
    rgb,
)

IMAGE_TOKEN = "<|vision_start|><|image_pad|><|vision_end|>"
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
QLORA_DENSE_MODULES = ["model.visual", "lm_head"]


@dataclass(frozen=True)
class _QwenSpec:
    name: str
    model_type: str
    model_class: str
    config_class: str
    patch_size: int
    image_mean: tuple[float, float, float]


SPECS = {
    "qwen2_vl": _QwenSpec(
        "qwen2_vl",
        "qwen2_vl",
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLConfig",
        14,
        (0.48145466, 0.4578275, 0.40821073),
    ),
    "qwen2_5_vl": _QwenSpec(
        "qwen2_5_vl",
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLConfig",
        14,
        (0.48145466, 0.4578275, 0.40821073),
    ),
    "qwen3_vl": _QwenSpec(
        "qwen3_vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", 16, (0.5, 0.5, 0.5)
    ),
}


def default_pixels(patch_size: int, merge_size: int = 2) -> tuple[int, int]:
    """The paper's Qwen2-VL bounds (256..1280 merged tokens, i.e. 256*28*28..1280*28*28 pixels),
    expressed for the family's patch size (Qwen3-VL: 32x32 pixels per token)."""
    unit = (patch_size * merge_size) ** 2
    return 256 * unit, 1280 * unit


def _image_processor_class() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


# ------------------------------------------------------------------------------------------ prepare
def prepare(
    processor: ProcessorPair,
    texts: list[str],
    images: list[Any],
    max_len: int,
    packed: bool = False,
    *,
    padding_side: str,
    settings: ProcessorSettings,
) -> dict[str, torch.Tensor]:
    tok, ip = processor.tokenizer, processor.image_processor
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    protected = {
        pad_id,
        tok.convert_tokens_to_ids("<|vision_start|>"),
        tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    size = None
    if settings.min_pixels is not None or settings.max_pixels is not None:
        size = dict(ip.size)
        if settings.min_pixels is not None:
            size["shortest_edge"] = settings.min_pixels
        if settings.max_pixels is not None:
            size["longest_edge"] = settings.max_pixels
    rows, types, pixel_values, grids = [], [], [], []
    for i, (text, image) in enumerate(zip(texts, images)):
        text = expand_placeholder(text, IMAGE_TOKEN, image is not None, i)
        if image is not None:
            image = resize_to_preset(rgb(image, i), settings.image_size)
            out = ip(images=[image], return_tensors="pt", **({"size": size} if size else {}))
            n_tokens = int(out["image_grid_thw"].prod()) // ip.merge_size**2
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        ids = fit_length(tok(text, add_special_tokens=True)["input_ids"], max_len, protected, i)
        rows.append(ids)
        types.append([1 if t == pad_id else 0 for t in ids])
    if packed:
        inputs = pack_rows(rows, {"mm_token_type_ids": types})
    else:
        inputs = pad_rows(rows, tok.pad_token_id, padding_side, {"mm_token_type_ids": (types, 0)})
    if pixel_values:
        inputs["pixel_values"] = torch.cat(pixel_values)
        inputs["image_grid_thw"] = torch.cat(grids)
    return inputs


# ------------------------------------------------------------------------------------ hidden states
def _packed_positions(inner: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[4, 1, T]: per-row text positions (row 0, drives the block-diagonal mask / varlen) + M-RoPE."""
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    grid = inputs.get("image_grid_thw")
    cu = inputs["cu_seqlens"].tolist()
    parts, next_image = [], 0
    for start, end in zip(cu[:-1], cu[1:]):
        seg_types = types[start:end]
        n_images = int(((seg_types == 1) & (torch.nn.functional.pad(seg_types, (1, 0))[:-1] != 1)).sum())
        text_pos = torch.arange(end - start, device=ids.device)
        if n_images:
            rope, _ = inner.get_rope_index(
                ids[None, start:end],
                mm_token_type_ids=seg_types[None],
                image_grid_thw=grid[next_image : next_image + n_images],
            )
            next_image += n_images
        else:
            rope = text_pos.view(1, 1, -1).expand(3, 1, -1)
        parts.append(torch.cat([text_pos.view(1, 1, -1), rope.to(ids.device)], 0))
    return torch.cat(parts, dim=2)


def hidden_states(hf_model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    inner = hf_model.model
    ids = inputs["input_ids"]
    grid = inputs.get("image_grid_thw")
    if "cu_seqlens" in inputs:
        attention_mask, positions = None, _packed_positions(inner, inputs)
    else:
        attention_mask = inputs["attention_mask"]
        if grid is not None:
            positions, _ = inner.get_rope_index(
                ids,
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=grid,
                attention_mask=attention_mask,
            )
        else:
            positions = positions_from_mask(attention_mask)
    out = inner(
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=positions,
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=grid,
        mm_token_type_ids=inputs.get("mm_token_type_ids") if grid is not None else None,
        use_cache=False,
    )
    return out.last_hidden_state


def vision_tower(hf_model: nn.Module) -> nn.Module:
    return hf_model.model.visual


# ------------------------------------------------------------------------------------ load / tiny
def _make_load(spec: _QwenSpec) -> LoadFn:
    def load(
        path_or_id: str,
        *,
        dtype: torch.dtype | None,
        attn_implementation: str | None,
        quantization: str | None,
        settings: ProcessorSettings,
        device: str | torch.device | None = None,
    ) -> tuple[nn.Module, ProcessorPair]:
        import transformers
        from transformers import AutoTokenizer

        cls = getattr(transformers, spec.model_class)
        model = cls.from_pretrained(
            path_or_id, **model_kwargs(dtype, attn_implementation, quantization, QLORA_DENSE_MODULES, device)
        )
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        image_processor = _image_processor_class().from_pretrained(path_or_id)
        return model, ProcessorPair(tokenizer, image_processor)

    return load


def _make_tiny(spec: _QwenSpec) -> Callable[[], tuple[nn.Module, ProcessorPair]]:
    def tiny() -> tuple[nn.Module, ProcessorPair]:
        import transformers

        tok = build_tiny_tokenizer(SPECIAL_TOKENS, eos="<|endoftext|>", pad="<|endoftext|>")
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        text = dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        if spec.name == "qwen3_vl":
            text.update(
                head_dim=16,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [4, 2, 2],
                    "mrope_interleaved": True,
                },
            )
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            )
        else:
            text.update(
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
            )
            if spec.name == "qwen2_vl":
                vision = dict(
                    depth=2,
                    embed_dim=32,
                    hidden_size=64,
                    num_heads=2,
                    mlp_ratio=2,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                )
            else:
                vision = dict(
                    depth=2,
                    hidden_size=32,
                    intermediate_size=64,
                    num_heads=2,
                    out_hidden_size=64,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                    window_size=56,
                    fullatt_block_indexes=[1],
                )
        config = getattr(transformers, spec.config_class)(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = getattr(transformers, spec.model_class)(config)
        unit = spec.patch_size * 2
        image_processor = _image_processor_class()(
            patch_size=spec.patch_size,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=4 * unit * unit,
            max_pixels=16 * unit * unit,
            image_mean=list(spec.image_mean),
            image_std=list(
                spec.image_mean if spec.name == "qwen3_vl" else (0.26862954, 0.26130258, 0.27577711)
            ),
        )
        return model.eval(), ProcessorPair(tok, image_processor)

    return tiny


def _register(spec: _QwenSpec) -> BackboneFamily:
    min_pixels, max_pixels = default_pixels(spec.patch_size)
    return register_family(
        BackboneFamily(
            name=spec.name,
            model_types=(spec.model_type,),
            image_token=IMAGE_TOKEN,
            padding_side="left",
            lora_targets=list(LORA_TARGETS),
            load=_make_load(spec),
            tiny=_make_tiny(spec),
            prepare=prepare,
            hidden_states=hidden_states,
            vision_tower=vision_tower,
            module=__name__,
            default_settings=ProcessorSettings("native", min_pixels, max_pixels),
            supports_packed=True,
        )
    )


QWEN2_VL, QWEN2_5_VL, QWEN3_VL = (_register(SPECS[n]) for n in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
