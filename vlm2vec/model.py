"""The VLM2Vec encoder: backbone -> last-layer hidden state of the last real token (or mean) -> L2 norm.

One encoder serves queries and targets. Everything family-specific goes through `BackboneFamily` hooks
(backbones.py), so this file never branches on the model kind. Two jobs live beside it: keeping ZeRO-3
ranks aligned with dummy vision passes (vision_alignment.py) and replaying a frozen tower's features in
GradCache's recompute (feature_replay.py).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from PIL.Image import Image
from torch import nn
from tqdm.auto import tqdm

from vlm2vec.adapters import load_adapter
from vlm2vec.backbones import BackboneFamily, Processor, ProcessorSettings, RowImages, family_of, get_family
from vlm2vec.feature_replay import replay_frozen_features
from vlm2vec.lora import add_lora
from vlm2vec.media import DEFAULT_NUM_FRAMES, VideoSource, load_video
from vlm2vec.released import released_checkpoint
from vlm2vec.vision_alignment import (
    DUMMY_VISION_KEY,
    VISUAL_INPUT_KEYS,
    dummy_image,
    dummy_vision_passes,
    image_feature_inputs,
    visual_calls,
)

__all__ = [
    "DUMMY_VISION_KEY",  # re-exported: the trainer imports it from here
    "META_FILE",
    "POOLINGS",
    "RowImages",
    "VISUAL_INPUT_KEYS",
    "VLM2Vec",
    "last_token_index",
    "pool",
    "resolve_attn_implementation",
    "row_kinds",
    "visual_calls",  # re-exported: the trainer imports it from here
]

META_FILE = "vlm2vec.json"
BASE_SUBDIR = "base"
POOLINGS = ("last", "mean")


def resolve_attn_implementation(requested: str | None, device: str | torch.device | None) -> str:
    """flash_attention_2 when `flash_attn` imports and the device is CUDA, else sdpa; explicit wins."""
    if requested not in (None, "auto"):
        return requested
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if on_cuda:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding (or none)."""
    length = attention_mask.shape[1]
    flipped_first_real = attention_mask.flip(1).to(torch.int64).argmax(1)
    return length - 1 - flipped_first_real


def pool(hidden: torch.Tensor, inputs: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """Pool hidden states [N, L, H] (padded) or [1, T, H] (packed, with `cu_seqlens`) to [N, H]."""
    if "cu_seqlens" in inputs:
        cu = inputs["cu_seqlens"].to(hidden.device)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if pooling == "last":
            return flat[cu[1:] - 1]
        lengths = (cu[1:] - cu[:-1]).tolist()
        return torch.stack([seg.mean(0) for seg in flat.split(lengths)])
    mask = inputs["attention_mask"].to(hidden.device)
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(mask)]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


