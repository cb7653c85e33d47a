"""Phi-3.5-vision built from stock transformers parts, so no remote code has to run.

transformers has no Phi-3(.5)-vision class (only remote code on the hub). The model is a CLIP ViT-L/14-336
vision tower, an HD-crop image embedding with learnable separators (`glb_GN`, `sub_GN`) and a 2-layer
MLP projection, in front of a stock `Phi3Model`. Module names follow the released checkpoint
`microsoft/Phi-3.5-vision-instruct` (`RELEASED_LAYOUT` documents the names; `convert_released_state_dict`
maps them, `released_name` goes the other way):

    model.embed_tokens.weight                            -> Phi3Model.embed_tokens
    model.layers.{i}.self_attn.{qkv_proj,o_proj}.weight  -> Phi3Model layers (fused qkv, like transformers)
    model.layers.{i}.mlp.{gate_up_proj,down_proj}.weight
    model.layers.{i}.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight
    model.vision_embed_tokens.img_processor.vision_model.*   -> CLIPVisionModel (transformers 5: no
                                                                `vision_model.` level; renamed on load)
    model.vision_embed_tokens.img_projection.{0,2}.{weight,bias}  -> Linear(4C, H), GELU, Linear(H, H)
    model.vision_embed_tokens.{glb_GN,sub_GN}                 -> separators
    model.vision_embed_tokens.wte.weight (alias of embed_tokens, if present) -> dropped

HD transform (the released image processor): resize so that at most `num_crops` crop x crop tiles cover
the image keeping its aspect ratio, pad the height to a multiple of `crop` with white, normalise; the
crops plus one global crop-size resize go through CLIP; features (layer -2, CLS dropped) are 2x2 merged
to 4C channels; image tokens = (h*w + 1) * g^2 + 1 + (h + 1) * g with g = crop / patch / 2 (12 for 336/14).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3Model, Phi3PreTrainedModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
PREPROCESSOR_FILE = "preprocessor_config.json"

RELEASED_LAYOUT = [
    r"model\.embed_tokens\.weight",
    r"model\.layers\.\d+\.self_attn\.(qkv_proj|o_proj)\.weight",
    r"model\.layers\.\d+\.mlp\.(gate_up_proj|down_proj)\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.vision_embed_tokens\.img_processor\.vision_model\..+",
    r"model\.vision_embed_tokens\.img_projection\.[02]\.(weight|bias)",
    r"model\.vision_embed_tokens\.(glb_GN|sub_GN)",
]
"""Parameter names of the released checkpoint (regular expressions, one per group)."""

_DROPPED_KEYS = re.compile(r"^model\.vision_embed_tokens\.wte\.")
_CLIP_PREFIX = re.compile(r"(img_processor\.)(?!vision_model\.)")


def released_name(key: str) -> str:
    """A parameter name of this module -> its name in the released checkpoint.

    transformers 5.x flattened `CLIPVisionModel` (no `vision_model.` level); the checkpoint keeps it."""
    return _CLIP_PREFIX.sub(r"\1vision_model.", key)


def convert_released_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Released `microsoft/Phi-3.5-vision-instruct` names -> the names of `model` (a Phi3VForCausalLM):
    drops the `wte` alias and adapts the CLIP `vision_model.` level to the installed transformers.
    Raises ValueError on a key that is not part of the released layout."""
    flat = not hasattr(model.model.vision_embed_tokens.img_processor, "vision_model")
    out = {}
    for key, value in state_dict.items():
        if _DROPPED_KEYS.match(key):
            continue
        if not any(re.fullmatch(p, key) for p in RELEASED_LAYOUT):
            raise ValueError(f"unexpected key {key!r} for the Phi-3.5-vision checkpoint layout")
        out[key.replace("img_processor.vision_model.", "img_processor.") if flat else key] = value
    return out


