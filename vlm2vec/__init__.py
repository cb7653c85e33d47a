"""vlm2vec: train vision-language models into universal multimodal embedding models (VLM2Vec / MMEB).

`from vlm2vec import VLM2Vec` is resolved lazily so that `import vlm2vec` stays cheap (no transformers).
"""

import logging
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["VLM2Vec", "__version__"]


def _drop_bnb_hub_kernel_warning(record: logging.LogRecord) -> bool:
    """bitsandbytes' CPU backend tries, at import, to fetch a faster 4-bit GEMM from the Hugging Face hub
    (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`) and logs a warning when that
    fails. It has no switch to skip the attempt (bitsandbytes 0.50, backends/cpu/ops.py), and offline or
    with an unverifiable publisher it always fails, after which bitsandbytes uses its own CPU kernels.
    So exactly that one line is dropped; every other bitsandbytes message still shows."""
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# the logger exists before bitsandbytes is imported: getLogger returns the same object to it later
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bnb_hub_kernel_warning)

if TYPE_CHECKING:
    from vlm2vec.model import VLM2Vec


def __getattr__(name: str) -> object:  # PEP 562: lazy attribute
    if name == "VLM2Vec":
        from vlm2vec.model import VLM2Vec

        return VLM2Vec
    raise AttributeError(f"module 'vlm2vec' has no attribute {name!r}")