class VLM2Vec(nn.Module):
    """Universal multimodal embedding model on top of a vision-language backbone.

    forward(inputs) is the training path (pooled, normalised [N, D] fp32 embeddings with grad);
    encode(texts, images, videos) is the batched inference path (images per row: none, one or several;
    videos: frames, a frame folder or a video file).
    """

    def __init__(
        self,
        backbone: nn.Module,
        processor: Processor,
        family: BackboneFamily,
        *,
        pooling: str = "last",
        normalize: bool = True,
        max_len: int = 4096,
        padding_side: str | None = None,
        settings: ProcessorSettings | None = None,
        freeze_vision: bool = True,
        base_path: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        padding_side = padding_side or family.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backbone = backbone
        self.processor = processor
        self.family = family
        self.pooling = pooling
        self.normalize = normalize
        self.max_len = max_len
        self.padding_side = padding_side
        self.settings = settings or family.default_settings
        self.base_path = base_path
        self.matryoshka_dims: list[int] | None = None  # trained prefix sizes (trainer), kept in vlm2vec.json
        self._dummy_inputs: dict[str, torch.Tensor] | None = None  # built on first use
        if freeze_vision and self.vision_tower is not None:
            self.vision_tower.requires_grad_(False)
        self.train(backbone.training)  # follow the backbone (transformers loads models in eval mode)

    # ----------------------------------------------------------------------------------------- views
    @property
    def settings(self) -> ProcessorSettings:
        """Image / prompt settings `prepare` runs with (saved in vlm2vec.json)."""
        return self._settings

    @settings.setter
    def settings(self, value: ProcessorSettings) -> None:
        # a copy whose prompt layout is resolved (None -> the family's), so save_pretrained records it
        value = copy.deepcopy(value)
        if value.prompt_layout is None:
            value.prompt_layout = self.family.default_settings.prompt_layout or "reference"
        self._settings = value

    @property
    def hf_model(self) -> nn.Module:
        """The unwrapped backbone (peft layers, if any, are injected in place and still run)."""
        return self.backbone.get_base_model() if self.is_peft else self.backbone

    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.backbone, PeftModel)

    @property
    def vision_tower(self) -> nn.Module | None:
        """The image encoder (frozen by default), or None for text-only backbones."""
        return self.family.vision_tower(self.hf_model)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.backbone.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # ------------------------------------------------------------------------------------- encoding
    def prepare(
        self,
        texts: Sequence[str],
        images: Sequence[RowImages] | None = None,
        *,
        videos: Sequence[Sequence[Image] | None] | None = None,
        packed: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenise + process one chunk; pads only to this chunk's longest row (or packs it).

        images[i]: None, a PIL image or a list of them; videos[i]: None or a list of PIL frames (already
        sampled: `encode` samples paths and lists). A kind the family cannot take is refused here,
        naming the row, before any processing."""
        texts, images, videos = _check_batch(texts, images, videos)
        if packed and not self.family.supports_packed:
            raise ValueError(f"family {self.family.name!r} does not support packed=True")
        for i, (image, video) in enumerate(zip(images, videos)):
            self.family.check_inputs(row_kinds(image, video), f"row {i}")
        kwargs: dict[str, Any] = {"videos": videos} if any(v is not None for v in videos) else {}
        return self.family.prepare(
            self.processor,
            texts,
            images,
            self.max_len,
            packed,
            padding_side=self.padding_side,
            settings=self.settings,
            **kwargs,
        )

    def count_tokens(self, text: str, images: RowImages = None, video: Sequence[Image] | None = None) -> int:
        """Tokens the backbone sees for one row (visual + text), exactly as `prepare` builds it: what a
        chunk's memory scales with (GradCache chunks sized by a token budget)."""
        if self.family.count_tokens is not None:  # from image sizes alone
            self.family.check_inputs(row_kinds(images, video), "this row")
            return self.family.count_tokens(
                self.processor, text, images, video, self.max_len, settings=self.settings
            )
        inputs = self.prepare([text], [images], videos=[video] if video is not None else None)
        return int(inputs["input_ids"].shape[-1])

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings [N, D] (fp32, L2-normalised when `normalize`) of a prepared chunk.

        `inputs["vision_dummies"] = n` (set by the trainer) also runs the vision path n times on a dummy
        image, weighted by exactly zero: the result is unchanged, but every process runs the same
        submodules (ZeRO-3 fetches each one's weights with collectives)."""
        inputs = dict(inputs)
        dummies = int(inputs.pop(DUMMY_VISION_KEY, 0))
        inputs = self._to_device(inputs)
        with dummy_vision_passes(self.hf_model, dummies, self._dummy_image_features):
            hidden = self.family.hidden_states(self.hf_model, inputs)
        pooled = pool(hidden, inputs, self.pooling).float()
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        images: Sequence[RowImages] | None = None,
        videos: Sequence[VideoSource | None] | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
        packed: bool = False,
        sort_by_length: bool = True,
        num_frames: int | None = DEFAULT_NUM_FRAMES,
    ) -> torch.Tensor:
        """Embed texts (+ images, + videos) in batches, eval mode, no grad; returns fp32 [N, D] on the CPU,
        rows in input order.

        images[i]: None, a PIL image or a list of them (`<|image_1|>`, `<|image_2|>`, ... in the text).
        videos[i]: None, a list of frames (PIL or paths), a frame folder or a video file (`<|video_1|>`);
        `num_frames` frames are sampled uniformly by index (None: every frame). A row gets the same vector
        whether it is encoded alone or in a mixed, padded batch, so rows are batched by similar size
        (videos, then images, then by text length) to pad less."""
        texts, images, videos = _check_batch(texts, images, videos)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kinds = set().union(*(row_kinds(i, v) for i, v in zip(images, videos))) if texts else set()
        self.family.check_inputs(kinds, "this batch")
        order = list(range(len(texts)))
        if sort_by_length:
            order.sort(key=lambda i: (videos[i] is None, -_n_images(images[i]), -len(texts[i])))
        was_training = self.training
        self.eval()
        chunks = []
        try:
            starts = range(0, len(order), batch_size)
            for s in tqdm(starts, desc="encode", unit="batch", disable=not show_progress):
                rows = order[s : s + batch_size]
                frames = [
                    None if videos[i] is None else load_video(videos[i], num_frames, where=f"videos[{i}]")
                    for i in rows
                ]
                inputs = self.prepare(
                    [texts[i] for i in rows], [images[i] for i in rows], videos=frames, packed=packed
                )
                chunks.append(self(inputs).cpu())
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.embedding_dim)
        out = torch.empty(len(order), chunks[0].shape[1])
        out[torch.tensor(order)] = torch.cat(chunks)
        return out

    @property
    def embedding_dim(self) -> int:
        """D of the embeddings: the LM hidden size (`config.text_config.hidden_size` / `config.hidden_size`,
        or an `embedding_dim` attribute on a custom backbone module)."""
        hf_model = self.hf_model
        if hasattr(hf_model, "embedding_dim"):
            return int(hf_model.embedding_dim)
        config = getattr(hf_model, "config", None)
        text_config = getattr(config, "text_config", None) or config
        if text_config is None or not hasattr(text_config, "hidden_size"):
            raise AttributeError(f"cannot tell the embedding size of {type(hf_model).__name__}")
        return int(text_config.hidden_size)

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device, dtype = self.device, self.dtype
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype if value.is_floating_point() else None)
            moved[key] = value
        return moved

    # ------------------------------------------- ZeRO-3 alignment and frozen-feature replay (own modules)
    def _dummy_image_features(self) -> object:
        """The backbone's image features (`get_image_features`) of a small blank image
        (vlm2vec/vision_alignment.py); its prepared inputs are built once."""
        if self._dummy_inputs is None:
            self._dummy_inputs = image_feature_inputs(self.hf_model, self.prepare([""], [dummy_image()]))
        return self.hf_model.get_image_features(**self._to_device(self._dummy_inputs))

    def reuse_vision_features(self) -> AbstractContextManager[dict[str, int]]:
        """Inside this block the (frozen) vision tower's second run on an input replays the first
        (vlm2vec/feature_replay.py: GradCache's recompute reuses the first pass's image features).
        Yields counters {"computed", "reused"}; raises ValueError if the tower has trainable weights."""
        return replay_frozen_features(self.vision_tower)

    # ------------------------------------------------------------------------------ fine-tuning modes
    def add_lora(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.1,
        targets: Sequence[str] | None = None,
        dora: bool = False,
        init: str | bool = "gaussian",
        vision: bool = False,
    ) -> VLM2Vec:
        """Wrap the backbone with a peft LoRA (or DoRA) adapter on the LLM; everything else frozen but the
        family's modules_to_save. vision: also adapt matching Linears inside the vision tower (the
        reference does: CLIP's q/k/v/out_proj in LLaVA-NeXT and Phi-3.5-V); its base weights stay frozen."""
        if self.is_peft:
            raise ValueError("the backbone already has a LoRA adapter (merge_lora() first)")
        self.backbone = add_lora(
            self.backbone,
            targets=list(targets) if targets is not None else self.family.lora_targets,
            exclude=None if vision else self.vision_tower,
            r=r,
            alpha=alpha,
            dropout=dropout,
            dora=dora,
            init=init,
            modules_to_save=self.family.modules_to_save,
        )
        return self

    def load_adapter(self, directory: str, is_trainable: bool = False) -> VLM2Vec:
        """Attach a saved peft adapter (adapter_config.json + adapter_model.safetensors or .bin) to the
        base backbone; keys saved under older transformers module names are renamed, and a weight that
        stays unloaded raises ValueError naming it (vlm2vec/adapters.py)."""
        if self.is_peft:
            raise ValueError("the backbone already has a LoRA adapter")
        self.backbone = load_adapter(self.backbone, directory, is_trainable=is_trainable)
        return self

    def merge_lora(self) -> VLM2Vec:
        """Fold the adapter into the base weights (plain backbone afterwards)."""
        if not self.is_peft:
            raise ValueError("merge_lora() needs a LoRA adapter; this backbone has none")
        self.backbone = self.backbone.merge_and_unload()
        return self

    def enable_full_finetuning(self, train_vision: bool = False) -> VLM2Vec:
        """Train every weight of the backbone (the vision tower only when train_vision=True)."""
        if self.is_peft:
            raise ValueError("full fine-tuning of a LoRA-wrapped backbone: merge_lora() first")
        self.backbone.requires_grad_(True)
        if self.vision_tower is not None and not train_vision:
            self.vision_tower.requires_grad_(False)
        return self

    def gradient_checkpointing_enable(self) -> VLM2Vec:
        """Recompute activations in backward (non-reentrant, works with frozen inputs and LoRA)."""
        hf_model = self.hf_model
        if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return self

    # ---------------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str, save_base: bool | None = None) -> None:
        """Write a directory `from_pretrained` loads back.

        Full / merged models: weights + processor + vlm2vec.json. LoRA: the adapter + vlm2vec.json naming
        the base; the base itself is written to `<dir>/base` when it has no loadable path (tiny models)
        or when save_base=True."""
        os.makedirs(directory, exist_ok=True)
        meta: dict[str, Any] = {
            "family": self.family.name,
            "family_module": self.family.module,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_len": self.max_len,
            "padding_side": self.padding_side,
            "settings": self.settings.to_dict(),
            "matryoshka_dims": self.matryoshka_dims,  # the prefix sizes it was trained for (None: only D)
        }
        if self.is_peft:
            self.backbone.save_pretrained(directory)
            if save_base or (save_base is None and not self.base_path):
                base = copy.deepcopy(self.backbone).unload()
                self.family.save(base, self.processor, os.path.join(directory, BASE_SUBDIR))
                meta["base"] = BASE_SUBDIR
            else:
                meta["base"] = self.base_path
        else:
            self.family.save(self.hf_model, self.processor, directory)
        with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def tiny(cls, family: str, *, build: Mapping[str, Any] | None = None, **model_kwargs: Any) -> VLM2Vec:
        """A tiny randomly initialised VLM2Vec of `family` (hidden ~64, 2 layers), built offline:
        tests, benchmarks, the trainer's `tiny:<family>` models. `build`: keyword arguments of the
        family's builder (Qwen: `text_dims` / `vision_dims` give a released model's sizes)."""
        fam = get_family(family)
        hf_model, processor = fam.tiny(**(build or {}))
        # tiny processors carry their own small image settings; ProcessorSettings() defers to them
        model_kwargs.setdefault("settings", ProcessorSettings())
        return cls(hf_model, processor, fam, **model_kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        family: str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        quantization: str | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_len: int | None = None,
        padding_side: str | None = None,
        resolution: str | None = None,
        num_crops: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        prompt_layout: str | None = None,
        device: str | torch.device | None = None,
        is_trainable: bool = False,
        freeze_vision: bool = True,
    ) -> VLM2Vec:
        """Load a base model (hub id or directory) and, if the directory holds one, its LoRA adapter.

        Settings come from, in increasing priority: the family's defaults; for a directory without
        vlm2vec.json that is a released VLM2Vec checkpoint (its hub id, or a local copy named like it),
        that checkpoint's settings (vlm2vec/released.py); what vlm2vec.json recorded; explicit arguments.
        A vlm2vec.json written before prompt layouts were recorded means the `native` layout (what this
        code wrote then). quantization="nf4" loads the base with bitsandbytes 4-bit NF4 weights (QLoRA).
        attn_implementation None/"auto": flash_attention_2 on CUDA when flash_attn imports, else sdpa.
        An adapter saved under older transformers module names is renamed on load (vlm2vec/adapters.py)."""
        if quantization not in (None, "nf4"):
            raise ValueError(f"quantization must be None or 'nf4', got {quantization!r}")
        path = os.fspath(path_or_id)
        meta: dict[str, Any] = {}
        if os.path.isfile(os.path.join(path, META_FILE)):
            with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
                meta = json.load(f)
            meta.setdefault("settings", {}).setdefault("prompt_layout", "native")
        released = None if meta else released_checkpoint(path)
        if released is not None:
            meta = released.meta()
        if released is not None and not os.path.isdir(path):
            path = released.download()  # an adapter repo has no config.json: read it as a directory
        adapter_dir = path if os.path.isfile(os.path.join(path, "adapter_config.json")) else None
        base_path = path
        if adapter_dir is not None:
            base_path = meta.get("base") or _adapter_base(adapter_dir)
            if not os.path.isabs(base_path) and os.path.isdir(os.path.join(adapter_dir, base_path)):
                base_path = os.path.join(adapter_dir, base_path)
        if family is not None:
            fam = get_family(family)
        elif meta.get("family"):
            if meta.get("family_module"):
                importlib.import_module(meta["family_module"])
            fam = get_family(meta["family"])
        else:
            fam = family_of(base_path)
        recorded = {**fam.default_settings.to_dict(), **meta.get("settings", {})}
        explicit = {
            "resolution": resolution,
            "num_crops": num_crops,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "prompt_layout": prompt_layout,
        }
        settings = ProcessorSettings(**{**recorded, **{k: v for k, v in explicit.items() if v is not None}})
        attn = resolve_attn_implementation(attn_implementation, device)
        load_kwargs: dict[str, Any] = dict(
            dtype=dtype, attn_implementation=attn, quantization=quantization, settings=settings
        )
        takes_device = "device" in inspect.signature(fam.load).parameters
        if takes_device:
            load_kwargs["device"] = device
        hf_model, processor = fam.load(base_path, **load_kwargs)
        if device is not None and not takes_device:
            hf_model.to(device)
        model = cls(
            hf_model,
            processor,
            fam,
            pooling=pooling or meta.get("pooling", "last"),
            normalize=meta.get("normalize", True) if normalize is None else normalize,
            max_len=max_len or meta.get("max_len", 4096),
            padding_side=padding_side or meta.get("padding_side"),
            settings=settings,
            freeze_vision=freeze_vision,
            base_path=base_path if not os.path.isdir(base_path) else os.path.abspath(base_path),
        )
        if adapter_dir is not None:
            model.load_adapter(adapter_dir, is_trainable=is_trainable)
        model.matryoshka_dims = meta.get("matryoshka_dims")
        return model


def _adapter_base(adapter_dir: str) -> str:
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{adapter_dir}: adapter_config.json names no base model and there is no {META_FILE}"
        )
    return base


def _n_images(value: RowImages) -> int:
    return 0 if value is None else len(value) if isinstance(value, list | tuple) else 1


def row_kinds(image: RowImages, video: VideoSource | None) -> set[str]:
    """The input kinds of one row: "image" / "multi_image" by its image count, "video" if it has one."""
    n = _n_images(image)
    kinds = {"image"} if n == 1 else {"multi_image"} if n > 1 else set()
    return kinds | ({"video"} if video is not None else set())


def _check_batch(
    texts: Sequence[str],
    images: Sequence[RowImages] | None,
    videos: Sequence[VideoSource | None] | None = None,
) -> tuple[list[str], list[RowImages], list[VideoSource | None]]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
    out = []
    for name, values in (("images", images), ("videos", videos)):
        if values is None:
            out.append([None] * len(texts))
            continue
        values = list(values)
        if len(values) != len(texts):
            raise ValueError(
                f"{name} has {len(values)} entries but texts has {len(texts)}; pass None for rows without"
            )
        out.append(values)
    return texts, out[0], out[1]
