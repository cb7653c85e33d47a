"""The model a run trains: `build_model` loads it from its source (the demo model, a checkpoint, a tiny
random model, a pretrained backbone) and makes the parts the options ask for trainable (LoRA / DoRA /
full); `check_fit` refuses options under which the longest allowed row cannot fit, before any batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from vlm2vec.backbones import ProcessorSettings
from vlm2vec.config import DEMO_MODEL, TINY_PREFIX, TrainConfig
from vlm2vec.demo.default_data import FEATURE_FILE
from vlm2vec.demo.recipe import load_demo_model
from vlm2vec.errors import ConfigError
from vlm2vec.lora import lora_target_names
from vlm2vec.model import VLM2Vec


def model_source(config: TrainConfig) -> str:
    """Where the options take the model from: "demo" (the default model), "checkpoint" (a saved VLM2Vec
    to go on training), "tiny" (a small random model of a family, `tiny:<family>`: offline
    benchmarks and tests) or "pretrained" (a backbone directory or hub id)."""
    if config.model_name == DEMO_MODEL:  # built from its recipe (--checkpoint_path is not read for it)
        return "demo"
    if config.checkpoint_path:
        return "checkpoint"
    return "tiny" if config.model_name.startswith(TINY_PREFIX) else "pretrained"


def load_model(config: TrainConfig) -> VLM2Vec:
    """The VLM2Vec encoder the options name, as its source gives it (nothing made trainable yet)."""
    common = dict(pooling=config.pooling, normalize=config.normalize, max_len=config.max_len)
    dtype = torch.bfloat16 if config.bf16 else None
    source = model_source(config)
    if source == "checkpoint":
        return VLM2Vec.from_pretrained(
            config.checkpoint_path, dtype=dtype, is_trainable=True,
            attn_implementation=config.attn_implementation, **common,
        )  # fmt: skip
    if source == "demo":
        # image features precomputed next to the training data, when its builder cached them
        cache = os.path.join(os.path.dirname(os.path.abspath(config.dataset_name or ".")), FEATURE_FILE)
        return load_demo_model(config.seed, config.pooling, cache if os.path.isfile(cache) else None)
    if source == "tiny":
        settings = ProcessorSettings(
            config.image_resolution or "native", config.min_pixels, config.max_pixels, config.num_crops,
            config.prompt_layout,
        )  # fmt: skip
        return VLM2Vec.tiny(config.family, settings=settings, **common)
    return VLM2Vec.from_pretrained(
        config.model_name, family=config.family, dtype=dtype,
        attn_implementation=config.attn_implementation, quantization=config.quantization,
        resolution=config.image_resolution, num_crops=config.num_crops, min_pixels=config.min_pixels,
        max_pixels=config.max_pixels, prompt_layout=config.prompt_layout, **common,
    )  # fmt: skip


def build_model(
    config: TrainConfig, base: VLM2Vec | None = None, ds_config: dict[str, Any] | None = None
) -> VLM2Vec:
    """The VLM2Vec encoder (`base` if given, else `load_model`) with the trainable parts the options ask
    for (LoRA / full), in train mode.

    Under ZeRO-3 (`ds_config` stage 3) a checkpoint or pretrained backbone is loaded already
    partitioned: with transformers' `HfDeepSpeedConfig` alive, `from_pretrained` builds the model inside
    `deepspeed.zero.Init` and rank 0 copies each layer's checkpoint values into its gathered
    parameters, so no rank ever holds the whole model. LoRA layers then attach to the partitioned
    model (they are created whole; `deepspeed.initialize` partitions them). Demo and tiny models are
    built whole: zero.Init would skip transformers' weight init and give other random weights than a
    1-process run."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # an earlier ZeRO-3 model of this process must not make this one partitioned
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    pretrained = base is None and model_source(config) in ("checkpoint", "pretrained")
    # transformers keeps a weak reference only: held by the model below, as long as the model lives
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config) if zero3 and pretrained else None
    model = base if base is not None else load_model(config)
    if config.lora and not model.is_peft:
        model.add_lora(
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            targets=lora_targets(config, model),
            dora=config.dora,
            vision=not config.freeze_vision,
        )
    elif not config.lora:
        model.enable_full_finetuning(train_vision=not config.freeze_vision)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.hf_deepspeed_config = hf_deepspeed_config  # alive as long as the model (peft's DoRA asks it too)
    model.matryoshka_dims = list(config.matryoshka_dims) if config.matryoshka_dims else None  # saved with it
    model.train()
    if vision_frozen(model):
        model.vision_tower.eval()  # frozen: deterministic, so its features can be reused in the recompute
    return model


