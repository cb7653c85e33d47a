"""The default run's model and training values: what `vlm2vec/train.py` uses for every option left unset
when `--model_name demo:emoji` (the default) is trained. A plain table of values: the trainer reads it
like a YAML file, nothing else about the run is special (README "Demo" lists what each value scored)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlm2vec.model import VLM2Vec

GC_CHUNK = 32  # GradCache chunk (queries and targets): the batch is re-encoded in chunks of this size

RECIPE: dict[str, Any] = {
    "max_steps": 200, "train_batch_size": 64, "learning_rate": 1e-3, "warmup_steps": 20,
    "weight_decay": 0.0, "temperature": 0.05, "symmetric_loss": True, "lora_r": 8, "lora_alpha": 16,
    "lora_dropout": 0.1, "pooling": "mean", "seed": 0, "subset_name": ["EmojiI2T", "ClipArtI2T"],
    "gc_q_chunk_size": GC_CHUNK, "gc_p_chunk_size": GC_CHUNK,
    "max_grad_norm": 0.0,  # the recipe does not clip
}  # fmt: skip


def load_demo_model(seed: int = 0, pooling: str = "mean", feature_cache: str | None = None) -> VLM2Vec:
    """The untrained demo model (pretrained EfficientNet-Lite0 + MiniLM, projector from `seed`), quietly;
    `feature_cache`: a file of precomputed frozen image features (vlm2vec.demo.default_data)."""
    import transformers  # heavy: the table above stays importable without transformers or torch

    from vlm2vec.demo import family
    from vlm2vec.model import VLM2Vec

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        hf_model, processor = family.assemble(seed=seed, cache_file=feature_cache)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return VLM2Vec(hf_model, processor, family.DEMO_FAMILY, pooling=pooling, max_len=128,
                   base_path=family.BASE_ID)  # fmt: skip
