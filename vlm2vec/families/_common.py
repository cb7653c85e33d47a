"""Helpers shared by the built-in families: tiny tokenizers, placeholder handling, length checks,
padding and packing of token rows."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from vlm2vec.backbones import STORED_IMAGE_PLACEHOLDER, Processor, RowImages
from vlm2vec.lora import nf4_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

TINY_CORPUS = [
    "Represent the given image.",
    "Represent the given image with the following question:",
    "Find a caption for the photo. A dog runs on the grass next to a small red car.",
    "What is shown in this picture? Two cats sleep on a blue sofa.",
    "Retrieve an image that matches the text: a man rides a bicycle in the city at night.",
    "Select the news headline for this photograph of a football match in the rain.",
    "0123456789 .,:;!?'\"()[]{}<>-_/+*=%&#@ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tiny_tokenizer(
    special_tokens: Sequence[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    vocab_size: int = 320,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process (milliseconds) with the family's special tokens.

    Byte-level: every string tokenises (no unknown tokens); the specials are atomic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([t for t in (bos, eos, pad) if t] + list(special_tokens)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer)
    if bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in special_tokens if t not in (bos, eos, pad)],
    )


PLACEHOLDER = re.compile(r"<\|(image|video)_(\d+)\|>")
"""Backbone-agnostic placeholders in stored texts: `<|image_1|>`, `<|image_2|>`, ... and `<|video_1|>`."""


def expand_placeholders(
    text: str, n_images: int, n_videos: int, row: int, image_token: str, video_token: str | None = None
) -> str:
    """Replace `<|image_k|>` / `<|video_k|>` by the family's tokens, checking them against the inputs.

    The placeholders of a row must be `<|image_1|>..<|image_n|>` for its n images, in that order (the
    model consumes image features in text order), and `<|video_1|>` for its video; a row with visual
    inputs and no placeholder at all gets them prepended (images first). The family's own image token
    written in the text counts as the next image (texts prepared for one backbone keep working).
    Errors (ValueError) name the row."""
    native = re.escape(image_token) if image_token != STORED_IMAGE_PLACEHOLDER else None
    pattern = PLACEHOLDER if native is None else re.compile(f"{PLACEHOLDER.pattern}|({native})")
    found = list(pattern.finditer(text))
    if not found and (n_images or n_videos):
        marks = [f"<|image_{k}|>" for k in range(1, n_images + 1)] + ["<|video_1|>"] * n_videos
        text = " ".join(marks) + (f" {text}" if text else "")
        found = list(PLACEHOLDER.finditer(text))
    next_image, out, last = 1, [], 0
    n_video_marks = 0
    for m in found:
        if m.group(1) == "video":
            if n_videos == 0:
                raise ValueError(f"row {row}: the text has {m.group(0)} but no video was given")
            if int(m.group(2)) != 1 or n_video_marks:
                raise ValueError(
                    f"row {row}: a row holds one video, written <|video_1|> once; got {m.group(0)}"
                )
            if video_token is None:
                raise ValueError(f"row {row}: this family takes no video input")
            n_video_marks += 1
            token = video_token
        else:
            k = next_image if m.group(1) is None else int(m.group(2))
            if k != next_image:
                raise ValueError(
                    f"row {row}: image placeholders must be <|image_1|>..<|image_n|> in order; found "
                    f"{m.group(0)} where <|image_{next_image}|> was expected"
                )
            if k > n_images:
                what = "no image was given" if n_images == 0 else f"only {n_images} image(s) were given"
                raise ValueError(f"row {row}: the text has an image placeholder but {what} ({m.group(0)})")
            next_image += 1
            token = image_token
        out.append(text[last : m.start()] + token)
        last = m.end()
    out.append(text[last:])
    if next_image - 1 != n_images:
        raise ValueError(f"row {row}: the text has {next_image - 1} image placeholders but {n_images} images")
    if n_video_marks != n_videos:
        raise ValueError(f"row {row}: a video was given but the text has no <|video_1|> placeholder")
    return "".join(out)


def expand_placeholder(text: str, image_token: str, has_image: bool, row: int) -> str:
    """One image (or none) per row: `expand_placeholders` with n_images = has_image."""
    return expand_placeholders(text, int(has_image), 0, row, image_token)


def images_of(
    value: RowImages, row: int, size: tuple[int, int] | None = None, on_white: bool = False
) -> list[Image.Image]:
    """A row's images as a list of RGB PIL images: None -> [], one image -> [it], a list -> its items.

    size: a resolution preset (width, height), applied before the RGB conversion, in the image's own mode,
    as the reference does (v1 `src/dataset.py` resizes the opened file, the processor converts after):
    a palette ("P") image is resized by nearest neighbour (Pillow's rule for palettes), RGBA with
    premultiplied alpha. on_white: transparent pixels become white, as the transformers processors of the
    reference (4.46 `convert_to_rgb`) convert; otherwise a plain conversion (Phi-3.5-V's processor)."""
    if value is None:
        return []
    items = list(value) if isinstance(value, list | tuple) else [value]
    return [rgb(resize_to_preset(_pil(im, row), size), row, on_white) for im in items]


def _pil(image: object, row: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"images[{row}] must be a PIL.Image, a list of them or None, got {type(image).__name__}"
        )
    return image


def rgb(image: Image.Image, row: int, on_white: bool = False) -> Image.Image:
    """The row's image as an RGB PIL image (TypeError naming the row otherwise); on_white: transparency
    composited onto white first."""
    image = _pil(image, row)
    if image.mode == "RGB":
        return image
    if on_white and ("A" in image.getbands() or "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_preset(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """Apply a resolution preset (width, height); None keeps the image size. Bicubic, as Pillow's default
    in the reference (Pillow itself uses nearest neighbour for palette and 1-bit images)."""
    if size is None or image.size == size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def fit_length(ids: list[int], max_len: int, protected: Iterable[int], row: int) -> list[int]:
    """Keep at most `max_len` text tokens of a token row; image/video tokens (`protected`) do not count
    and are never cut.

    `max_len` is the paper's "max text length" (VLM2Vec: 256): a row keeps its first `max_len` non-image
    tokens in order (right truncation, as the reference's tokenizer truncates a text-only row) and every
    image token, so a high-resolution image (~1,225 Qwen2-VL tokens, ~2,900 LLaVA-NeXT) never makes a
    row unusable. MMEB rows put the instruction first, so a cut drops the end of the row's data text
    (a long caption or dialogue), not the instruction. `row` is kept for the families' call signature."""
    protected = set(protected)
    if len(ids) <= max_len or sum(t not in protected for t in ids) <= max_len:
        return ids
    out, kept = [], 0
    for t in ids:
        if t in protected:
            out.append(t)
        elif kept < max_len:
            out.append(t)
            kept += 1
    return out


def pad_rows(
    rows: list[list[int]],
    pad_id: int,
    padding_side: str,
    extra: dict[str, tuple[list[list[int]], int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad token rows to the longest row; returns input_ids, attention_mask and padded `extra` rows."""
    length = max((len(r) for r in rows), default=0)

    def padded(values: list[int], fill: int) -> list[int]:
        pad = [fill] * (length - len(values))
        return pad + values if padding_side == "left" else values + pad

    out = {
        "input_ids": torch.tensor([padded(r, pad_id) for r in rows], dtype=torch.long).reshape(
            len(rows), length
        ),
        "attention_mask": torch.tensor([padded([1] * len(r), 0) for r in rows], dtype=torch.long).reshape(
            len(rows), length
        ),
    }
    for key, (values, fill) in (extra or {}).items():
        out[key] = torch.tensor([padded(v, fill) for v in values], dtype=torch.long).reshape(
            len(rows), length
        )
    return out


def pack_rows(
    rows: list[list[int]], extra: dict[str, list[list[int]]] | None = None
) -> dict[str, torch.Tensor]:
    """Concatenate rows into one padding-free sequence [1, T] with per-row restarting position_ids and
    cu_seqlens (flash-attention varlen layout; transformers builds a block-diagonal mask from the
    position_ids for sdpa/eager)."""
    if any(len(r) == 0 for r in rows):
        raise ValueError("cannot pack an empty row")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    out = {
        "input_ids": torch.tensor([t for r in rows for t in r], dtype=torch.long)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
        "cu_seqlens": cu,
    }
    for key, values in (extra or {}).items():
        out[key] = torch.tensor([t for v in values for t in v], dtype=torch.long)[None]
    return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift a row's positions."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


def image_sizes_hidden_states(hf_model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states of a `model.model(..., pixel_values, image_sizes)` backbone (LLaVA-NeXT,
    Phi-3.5-V): positions from the mask, or the packed layout's restarting position_ids."""
    if "cu_seqlens" in inputs:
        attention_mask, positions = None, inputs["position_ids"]
    else:
        attention_mask = inputs["attention_mask"]
        positions = positions_from_mask(attention_mask)
    out = hf_model.model(
        input_ids=inputs["input_ids"],
        attention_mask=attention_mask,
        position_ids=positions,
        pixel_values=inputs.get("pixel_values"),
        image_sizes=inputs.get("image_sizes"),
        use_cache=False,
    )
    return out.last_hidden_state


def model_kwargs(
    dtype: torch.dtype | None,
    attn_implementation: str | None,
    quantization: str | None,
    skip_modules: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """from_pretrained keyword arguments shared by the families (weights load straight onto `device`;
    4-bit weights are quantised there)."""
    kwargs: dict[str, Any] = {}
    if device is not None:
        kwargs["device_map"] = {"": str(torch.device(device))}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype, skip_modules)
    elif quantization is not None:
        raise ValueError(f"quantization must be None or 'nf4', got {quantization!r}")
    return kwargs


def is_local_dir(path: str) -> bool:
    return os.path.isdir(path)


class ProcessorPair:
    """A tokenizer + image processor saved and loaded side by side.

    Used instead of the transformers multimodal Processor classes, some of which cannot be built
    without torchvision (Qwen2VLProcessor needs a video processor); the families expand image tokens
    themselves."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Processor) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    def __repr__(self) -> str:
        return f"ProcessorPair({type(self.tokenizer).__name__}, {type(self.image_processor).__name__})"
