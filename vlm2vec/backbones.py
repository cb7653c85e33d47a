"""Backbone families: the per-model facts and hooks the shared encoder needs.

A `BackboneFamily` says how to load one kind of vision-language model, how to turn texts + images into
model inputs, and how to get last-layer hidden states out of it. `VLM2Vec` (model.py) is written only
against this protocol, so a family whose model is a custom `nn.Module` (the CPU demo) plugs in through
`register_family` just like the stock transformers families.

Built-in families (stock transformers classes, no remote code): qwen2_vl, qwen2_5_vl, qwen3_vl,
llava_next, phi3_v. Their hooks live in `vlm2vec/families/`; they are imported on first use.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from PIL.Image import Image
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

RowImages = Image | Sequence[Image] | None
"""One row's images: none, one, or several (`<|image_1|>`, `<|image_2|>`, ... in its text)."""
STORED_IMAGE_PLACEHOLDER = "<|image_1|>"
"""The image placeholder MMEB data stores; `prepare` replaces it by the family's own image token."""
STORED_VIDEO_PLACEHOLDER = "<|video_1|>"
"""The video placeholder (MMEB-V2 rows); `prepare` replaces it by the family's video tokens."""

INPUT_KINDS = ("image", "multi_image", "video")
"""What a row's visual part can be beyond text: one image, several images, one video (sampled frames)."""

RESOLUTIONS: dict[str, tuple[int, int] | None] = {
    "low": (336, 336),
    "mid": (672, 672),
    "high": (1344, 1344),
    "native": None,
}
"""Image resolution presets: images are resized to this (width, height) before the family's image
processor runs; `native` keeps the image size (Qwen: dynamic, bounded by min/max pixels). low/high are the
paper's 336/1344; `mid` is the reference code's 672 (its `low` is 128x128, not offered: see
docs/reference_parity.md)."""

QWEN_MIN_PIXELS = 4 * 28 * 28
"""The reference's Qwen2-VL lower bound (V2.0 `resize_min_pixels` default, main src/arguments.py:45)."""
QWEN_MAX_PIXELS = 1280 * 28 * 28

PROMPT_LAYOUTS = ("reference", "native")
"""How a family writes an image / video into the token row. `reference`: as VLM2Vec trained its released
checkpoints (Qwen: a bare run of `<|image_pad|>` / `<|video_pad|>`, no vision start/end, so the reference's
`get_rope_index` finds no vision start and every token gets plain 1-D positions). `native`: the backbone's
own chat layout (Qwen: `<|vision_start|>pads<|vision_end|>` with M-RoPE 3-D positions). LLaVA-NeXT and
Phi-3.5-V write the same tokens either way."""

Quantization = Literal["nf4"] | None
PaddingSide = Literal["left", "right"]


class Processor(Protocol):
    """What vlm2vec needs of a processor itself (a transformers processor, or a family's own tokenizer +
    image-processor pair): it writes itself beside the weights; everything else goes through the
    family's hooks, which know their processor's type."""

    def save_pretrained(self, save_directory: str) -> object: ...


class LoadFn(Protocol):
    def __call__(
        self,
        path_or_id: str,
        *,
        dtype: torch.dtype | None,
        attn_implementation: str | None,
        quantization: Quantization,
        settings: ProcessorSettings,
        device: str | torch.device | None = None,
    ) -> tuple[nn.Module, Processor]: ...


class PrepareFn(Protocol):
    def __call__(
        self,
        processor: Processor,
        texts: list[str],
        images: list[RowImages],
        max_len: int,
        packed: bool = False,
        *,
        padding_side: PaddingSide,
        settings: ProcessorSettings,
        videos: list[list[Image] | None] | None = None,
    ) -> dict[str, torch.Tensor]: ...


@dataclass
class ProcessorSettings:
    """Image-processing knobs that are not part of the checkpoint (kept in vlm2vec.json).

    resolution: a key of RESOLUTIONS. min_pixels / max_pixels: Qwen dynamic-resolution bounds.
    num_crops: Phi-3.5-V HD crops (the paper uses 4). prompt_layout: one of PROMPT_LAYOUTS, or None for
    the family's default (`VLM2Vec` resolves it, so a saved model records the layout it used)."""

    resolution: str = "native"
    min_pixels: int | None = None
    max_pixels: int | None = None
    num_crops: int | None = None
    prompt_layout: str | None = None

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {sorted(RESOLUTIONS)}, got {self.resolution!r}")
        if self.prompt_layout is not None and self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout must be one of {PROMPT_LAYOUTS}, got {self.prompt_layout!r}")
        if self.num_crops is not None and self.num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {self.num_crops}")

    @property
    def image_size(self) -> tuple[int, int] | None:
        return RESOLUTIONS[self.resolution]

    def to_dict(self) -> dict[str, Any]:
        keys = ("resolution", "min_pixels", "max_pixels", "num_crops", "prompt_layout")
        return {k: getattr(self, k) for k in keys}


def _no_vision_tower(hf_model: nn.Module) -> nn.Module | None:
    return None


def default_save(hf_model: nn.Module, processor: Processor, directory: str) -> None:
    """Write model + processor the transformers way (config.json, safetensors, tokenizer files)."""
    hf_model.save_pretrained(directory)
    processor.save_pretrained(directory)