def lora_targets(config: TrainConfig, model: VLM2Vec) -> list[str] | None:
    """--lora_target_modules as a list (None: the family's), refused when names given explicitly match
    Linears inside the vision tower while --freeze_vision is true.

    The reference's peft config puts adapters wherever a name matches, CLIP towers included; here a frozen
    tower takes none, so an explicit target list that reaches into it contradicts --freeze_vision: the run
    says which, instead of silently training fewer modules than the list names. The family's default
    targets are resolved outside a frozen tower (they are LM names that CLIP happens to share)."""
    if not config.lora_target_modules:
        return None
    targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()]
    tower = model.vision_tower
    if config.freeze_vision and tower is not None:
        inside = lora_target_names(tower, targets)
        if inside:
            names = sorted({n.rsplit(".", 1)[-1] for n in inside})
            raise ConfigError(
                f"--lora_target_modules names {','.join(names)}, which match {len(inside)} Linear modules "
                f"inside the vision tower (e.g. {inside[0]}), but --freeze_vision is true: set "
                "--freeze_vision false to train adapters there (the reference does), or name only "
                "language-model modules"
            )
    return targets


def image_tokens_per_image(model: VLM2Vec) -> int:
    """Tokens one image costs at the model's image settings: exact for a resolution preset (every image
    is resized to it), the most any image can cost otherwise (a 4096x4096 probe: Qwen's max_pixels,
    LLaVA-NeXT's largest anyres grid and Phi-3.5-V's crop count cap it)."""
    probe = Image.new("RGB", model.settings.image_size or (4096, 4096))
    return int(model.count_tokens("", probe)) - int(model.count_tokens(""))


def check_fit(config: TrainConfig, model: VLM2Vec) -> None:
    """ConfigError, before any batch is built, when the longest row the options allow cannot fit.

    That row is one image at the configured resolution plus --max_len text tokens (image tokens do not
    count toward --max_len and are never cut). It cannot fit when it is longer than the language model's
    max_position_embeddings (positions it never saw), or when the image alone exceeds
    --gc_max_visual_tokens (a GradCache chunk's token budget: every image row would break it; a budget
    below image + max_len is fine, long-text rows then get a chunk of their own). Without this check the
    run would find out at the first such row, possibly many steps in. Rows with several images or a
    video are not bounded here. Also refused: a --matryoshka_dims size over the model's embedding size."""
    dims, width = config.matryoshka_dims, model.embedding_dim
    if dims and max(dims) > width:
        raise ConfigError(
            f"--matryoshka_dims {dims}: {max(dims)} is more than the model's embedding size {width}"
        )
    if model.vision_tower is None or config.model_name == DEMO_MODEL:  # the demo: 1 feature token/image
        return
    n_image = image_tokens_per_image(model)
    longest = n_image + config.max_len
    text_config = model.hf_model.config
    text_config = text_config.get_text_config() if hasattr(text_config, "get_text_config") else text_config
    limit = getattr(text_config, "max_position_embeddings", None)
    what = (
        f"one image at {model.settings.resolution} resolution costs {n_image} tokens, so with --max_len "
        f"{config.max_len} text tokens a row can be {longest} tokens long"
    )
    if limit is not None and longest > limit:
        raise ConfigError(f"{what}, more than the model's {limit} positions: lower --max_len or resolution")
    budget = config.gc_max_visual_tokens if config.grad_cache else None
    if budget is not None and n_image > budget:
        raise ConfigError(
            f"one image at {model.settings.resolution} resolution costs {n_image} tokens, more than "
            f"--gc_max_visual_tokens {budget} (a GradCache chunk's budget): raise it to {n_image} or more"
        )


def vision_frozen(model: VLM2Vec) -> bool:
    tower = model.vision_tower
    return tower is not None and not any(p.requires_grad for p in tower.parameters())
