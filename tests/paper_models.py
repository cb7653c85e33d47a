"""Tiny models at the released checkpoints' image settings, for the shipped paper configs.

The families' own tiny models use toy image processors (28-56 px crops); these keep a tiny language model
and vision tower (2 layers, hidden 32-64) but the released processing: Qwen2-VL patch 14 / merge 2 with the
config's pixel bounds, LLaVA-NeXT (llava-v1.6-mistral-7b-hf) CLIP-336/14 with its anyres grid, Phi-3.5-V
CLIP-336/14 HD crops. The language model gets the released context (32768 positions, RoPE: no weights
depend on it), so a config's longest row is judged as it would be on the real model.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm2vec.backbones import ProcessorSettings, get_family
from vlm2vec.config import TrainConfig
from vlm2vec.model import VLM2Vec

REAL_CONTEXT = 32768
LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6-mistral-7b-hf
CLIP_336 = dict(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, projection_dim=32)  # fmt: skip


def family_of_config(config: TrainConfig) -> str:
    """The family of a shipped config's hub model name."""
    name = config.model_name.lower()
    for key, family in (("qwen2-vl", "qwen2_vl"), ("llava", "llava_next"), ("phi-3.5-vision", "phi3_v")):
        if key in name:
            return family
    raise ValueError(f"no family for {config.model_name!r}")


def settings_of(config: TrainConfig) -> ProcessorSettings:
    return ProcessorSettings(
        config.image_resolution or "native",
        config.min_pixels,
        config.max_pixels,
        config.num_crops,
        config.prompt_layout,
    )


def _qwen(config: TrainConfig) -> VLM2Vec:
    settings = settings_of(config)
    model = VLM2Vec.tiny("qwen2_vl", settings=settings, max_len=config.max_len, pooling=config.pooling)
    model.hf_model.config.get_text_config().max_position_embeddings = REAL_CONTEXT
    return model


def _llava(config: TrainConfig) -> VLM2Vec:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlm2vec.families._common import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["<image>"], bos="<s>", eos="</s>", pad="<pad>")
    hf_config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", **CLIP_336),
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=REAL_CONTEXT, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=LLAVA_PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf_model = LlavaNextForConditionalGeneration(hf_config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    return VLM2Vec(hf_model, processor, get_family("llava_next"), settings=settings_of(config),
                   max_len=config.max_len, pooling=config.pooling)  # fmt: skip


def _phi(config: TrainConfig) -> VLM2Vec:
    from vlm2vec.families._common import build_tiny_tokenizer
    from vlm2vec.families.phi3_v import Phi3VProcessor
    from vlm2vec.phi3_v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor

    tok = build_tiny_tokenizer(["<|end|>", "<|user|>", "<|assistant|>"], bos="<s>", eos="<|endoftext|>",
                               pad="<|endoftext|>")  # fmt: skip
    hf_config = Phi3VConfig(
        vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=REAL_CONTEXT,
        original_max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, vision_config=dict(CLIP_336, hidden_act="quick_gelu"),
    )  # fmt: skip
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf_model = Phi3VForCausalLM(hf_config).eval()
    image_processor = Phi3VImageProcessor(num_crops=config.num_crops or 4, crop_size=336, tokens_per_side=12)
    processor = Phi3VProcessor(tok, image_processor, hf_config.image_token_id)
    return VLM2Vec(hf_model, processor, get_family("phi3_v"), settings=settings_of(config),
                   max_len=config.max_len, pooling=config.pooling)  # fmt: skip


def tiny_at(config: TrainConfig) -> VLM2Vec:
    """A tiny model of the config's family at the config's (released) image settings and max_len."""
    return {"qwen2_vl": _qwen, "llava_next": _llava, "phi3_v": _phi}[family_of_config(config)](config)


def image_token_ids(model: VLM2Vec) -> set[int]:
    """Ids that mark image positions in `input_ids` (never cut, not counted by max_len)."""
    tok = model.processor.tokenizer
    family = model.family.name
    if family == "phi3_v":
        return {model.processor.image_token_id}
    if family == "llava_next":
        return {tok.convert_tokens_to_ids("<image>")}
    return {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}


def split_counts(model: VLM2Vec, ids: Any) -> tuple[int, int]:
    """(image tokens, text tokens) of one prepared row."""
    marks = image_token_ids(model)
    ids = [int(t) for t in ids]
    n_image = sum(t in marks for t in ids)
    return n_image, len(ids) - n_image