@dataclass
class BackboneFamily:
    """Everything family-specific; model.py never branches on the family name.

        name: registry key, written to vlm2vec.json. model_types: `config.model_type` values that identify
        the family (auto-detection). image_token: what `<|image_1|>` becomes in the text. padding_side:
        default padding side for batches. lora_targets: default peft target module names (LLM only, so the
        vision tower stays frozen).

        Hooks:
          load(path_or_id, *, dtype, attn_implementation, quantization, settings[, device]) -> (hf_model,
              processor); `device` is optional in the signature (when absent the model is moved after load)
          tiny() -> (hf_model, processor): random init, built offline (tests, benchmarks).
          prepare(processor, texts, images, max_len, packed=False, *, padding_side, settings, videos=None)
              -> inputs: images[i] is None, a PIL image or a list of them; videos (only passed when some
              row has one) [i] is None or a list of PIL frames. Pads only to the longest row of this call
              (or packs: input_ids [1, T] + position_ids + cu_seqlens); `attention_mask` [N, L] is present
              whenever the result is padded; raises ValueError naming the row when max_len would cut
              image tokens.
          hidden_states(hf_model, inputs) -> last-layer hidden states [N, L, H] ([1, T, H] when packed).
              hf_model is the unwrapped model (peft layers injected in place still run). Pooling then reads
              inputs["attention_mask"] (padded) or inputs["cu_seqlens"] (packed).
          vision_tower(hf_model) -> the frozen image encoder module, or None.
          save(hf_model, processor, directory): writes what `load(directory, ...)` reads back.
        module: importable module that registers this family (so a saved directory of a non-built-in
        family loads after `import module`). default_settings: ProcessorSettings used by from_pretrained
        unless vlm2vec.json or arguments say otherwise. supports_packed: prepare(packed=True) works.
    modules_to_save: modules trained in full beside a LoRA adapter and saved with it (peft's
    modules_to_save), e.g. a freshly initialised projector.
    input_kinds: which of INPUT_KINDS `prepare` takes; `check_inputs` refuses the others up front.
    count_tokens(processor, text, images, video, max_len, *, settings) -> int: optional, the length
    `prepare` gives one row without processing pixels (token-budget chunking); else prepare is run.
    """

    name: str
    model_types: tuple[str, ...]
    image_token: str
    padding_side: PaddingSide
    lora_targets: list[str]
    load: LoadFn
    tiny: Callable[..., tuple[nn.Module, Processor]]
    prepare: PrepareFn
    hidden_states: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    vision_tower: Callable[[nn.Module], nn.Module | None] = _no_vision_tower
    save: Callable[[nn.Module, Processor, str], None] = default_save
    module: str | None = None
    default_settings: ProcessorSettings = field(default_factory=ProcessorSettings)
    supports_packed: bool = False
    modules_to_save: tuple[str, ...] = ()
    input_kinds: frozenset[str] = frozenset({"image"})
    count_tokens: Callable[..., int] | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        unknown = set(self.input_kinds) - set(INPUT_KINDS)
        if unknown:
            raise ValueError(f"input_kinds must be drawn from {INPUT_KINDS}, got {sorted(unknown)}")

    def check_inputs(self, kinds: Iterable[str], where: str = "the data") -> None:
        """Raise ValueError (before anything is encoded) when `where` needs an input kind this family
        cannot take, e.g. video rows for a family with image inputs only."""
        missing = sorted(set(kinds) - set(self.input_kinds) - {"text"})
        if missing:
            raise ValueError(
                f"{where} has {' and '.join(k.replace('_', '-') + ' rows' for k in missing)}, but backbone "
                f"family {self.name!r} takes only {sorted(self.input_kinds)} visual inputs"
            )


FAMILIES: dict[str, BackboneFamily] = {}
_BUILTIN_MODULES = {
    "qwen2_vl": "vlm2vec.families.qwen",
    "qwen2_5_vl": "vlm2vec.families.qwen",
    "qwen3_vl": "vlm2vec.families.qwen",
    "llava_next": "vlm2vec.families.llava_next",
    "phi3_v": "vlm2vec.families.phi3_v",
}


def register_family(family: BackboneFamily, *, overwrite: bool = False) -> BackboneFamily:
    """Add a family to FAMILIES (the demo registers its own); returns it for use as a one-liner."""
    if not isinstance(family, BackboneFamily):
        raise TypeError(f"family must be a BackboneFamily, got {type(family).__name__}")
    if family.name in FAMILIES and FAMILIES[family.name] is not family and not overwrite:
        raise ValueError(f"family {family.name!r} is already registered (pass overwrite=True to replace it)")
    FAMILIES[family.name] = family
    return family


def _load_builtins() -> None:
    for module in dict.fromkeys(_BUILTIN_MODULES.values()):
        importlib.import_module(module)


def get_family(name: str) -> BackboneFamily:
    """The registered family called `name` (built-ins are imported on demand)."""
    if name not in FAMILIES and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in FAMILIES:
        _load_builtins()
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(path_or_config: str | os.PathLike | PretrainedConfig) -> BackboneFamily:
    """Detect the family of a model directory, hub id or config (via vlm2vec.json or config.model_type)."""
    model_type = None
    if isinstance(path_or_config, str | os.PathLike):
        path = os.fspath(path_or_config)
        meta = os.path.join(path, "vlm2vec.json")
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                info = json.load(f)
            if info.get("family_module"):
                importlib.import_module(info["family_module"])
            return get_family(info["family"])
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        else:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(path).model_type
    else:
        model_type = getattr(path_or_config, "model_type", None)
    if model_type is None:
        raise ValueError(f"cannot tell the backbone family of {path_or_config!r}: no model_type")
    _load_builtins()
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(f"no backbone family handles model_type {model_type!r}; known: {sorted(FAMILIES)}")


def tiny_families() -> list[str]:
    """Names of the built-in families that `tiny` builds."""
    return list(_BUILTIN_MODULES)
