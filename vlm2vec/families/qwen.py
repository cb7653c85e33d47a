"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: one image = n `<|image_pad|>` tokens, n = grid_t*grid_h*grid_w /
merge_size^2, dynamic resolution bounded by min/max pixels.

Two prompt layouts (`ProcessorSettings.prompt_layout`): `reference` writes the bare pad run, as the
VLM2Vec reference does (main src/model/processor.py:65-90 VLM_IMAGE_TOKENS / VLM_VIDEO_TOKENS, v1
src/model_utils.py:29-34); `native` wraps each image / video in `<|vision_start|>..<|vision_end|>`, Qwen's
own chat layout. Positions follow the reference's `get_rope_index` rule (its vendored
modeling_qwen2_vl.py:1455-1511): M-RoPE 3-D positions for a visual run that follows `<|vision_start|>`,
plain 1-D positions for everything else, so the reference layout gives 1-D positions throughout, exactly
as the released checkpoints were trained.

Image tokens are expanded here (the transformers Qwen processors cannot be built without torchvision).
Positions are always passed explicitly and counted over real tokens only, so left padding never shifts
a row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlm2vec.backbones import BackboneFamily, LoadFn, ProcessorSettings, RowImages, register_family
from vlm2vec.families._common import (
    ProcessorPair,
    build_tiny_tokenizer,
    expand_placeholders,
    fit_length,
    images_of,
    model_kwargs,
    pack_rows,
    pad_rows,
    positions_from_mask,
    resize_to_preset,
    rgb,
)

if TYPE_CHECKING:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
"""What `<|image_1|>` / `<|video_1|>` become in the reference layout (the default of Qwen2/2.5-VL)."""
NATIVE_IMAGE_TOKEN = "<|vision_start|><|image_pad|><|vision_end|>"
NATIVE_VIDEO_TOKEN = "<|vision_start|><|video_pad|><|vision_end|>"
SMALL_SIDE, SMALL_RESIZE = 28, (56, 56)
"""The reference resizes a Qwen image with a side under 28 px to 56x56 (main src/model/processor.py:328)."""
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
    """The reference's Qwen2-VL bounds (4..1280 merged tokens, i.e. 4*28*28..1280*28*28 pixels: V2.0's
    resize_min/max_pixels defaults, main src/arguments.py:45-46), expressed for the family's patch size
    (Qwen3-VL: 32x32 pixels per token)."""
    unit = (patch_size * merge_size) ** 2
    return 4 * unit, 1280 * unit


def layout_tokens(settings: ProcessorSettings) -> tuple[str, str]:
    """(image token, video token) the placeholders become under `settings.prompt_layout`."""
    if settings.prompt_layout == "native":
        return NATIVE_IMAGE_TOKEN, NATIVE_VIDEO_TOKEN
    return IMAGE_TOKEN, VIDEO_TOKEN


def _row_images(image: RowImages, row: int, settings: ProcessorSettings) -> list[Image.Image]:
    """A row's images after the resolution preset and the reference's small-image rule."""
    out = []
    # the preset resize in the image's own mode, then RGB (transparency on white), as the reference
    for im in images_of(image, row, settings.image_size, on_white=True):
        if min(im.size) < SMALL_SIDE:
            im = resize_to_preset(im, SMALL_RESIZE)
        out.append(im)
    return out


def _image_processor_class() -> type[Qwen2VLImageProcessorPil]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


# ------------------------------------------------------------------------------------------ prepare
def _pixel_bounds(ip: Qwen2VLImageProcessorPil, settings: ProcessorSettings) -> tuple[int, int]:
    size = dict(ip.size)
    lo = settings.min_pixels if settings.min_pixels is not None else size["shortest_edge"]
    hi = settings.max_pixels if settings.max_pixels is not None else size["longest_edge"]
    return lo, hi


