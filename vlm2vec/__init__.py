"""vlm2vec: train vision-language models into universal multimodal embedding models (VLM2Vec / MMEB).

`from vlm2vec import VLM2Vec` is resolved lazily so that `import vlm2vec` stays cheap (no transformers).
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["VLM2Vec", "__version__"]

if TYPE_CHECKING:
    from vlm2vec.model import VLM2Vec


def __getattr__(name: str) -> object:  # PEP 562: lazy attribute
    if name == "VLM2Vec":
        from vlm2vec.model import VLM2Vec

        return VLM2Vec
    raise AttributeError(f"module 'vlm2vec' has no attribute {name!r}")