def load_released_weights(model: nn.Module, directory: str) -> None:
    """Load the released safetensors shards of `directory` into `model` (strict: every weight present).

    `Phi3VForCausalLM.from_pretrained` does the same renaming through transformers' own conversion of
    nested CLIP models; this is the explicit path (and the test of the mapping)."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{directory}: no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    model.load_state_dict(convert_released_state_dict(state, model), strict=True)


class Phi3VConfig(Phi3Config):
    """Phi3Config + the released `img_processor` / `embd_layer` fields (+ `vision_config` for other CLIP
    sizes, e.g. tiny test models; default CLIP ViT-L/14-336) and the id used for image positions."""

    model_type = "phi3_v"

    def __init__(
        self,
        vision_config: dict | None = None,
        img_processor: dict | None = None,
        embd_layer: dict | None = None,
        image_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.vision_config = dict(vision_config or CLIP_L_336)
        self.img_processor = dict(
            img_processor
            or {
                "image_dim_out": self.vision_config["hidden_size"],
                "name": "clip_vision_model",
                "num_img_tokens": 144,
                "layer_idx": -2,
                "type_feature": "patch",
            }
        )
        self.embd_layer = dict(
            embd_layer
            or {
                "embedding_cls": "image",
                "hd_transform_order": "sub_glb",
                "projection_cls": "mlp",
                "use_hd_transform": True,
                "with_learnable_separator": True,
            }
        )
        # released checkpoints mark image positions with negative ids; here a real, unused row (the last
        # one of the padded embedding) is used so input_ids stay valid indices
        self.image_token_id = self.vocab_size - 1 if image_token_id is None else image_token_id


class Phi3VImageEmbedding(nn.Module):
    """CLIP features of HD crops -> 2x2-merged, separator-joined, projected image tokens."""

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        clip_config = CLIPVisionConfig(**config.vision_config)
        clip_config._attn_implementation = config._attn_implementation or "sdpa"
        self.img_processor = CLIPVisionModel(clip_config)
        dim = clip_config.hidden_size
        self.grid = clip_config.image_size // clip_config.patch_size
        if self.grid % 2:
            raise ValueError(f"CLIP image_size / patch_size must be even for 2x2 merging, got {self.grid}")
        self.layer_idx = config.img_processor.get("layer_idx", -2)
        self.order = config.embd_layer.get("hd_transform_order", "sub_glb")
        self.glb_GN = nn.Parameter(torch.randn(1, 1, 4 * dim) * 0.02)
        self.sub_GN = nn.Parameter(torch.randn(1, 1, 1, 4 * dim) * 0.02)
        self.img_projection = nn.Sequential(
            nn.Linear(4 * dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def merged(self, features: torch.Tensor) -> torch.Tensor:
        """[n, g*g, C] patch features -> [n, g/2, g/2, 4C] (2x2 neighbours concatenated)."""
        n, _, dim = features.shape
        h = self.grid // 2
        x = features.reshape(n, h, 2, h, 2, dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h, h, 4 * dim)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_images, max_crops + 1, 3, S, S] (global crop first, zero padding last);
        image_sizes [n_images, 2] = HD-transformed (height, width). Returns [total_tokens, hidden]."""
        crop = pixel_values.shape[-1]
        counts = [(int(hh) // crop) * (int(ww) // crop) for hh, ww in image_sizes.tolist()]
        real = torch.cat([pixel_values[i, : 1 + c] for i, c in enumerate(counts)])  # skip padding crops
        out = self.img_processor(real.to(self.img_processor.dtype), output_hidden_states=True)
        features = self.merged(out.hidden_states[self.layer_idx][:, 1:])  # drop CLS
        tokens, start, h = [], 0, self.grid // 2
        for (height, width), count in zip(image_sizes.tolist(), counts):
            rows, cols = int(height) // crop, int(width) // crop
            glb = features[start]  # [h, h, 4C]
            glb = torch.cat([glb, self.sub_GN[0].expand(h, 1, -1)], dim=1).reshape(-1, glb.shape[-1])
            sub = features[start + 1 : start + 1 + count]  # [rows*cols, h, h, 4C], row-major crops
            sub = sub.reshape(rows, cols, h, h, -1).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * h, -1)
            sub = torch.cat([sub, self.sub_GN[0].expand(rows * h, 1, -1)], dim=1).reshape(-1, sub.shape[-1])
            parts = [sub, self.glb_GN[0], glb] if self.order == "sub_glb" else [glb, self.glb_GN[0], sub]
            tokens.append(torch.cat(parts))
            start += 1 + count
        return self.img_projection(torch.cat(tokens))


class Phi3VModel(Phi3Model):
    """Phi3Model whose input embeddings get projected image tokens at `image_token_id` positions."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if pixel_values is not None:
                features = self.vision_embed_tokens(pixel_values, image_sizes).to(inputs_embeds.dtype)
                positions = input_ids == self.config.image_token_id
                if int(positions.sum()) != features.shape[0]:
                    raise ValueError(
                        f"{int(positions.sum())} image token positions but {features.shape[0]} image features"
                    )
                inputs_embeds = inputs_embeds.masked_scatter(positions[..., None], features)
        return super().forward(
            input_ids=None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )


class Phi3VForCausalLM(Phi3PreTrainedModel):
    """Phi-3.5-vision with its LM head (checkpoint-compatible; the encoder only uses `.model`)."""

    config_class = Phi3VConfig
    _keys_to_ignore_on_load_unexpected = [r"vision_embed_tokens\.wte\."]
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected image tokens, as the forward computes them (the trainer's ZeRO-3 dummy image path)."""
        return self.model.vision_embed_tokens(pixel_values, image_sizes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            **kwargs,
        )
        return CausalLMOutputWithPast(
            logits=self.lm_head(out.last_hidden_state), hidden_states=(out.last_hidden_state,)
        )


# ----------------------------------------------------------------------------------- image processor
class Phi3VImageProcessor:
    """The released HD transform (PIL + torch, no torchvision): num_crops tiles of crop x crop + 1 global.

    tokens_per_side: g = crop / patch / 2 (12 for CLIP-336/14)."""

    def __init__(
        self,
        num_crops: int = 4,
        crop_size: int = 336,
        tokens_per_side: int = 12,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.num_crops = num_crops
        self.crop_size = crop_size
        self.tokens_per_side = tokens_per_side
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)

    def hd_transform(self, image: Image.Image, num_crops: int) -> Image.Image:
        """Resize keeping the aspect ratio so that <= num_crops tiles cover it; pad height with white."""
        crop = self.crop_size
        width, height = image.size
        transposed = width < height
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
            width, height = image.size
        ratio = width / height
        scale = 1
        while scale * math.ceil(scale / ratio) <= num_crops:
            scale += 1
        scale -= 1
        new_w = int(scale * crop)
        new_h = max(1, int(new_w / ratio))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        pad = int(math.ceil(new_h / crop) * crop) - new_h
        top = pad // 2
        image = ImageOps.expand(image, border=(0, top, 0, pad - top), fill=(255, 255, 255))
        return image.transpose(Image.Transpose.TRANSPOSE) if transposed else image

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for an HD-transformed image of (height, width) pixels."""
        rows, cols, g = height // self.crop_size, width // self.crop_size, self.tokens_per_side
        return (rows * cols + 1) * g * g + 1 + (rows + 1) * g

    def __call__(
        self, images: list[Image.Image], num_crops: int | None = None
    ) -> dict[str, torch.Tensor | list[int]]:
        num_crops = num_crops or self.num_crops
        crop = self.crop_size
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        pixel_values, sizes, tokens = [], [], []
        for image in images:
            hd = self.hd_transform(image.convert("RGB"), num_crops)
            x = torch.from_numpy(np.asarray(hd, dtype=np.float32) / 255.0).permute(2, 0, 1)
            x = (x - mean) / std
            _, height, width = x.shape
            glb = torch.nn.functional.interpolate(
                x[None], size=(crop, crop), mode="bicubic", align_corners=False
            )
            crops = x.reshape(3, height // crop, crop, width // crop, crop).permute(1, 3, 0, 2, 4)
            crops = crops.reshape(-1, 3, crop, crop)
            all_crops = torch.cat([glb, crops])
            padding = all_crops.new_zeros(num_crops + 1 - all_crops.shape[0], 3, crop, crop)
            pixel_values.append(torch.cat([all_crops, padding]))
            sizes.append([height, width])
            tokens.append(self.num_image_tokens(height, width))
        return {
            "pixel_values": torch.stack(pixel_values),
            "image_sizes": torch.tensor(sizes, dtype=torch.long),
            "num_img_tokens": tokens,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "Phi3VImageProcessor",
            "num_crops": self.num_crops,
            "crop_size": self.crop_size,
            "tokens_per_side": self.tokens_per_side,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, PREPROCESSOR_FILE), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> Phi3VImageProcessor:
        """Reads our preprocessor_config.json or the released one (num_crops, mean, std; 336/14 CLIP)."""
        with open(os.path.join(directory, PREPROCESSOR_FILE), encoding="utf-8") as f:
            cfg = json.load(f)
        return cls(
            num_crops=cfg.get("num_crops", 4),
            crop_size=cfg.get("crop_size", 336),
            tokens_per_side=cfg.get("tokens_per_side", 12),
            image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(cfg.get("image_std", CLIP_STD)),
        )

    def __repr__(self) -> str:
        return f"Phi3VImageProcessor({self.to_dict()})"
