"""The sentence-transformers layout of an export, and the processor files it needs.

Built-in families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT) get built-in modules only:
Transformer (AutoModel + AutoProcessor, every input rendered through the exported chat template) ->
Pooling (last token or mean, as trained) -> Normalize. The files use the names and keys both
sentence-transformers 5.x and 6.x read, and the ones vLLM's `get_pooling_config` matches literally
(`sentence_transformers.models.Pooling` / `.Normalize` in modules.json, `pooling_mode_*` booleans in
1_Pooling/config.json). Other families get `vlm2vec/export_module.py` as a custom module
(trust_remote_code=True).

Positions: the tokenizer is saved with right padding, so models whose transformers class numbers
positions 0..n-1 without looking at the mask (LLaVA-NeXT) give each row the positions `VLM2Vec` gives
it; last-token pooling reads the mask either way.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from vlm2vec.export_template import build_chat_template, special_affixes
from vlm2vec.model import VLM2Vec

BUILTIN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next")
CUSTOM_FAMILIES = ("effnet_minilm", "phi3_v")
QWEN_PROCESSORS = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}
"""(processor class, video processor class) each Qwen export names, as the hub checkpoints do."""
MODULE_FILE = "vlm2vec_st.py"
ST_CONFIG = {"prompts": {"query": "", "document": ""}, "default_prompt_name": None}


def _dump(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def pooling_config(dimension: int, pooling: str) -> dict[str, Any]:
    """1_Pooling/config.json in the 5.x key names (6.x renames them on load; vLLM reads the booleans)."""
    return {
        "word_embedding_dimension": dimension,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last",
        "include_prompt": True,
    }


def _versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"transformers": transformers.__version__, "pytorch": torch.__version__}
    try:
        import sentence_transformers

        out["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    return out


def chat_template(model: VLM2Vec) -> str:
    """The template rendering `model`'s rows (its family's tokens under its prompt layout)."""
    tok = model.processor.tokenizer
    prefix, suffix = special_affixes(tok)
    name = model.family.name
    if name in QWEN_PROCESSORS:
        from vlm2vec.families.qwen import layout_tokens

        image_token, video_token = layout_tokens(model.settings)
    else:
        image_token, video_token = model.family.image_token, None
    return build_chat_template(image_token, video_token, prefix, suffix)


def prepare_processor(model: VLM2Vec) -> str:
    """Set what the saved processor must carry before `save_pretrained`: right padding, the chat
    template (LLaVA-NeXT's processor saves it), the run's Qwen pixel bounds. Returns the template."""
    template = chat_template(model)
    model.processor.tokenizer.padding_side = "right"
    if model.family.name == "llava_next":
        model.processor.chat_template = template
    if model.family.name in QWEN_PROCESSORS:
        from vlm2vec.families.qwen import _pixel_bounds

        ip = model.processor.image_processor
        lo, hi = _pixel_bounds(ip, model.settings)
        ip.size = {"shortest_edge": lo, "longest_edge": hi}
        for key, value in (("min_pixels", lo), ("max_pixels", hi)):
            if hasattr(ip, key):
                setattr(ip, key, value)
    return template


def write_processor_files(model: VLM2Vec, directory: str, template: str) -> None:
    """Qwen: the transformers processor's own files (our in-process pair is a tokenizer + image
    processor, since the transformers Qwen processors need torchvision to be built)."""
    name = model.family.name
    if name not in QWEN_PROCESSORS:
        return
    processor_class, video_class = QWEN_PROCESSORS[name]
    _dump(os.path.join(directory, "processor_config.json"), {"processor_class": processor_class})
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    with open(os.path.join(directory, "preprocessor_config.json"), encoding="utf-8") as f:
        image = json.load(f)
    image["processor_class"] = processor_class
    _dump(os.path.join(directory, "preprocessor_config.json"), image)
    video = {k: v for k, v in image.items() if k not in ("image_processor_type",)}
    video["video_processor_type"] = video_class
    _dump(os.path.join(directory, "video_preprocessor_config.json"), video)


def write_builtin_layout(directory: str, dimension: int, pooling: str, normalize: bool) -> None:
    """modules.json + sentence_bert_config.json + 1_Pooling (+ 2_Normalize)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})  # fmt: skip
        os.makedirs(os.path.join(directory, "2_Normalize"), exist_ok=True)
    _dump(os.path.join(directory, "modules.json"), modules)
    message = {"method": "forward", "method_output_name": "last_hidden_state", "format": "structured"}
    _dump(
        os.path.join(directory, "sentence_bert_config.json"),
        {
            "transformer_task": "feature-extraction",
            "modality_config": {"message": message},
            "module_output_name": "token_embeddings",
        },
    )
    _dump(os.path.join(directory, "1_Pooling", "config.json"), pooling_config(dimension, pooling))
    _dump(
        os.path.join(directory, "config_sentence_transformers.json"),
        {"model_type": "SentenceTransformer", "__version__": _versions(), **ST_CONFIG,
         "similarity_fn_name": "cosine"},
    )  # fmt: skip


def write_custom_layout(directory: str) -> None:
    """modules.json naming the copied `vlm2vec_st.VLM2VecEncoder` (loads with trust_remote_code=True)."""
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "export_module.py"),
                    os.path.join(directory, MODULE_FILE))  # fmt: skip
    _dump(os.path.join(directory, "modules.json"),
          [{"idx": 0, "name": "0", "path": "", "type": "vlm2vec_st.VLM2VecEncoder"}])  # fmt: skip
    _dump(
        os.path.join(directory, "config_sentence_transformers.json"),
        {"model_type": "SentenceTransformer", "__version__": _versions(), **ST_CONFIG,
         "similarity_fn_name": "cosine"},
    )  # fmt: skip


def annotate_config(directory: str, model: VLM2Vec, matryoshka_dims: list[int] | None) -> None:
    """config.json: `matryoshka_dimensions` (vLLM's `dimensions=`) when the run trained several, and a
    `vlm2vec` block with the pooling, normalisation, dimensions and prompt layout."""
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    dims = sorted({int(d) for d in (matryoshka_dims or [])} | {model.embedding_dim}, reverse=True)
    if matryoshka_dims:
        config["matryoshka_dimensions"] = dims
    config["vlm2vec"] = {
        "pooling": model.pooling,
        "normalize": model.normalize,
        "embedding_dimensions": dims,
        "prompt_layout": model.settings.prompt_layout,
        "family": model.family.name,
    }
    _dump(path, config)
