"""LLaVA-NeXT (LLaVA-1.6): CLIP tower + anyres tiling + MLP projector + a Llama/Mistral/Qwen2 LM.

Image token `<image>`, expanded to the anyres feature count by `LlavaNextProcessor`'s own arithmetic
(with num_additional_image_tokens=1 for CLIP's CLS under the `default` feature strategy). The LM's
positions are passed from the attention mask, so left padding does not shift rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm2vec.backbones import BackboneFamily, ProcessorSettings, RowImages, register_family
from vlm2vec.families._common import (
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
    from transformers import LlavaNextProcessor

IMAGE_TOKEN = "<image>"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
QLORA_DENSE_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def prepare(
    processor: LlavaNextProcessor,
    texts: list[str],
    images: list[RowImages],
    max_len: int,
    packed: bool = False,
    *,
    padding_side: str,
    settings: ProcessorSettings,
    videos: list[list[Image] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Several images per row are LLaVA-NeXT's own multi-image input: one anyres `<image>` run per
    image, features consumed in text order. No video path (`input_kinds`)."""
    tok, ip = processor.tokenizer, processor.image_processor
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    rows, pixel_values, image_sizes = [], [], []
    for i, (text, image) in enumerate(zip(texts, images)):
        row_images = images_of(image, i, settings.image_size, on_white=True)  # resized, then RGB
        parts = expand_placeholders(text, len(row_images), 0, i, IMAGE_TOKEN).split(IMAGE_TOKEN)
        text = parts[0]
        for im, part in zip(row_images, parts[1:]):
            out = ip(images=[im], return_tensors="pt")
            text += processor.replace_image_token(out, 0) + part
            pixel_values.append(out["pixel_values"][0])
            image_sizes.append(out["image_sizes"])
        rows.append(fit_length(tok(text, add_special_tokens=True)["input_ids"], max_len, {image_id}, i))
    inputs = pack_rows(rows) if packed else pad_rows(rows, tok.pad_token_id, padding_side)
    if pixel_values:
        # [n_images, max_patches, C, H, W]; the model uses image_sizes to drop the zero padding
        most = max(p.shape[0] for p in pixel_values)
        inputs["pixel_values"] = torch.stack(
            [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in pixel_values]
        )
        inputs["image_sizes"] = torch.cat(image_sizes)
    return inputs


def vision_tower(hf_model: nn.Module) -> nn.Module:
    return hf_model.model.vision_tower


def load(
    path_or_id: str,
    *,
    dtype: torch.dtype | None,
    attn_implementation: str | None,
    quantization: str | None,
    settings: ProcessorSettings,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, LlavaNextProcessor]:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    model = LlavaNextForConditionalGeneration.from_pretrained(
        path_or_id, **model_kwargs(dtype, attn_implementation, quantization, QLORA_DENSE_MODULES, device)
    )
    processor = LlavaNextProcessor.from_pretrained(path_or_id)
    # the PIL image processor, as at training time (transformers picks the torchvision one where
    # torchvision imports, which resizes slightly differently)
    processor.image_processor = LlavaNextImageProcessorPil.from_pretrained(path_or_id)
    if processor.patch_size is None:  # old hub processors: fill in from the model config
        processor.patch_size = model.config.vision_config.patch_size
        processor.vision_feature_select_strategy = model.config.vision_feature_select_strategy
        processor.num_additional_image_tokens = 1
    return model, processor


def tiny() -> tuple[nn.Module, LlavaNextProcessor]:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = build_tiny_tokenizer([IMAGE_TOKEN], bos="<s>", eos="</s>", pad="<pad>")
    crop, patch = 28, 14
    pinpoints = [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]]
    config = LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=crop,
            patch_size=patch,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model.eval(), processor


LLAVA_NEXT = register_family(
    BackboneFamily(
        name="llava_next",
        model_types=("llava_next",),
        image_token=IMAGE_TOKEN,
        padding_side="left",
        lora_targets=list(LORA_TARGETS),
        load=load,
        tiny=tiny,
        prepare=prepare,
        hidden_states=image_sizes_hidden_states,
        vision_tower=vision_tower,
        module=__name__,
        supports_packed=True,
        input_kinds=frozenset({"image", "multi_image"}),
    )
)
