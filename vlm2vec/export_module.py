"""The sentence-transformers module of exports no built-in module can express (the demo's EfficientNet +
MiniLM, Phi-3.5-V's own classes). The exporter copies this file into the export as `vlm2vec_st.py`;
`SentenceTransformer(DIR, trust_remote_code=True)` imports it from there. It needs `vlm2vec` installed:
it loads the export with `VLM2Vec.from_pretrained` and embeds with `VLM2Vec.prepare` + `forward`, so its
vectors are `VLM2Vec.encode`'s by construction.

Inputs, as sentence-transformers passes them: a string, a PIL image, a dict with "text" and/or "image"
(an image or a list of them), or chat messages; `prompt=` is the row's prefix (as the built-in exports'
chat template treats a system message). A row with images and no `<|image_k|>` placeholder gets them
in front, as `VLM2Vec.prepare` does.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # sentence-transformers 6.x
    from sentence_transformers.base.modules import InputModule
except ImportError:  # 5.x
    from sentence_transformers.models import InputModule


def _row(value: Any) -> tuple[str, list]:
    """(text, images) of one input."""
    if isinstance(value, str):
        return value, []
    if isinstance(value, dict) and "role" not in value:
        images = value.get("image")
        images = [] if images is None else list(images) if isinstance(images, list | tuple) else [images]
        return str(value.get("text") or ""), images
    if isinstance(value, list | tuple) and value and isinstance(value[0], dict) and "role" in value[0]:
        text, images = "", []
        for message in value:
            content = message["content"]
            for item in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if item.get("type") == "text":
                    text += item["text"]
                elif item.get("type") == "image":
                    images.append(item.get("image"))
        return text, images
    return "", [value]  # an image


class VLM2VecEncoder(InputModule):
    """VLM2Vec as one sentence-transformers module: inputs -> normalised (or raw) pooled embeddings."""

    save_in_root = True
    config_keys: list[str] = []

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.vlm2vec = model

    @property
    def modalities(self) -> list:
        return ["text", "image", ("image", "text"), "message"]

    def preprocess(self, inputs: list, prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        rows = [_row(value) for value in inputs]
        texts = [(prompt or "") + text for text, _ in rows]
        images = [images or None for _, images in rows]
        return self.vlm2vec.prepare(texts, images)

    def tokenize(self, texts: list, **kwargs: Any) -> dict[str, Any]:  # sentence-transformers 5.x name
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        inputs = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        features["sentence_embedding"] = self.vlm2vec(inputs)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.vlm2vec.embedding_dim

    get_embedding_dimension = get_sentence_embedding_dimension

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        self.vlm2vec.save_pretrained(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> VLM2VecEncoder:
        from vlm2vec.model import VLM2Vec

        path = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
        model = VLM2Vec.from_pretrained(path, dtype=torch.float32)
        return cls(model.eval())