def video_patches(
    frames: list[Image.Image],
    ip: Qwen2VLImageProcessorPil,
    min_pixels: int,
    max_pixels: int,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values_videos [grid_t*h*w, C*tp*p*p], video_grid_thw [1, 3]) of one video's frames, the
    layout of transformers' Qwen2-VL video processor, computed here because that processor needs
    torchvision. Every frame is resized to the first frame's dynamic-resolution size (bounded by
    min/max pixels per frame, as the reference), normalised, and the frame count padded to a multiple
    of the temporal patch by repeating the last frame; so a 1-frame video has the pixels of the image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    p, merge, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    first = resize_to_preset(frames[0], size)
    height, width = smart_resize(first.height, first.width, factor=p * merge, min_pixels=min_pixels,
                                 max_pixels=max_pixels)  # fmt: skip
    mean = np.asarray(ip.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(ip.image_std, dtype=np.float32)[:, None, None]
    arrays = []
    for frame in frames:
        frame = frame.resize((width, height), Image.Resampling.BICUBIC)
        x = np.asarray(frame, dtype=np.float32).transpose(2, 0, 1) * np.float32(ip.rescale_factor)
        arrays.append((x - mean) / std)
    arrays += [arrays[-1]] * (-len(arrays) % tp)
    video = torch.from_numpy(np.stack(arrays))  # [T, C, H, W]
    t, c = video.shape[0] // tp, video.shape[1]
    gh, gw = height // p, width // p
    patches = video.view(t, tp, c, gh // merge, merge, p, gw // merge, merge, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * gh * gw, c * tp * p * p)
    return patches, torch.tensor([[t, gh, gw]], dtype=torch.long)


def prepare(
    processor: ProcessorPair,
    texts: list[str],
    images: list[RowImages],
    max_len: int,
    packed: bool = False,
    *,
    padding_side: str,
    settings: ProcessorSettings,
    videos: list[list[Image.Image] | None] | None = None,
    timestamps: bool = False,
) -> dict[str, torch.Tensor]:
    """Qwen inputs; `timestamps` (Qwen3-VL): each temporal patch of a video is its own
    `<t seconds><|vision_start|>pads<|vision_end|>` group, as Qwen3-VL's processor writes it. Frames
    here carry no capture time, so t counts sampled frames at 1 frame per second."""
    tok, ip = processor.tokenizer, processor.image_processor
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
    protected = {
        image_pad,
        video_pad,
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
    videos = videos or [None] * len(texts)
    image_token, video_token = layout_tokens(settings)
    timestamps = timestamps and settings.prompt_layout == "native"
    rows, types, pixel_values, grids, video_values, video_grids = [], [], [], [], [], []
    for i, (text, image, video) in enumerate(zip(texts, images, videos)):
        row_images = _row_images(image, i, settings)
        text = expand_placeholders(text, len(row_images), int(video is not None), i, image_token, video_token)
        counts = []
        for im in row_images:  # images in text order; the model consumes features in that order
            out = ip(images=[im], return_tensors="pt", **({"size": size} if size else {}))
            counts.append(int(out["image_grid_thw"].prod()) // ip.merge_size**2)
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        video_tokens = None
        if video is not None:
            if not video:
                raise ValueError(f"row {i}: the video has no frames")
            values, grid = video_patches([rgb(f, i) for f in video], ip, *_pixel_bounds(ip, settings),
                                         settings.image_size)  # fmt: skip
            video_values.append(values)
            video_grids.append(grid)
            video_tokens = (int(grid[0, 0]), int(grid[0, 1:].prod()) // ip.merge_size**2)
        text = _expand_pads(text, counts, video_tokens, timestamps, ip.temporal_patch_size)
        ids = fit_length(tok(text, add_special_tokens=True)["input_ids"], max_len, protected, i)
        rows.append(ids)
        types.append([1 if t == image_pad else 2 if t == video_pad else 0 for t in ids])
    if packed:
        inputs = pack_rows(rows, {"mm_token_type_ids": types})
    else:
        inputs = pad_rows(rows, tok.pad_token_id, padding_side, {"mm_token_type_ids": (types, 0)})
    if pixel_values:
        inputs["pixel_values"] = torch.cat(pixel_values)
        inputs["image_grid_thw"] = torch.cat(grids)
    if video_values:
        inputs["pixel_values_videos"] = torch.cat(video_values)
        inputs["video_grid_thw"] = torch.cat(video_grids)
    return inputs


def _expand_pads(
    text: str, counts: list[int], video: tuple[int, int] | None, timestamps: bool, tp: int
) -> str:
    """Each image's `<|image_pad|>` repeated to its token count, the video's to t x per-slice tokens (or,
    with timestamps, one `<t seconds>` group per temporal patch)."""
    parts = text.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * n + part for n, part in zip(counts, parts[1:]))
    if video is None:
        return text
    t, per_slice = video
    if not timestamps:
        return text.replace("<|video_pad|>", "<|video_pad|>" * (t * per_slice))
    groups = "".join(
        f"<{k * tp + (tp - 1) / 2:.1f} seconds><|vision_start|>"
        + "<|video_pad|>" * per_slice
        + "<|vision_end|>"
        for k in range(t)
    )
    return text.replace(NATIVE_VIDEO_TOKEN, groups)


def count_tokens(
    processor: ProcessorPair,
    text: str,
    images: RowImages,
    video: list[Image.Image] | None,
    max_len: int,
    *,
    settings: ProcessorSettings,
    timestamps: bool = False,
) -> int:
    """The length `prepare` gives this row, from image sizes alone (no pixel processing): the grids
    follow the processor's dynamic resize (smart_resize within min/max pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    tok, ip = processor.tokenizer, processor.image_processor
    lo, hi = _pixel_bounds(ip, settings)

    def tokens(image: Image.Image) -> int:
        h, w = smart_resize(image.height, image.width, factor=ip.patch_size * ip.merge_size,
                            min_pixels=lo, max_pixels=hi)  # fmt: skip
        return (h // ip.patch_size) * (w // ip.patch_size) // ip.merge_size**2

    row_images = _row_images(images, 0, settings)
    timestamps = timestamps and settings.prompt_layout == "native"
    text = expand_placeholders(text, len(row_images), int(video is not None), 0, *layout_tokens(settings))
    video_tokens = None
    if video:
        tp = ip.temporal_patch_size
        video_tokens = (-(-len(video) // tp), tokens(resize_to_preset(video[0], settings.image_size)))
    text = _expand_pads(
        text, [tokens(im) for im in row_images], video_tokens, timestamps, ip.temporal_patch_size
    )
    marks = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    protected = {tok.convert_tokens_to_ids(t) for t in marks}  # as `prepare`: never cut, not counted
    return len(fit_length(tok(text, add_special_tokens=True)["input_ids"], max_len, protected, 0))


# ------------------------------------------------------------------------------------ hidden states
def _runs(types: torch.Tensor, kind: int) -> int:
    """Number of runs of token type `kind` (one run = one image or one video)."""
    is_kind = types == kind
    return int((is_kind & ~torch.nn.functional.pad(is_kind, (1, 0))[:-1]).sum())


def _vision_started(ids: torch.Tensor, inner: nn.Module) -> bool:
    """Whether `ids` hold `<|vision_start|>`: the reference's `get_rope_index` gives M-RoPE positions only
    to visual runs it finds after one (its modeling_qwen2_vl.py:1458-1461), so without one (the reference
    layout) every token gets plain 1-D positions."""
    return bool((ids == inner.config.vision_start_token_id).any())


def _packed_positions(inner: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[4, 1, T]: per-row text positions (row 0, drives the block-diagonal mask / varlen) + M-RoPE."""
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    grid, vgrid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    cu = inputs["cu_seqlens"].tolist()
    parts, next_image, next_video = [], 0, 0
    for start, end in zip(cu[:-1], cu[1:]):
        seg_types = types[start:end]
        n_images, n_videos = _runs(seg_types, 1), _runs(seg_types, 2)
        text_pos = torch.arange(end - start, device=ids.device)
        if (n_images or n_videos) and _vision_started(ids[start:end], inner):
            rope, _ = inner.get_rope_index(
                ids[None, start:end],
                mm_token_type_ids=seg_types[None],
                image_grid_thw=grid[next_image : next_image + n_images] if n_images else None,
                video_grid_thw=vgrid[next_video : next_video + n_videos] if n_videos else None,
            )
        else:
            rope = text_pos.view(1, 1, -1).expand(3, 1, -1)
        next_image += n_images
        next_video += n_videos
        parts.append(torch.cat([text_pos.view(1, 1, -1), rope.to(ids.device)], 0))
    return torch.cat(parts, dim=2)


def position_ids(inner: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions the model gets for prepared `inputs`: [3, N, L] M-RoPE from `get_rope_index` when the
    chunk's visual runs follow `<|vision_start|>` (native layout), [N, L] 1-D positions over real tokens
    otherwise (reference layout, text-only chunks; the model repeats them on its three rope axes), or
    [4, 1, T] for a packed chunk (row 0: per-row text positions)."""
    if "cu_seqlens" in inputs:
        return _packed_positions(inner, inputs)
    ids = inputs["input_ids"]
    grid, vgrid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    if (grid is not None or vgrid is not None) and _vision_started(ids, inner):
        positions, _ = inner.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=grid,
            video_grid_thw=vgrid,
            attention_mask=inputs["attention_mask"],
        )
        return positions
    return positions_from_mask(inputs["attention_mask"])


def hidden_states(hf_model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    inner = hf_model.model
    ids = inputs["input_ids"]
    grid, vgrid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    visual = grid is not None or vgrid is not None
    attention_mask = None if "cu_seqlens" in inputs else inputs["attention_mask"]
    positions = position_ids(inner, inputs)
    out = inner(
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=positions,
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=grid,
        pixel_values_videos=inputs.get("pixel_values_videos"),
        video_grid_thw=vgrid,
        mm_token_type_ids=inputs.get("mm_token_type_ids") if visual else None,
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


def _make_tiny(spec: _QwenSpec) -> Callable[..., tuple[nn.Module, ProcessorPair]]:
    def tiny(
        text_dims: Mapping[str, Any] | None = None,
        vision_dims: Mapping[str, Any] | None = None,
        attn_implementation: str = "sdpa",
    ) -> tuple[nn.Module, ProcessorPair]:
        """A randomly initialised model with a tiny tokenizer: hidden ~64 and 2 layers unless
        `text_dims` / `vision_dims` override config fields (a released model's sizes, for benchmarks)."""
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
        vision = dict(
            depth=2, num_heads=2, patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2
        )
        if spec.name == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        else:  # Qwen2.5-VL and Qwen3-VL: a vision MLP and a projection to out_hidden_size
            vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        if spec.name == "qwen3_vl":
            text.update(head_dim=16)
            rope.update(mrope_section=[4, 2, 2], mrope_interleaved=True)
            vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        elif spec.name == "qwen2_5_vl":
            vision.update(window_size=56, fullatt_block_indexes=[1])
        text.update(rope_parameters=rope)
        config = getattr(transformers, spec.config_class)(
            text_config={**text, **(text_dims or {})},
            vision_config={**vision, **(vision_dims or {})},
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        config._attn_implementation = attn_implementation
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
    # Qwen3-VL has no VLM2Vec reference recipe: its default is its own layout (with video timestamps)
    layout = "native" if spec.name == "qwen3_vl" else "reference"
    return register_family(
        BackboneFamily(
            name=spec.name,
            model_types=(spec.model_type,),
            image_token=IMAGE_TOKEN if layout == "reference" else NATIVE_IMAGE_TOKEN,
            padding_side="left",
            lora_targets=list(LORA_TARGETS),
            load=_make_load(spec),
            tiny=_make_tiny(spec),
            prepare=functools.partial(prepare, timestamps=spec.name == "qwen3_vl"),
            count_tokens=functools.partial(count_tokens, timestamps=spec.name == "qwen3_vl"),
            hidden_states=hidden_states,
            vision_tower=vision_tower,
            module=__name__,
            default_settings=ProcessorSettings("native", min_pixels, max_pixels, prompt_layout=layout),
            supports_packed=True,
            input_kinds=frozenset({"image", "multi_image", "video"}),
        )
    )


QWEN2_VL, QWEN2_5_VL, QWEN3_VL = (_register(SPECS[n]) for n in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
