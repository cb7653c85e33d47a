"""Phi-3.5-V family hooks: image token `<|image_1|>` (the stored placeholder itself), HD crops
(`num_crops`, paper: 4), right padding, LoRA on the Phi-3 LM's fused projections. The model classes live
in vlm2vec/phi3_v.py (stock transformers parts, no remote code)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm2vec.backbones import (
    STORED_IMAGE_PLACEHOLDER,
    BackboneFamily,
    ProcessorSettings,
    RowImages,
    register_family,
)
from vlm2vec.families._common import (
    ProcessorPair,
    build_tiny_tokenizer,
    expand_placeholders,
    fit_length,
    image_sizes_hidden_states,
    images_of,
    model_kwargs,
    pack_rows,
    pad_rows,
)

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import PreTrainedTokenizerBase

    from vlm2vec.phi3_v import Phi3VImageProcessor

IMAGE_TOKEN = STORED_IMAGE_PLACEHOLDER
LORA_TARGETS = ["qkv_proj", "o_proj", "down_proj"]
QLORA_DENSE_MODULES = ["model.vision_embed_tokens", "lm_head"]
PAPER_NUM_CROPS = 4


def _tokenize(tok: PreTrainedTokenizerBase, text: str, image_id: int, n_image_tokens: list[int]) -> list[int]:
    """Tokenise around the placeholders as the released processor does: every text chunk, empty ones
    included, on its own with the tokenizer's special tokens (a BOS after each image when the tokenizer
    adds one), chunks kept whole (reference processing_phi3_v.py `_convert_images_texts_to_inputs`:
    `tokenizer(chunk).input_ids` per chunk, `offset = 0`); placeholder k becomes n_image_tokens[k]
    image ids."""
    chunks = text.split(IMAGE_TOKEN)
    ids = tok(chunks[0])["input_ids"]
    for n, chunk in zip(n_image_tokens, chunks[1:]):
        ids += [image_id] * n + tok(chunk)["input_ids"]
    return ids


def prepare(
    processor: ProcessorPair,
    texts: list[str],
    images: list[RowImages],
    max_len: int,
    packed: bool = False,
    *,
    padding_side: str,
    settings: ProcessorSettings,
    videos: list[list[Image] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Several images per row are Phi-3.5-V's `<|image_1|>`, `<|image_2|>`, ... input (HD crops per
    image, features consumed in text order). No video path (`input_kinds`)."""
    tok, ip = processor.tokenizer, processor.image_processor
    image_id = processor.image_token_id
    rows, pixel_values, image_sizes = [], [], []
    for i, (text, image) in enumerate(zip(texts, images)):
        row_images = images_of(image, i)
        text = expand_placeholders(text, len(row_images), 0, i, IMAGE_TOKEN)
        n_tokens = []
        for im in row_images:
            out = ip([im], num_crops=settings.num_crops)
            n_tokens.append(out["num_img_tokens"][0])
            pixel_values.append(out["pixel_values"][0])
            image_sizes.append(out["image_sizes"])
        rows.append(fit_length(_tokenize(tok, text, image_id, n_tokens), max_len, {image_id}, i))
    inputs = pack_rows(rows) if packed else pad_rows(rows, tok.pad_token_id, padding_side)
    if pixel_values:
        inputs["pixel_values"] = torch.stack(pixel_values)
        inputs["image_sizes"] = torch.cat(image_sizes)
    return inputs


def vision_tower(hf_model: nn.Module) -> nn.Module:
    return hf_model.model.vision_embed_tokens.img_processor


class Phi3VProcessor(ProcessorPair):
    """Tokenizer + HD image processor + the id that marks image positions in input_ids."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, image_processor: Phi3VImageProcessor, image_token_id: int
    ) -> None:
        super().__init__(tokenizer, image_processor)
        if image_token_id < len(tokenizer):
            raise ValueError(
                f"image_token_id {image_token_id} is inside the tokenizer vocabulary ({len(tokenizer)} ids)"
            )
        self.image_token_id = image_token_id


def load(
    path_or_id: str,
    *,
    dtype: torch.dtype | None,
    attn_implementation: str | None,
    quantization: str | None,
    settings: ProcessorSettings,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Phi3VProcessor]:
    from transformers import AutoTokenizer

    from vlm2vec.phi3_v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor

    config = Phi3VConfig.from_pretrained(path_or_id)  # the released config.json parses as is
    model = Phi3VForCausalLM.from_pretrained(
        path_or_id,
        config=config,
        **model_kwargs(dtype, attn_implementation, quantization, QLORA_DENSE_MODULES, device),
    )
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, config=config)
    if os.path.isdir(path_or_id):
        image_processor = Phi3VImageProcessor.from_pretrained(path_or_id)
    else:
        from huggingface_hub import hf_hub_download

        image_processor = Phi3VImageProcessor.from_pretrained(
            os.path.dirname(hf_hub_download(path_or_id, "preprocessor_config.json"))
        )
    return model, Phi3VProcessor(tokenizer, image_processor, config.image_token_id)


def save(hf_model: nn.Module, processor: Phi3VProcessor, directory: str) -> None:
    hf_model.save_pretrained(directory)
    processor.save_pretrained(directory)
    # record the architecture so `family_of(directory)` and the released-layout loader agree
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.setdefault("architectures", ["Phi3VForCausalLM"])
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def tiny() -> tuple[nn.Module, Phi3VProcessor]:
    from vlm2vec.phi3_v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor

    tok = build_tiny_tokenizer(
        ["<|end|>", "<|user|>", "<|assistant|>"], bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>"
    )
    crop, patch = 56, 14
    config = Phi3VConfig(
        vocab_size=len(tok) + 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=crop,
            patch_size=patch,
            projection_dim=32,
            hidden_act="quick_gelu",
        ),
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Phi3VForCausalLM(config)
    image_processor = Phi3VImageProcessor(num_crops=4, crop_size=crop, tokens_per_side=crop // patch // 2)
    return model.eval(), Phi3VProcessor(tok, image_processor, config.image_token_id)


PHI3_V = register_family(
    BackboneFamily(
        name="phi3_v",
        model_types=("phi3_v",),
        image_token=IMAGE_TOKEN,
        padding_side="right",
        lora_targets=list(LORA_TARGETS),
        load=load,
        tiny=tiny,
        prepare=prepare,
        hidden_states=image_sizes_hidden_states,
        vision_tower=vision_tower,
        save=save,
        module=__name__,
        default_settings=ProcessorSettings("native", num_crops=PAPER_NUM_CROPS),
        supports_packed=True,
        input_kinds=frozenset({"image", "multi_image"}),
    )
)
