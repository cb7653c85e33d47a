"""README.md of an export: what the model is, how it was trained and scored, how to load it.

Facts come from the run's files (train_config.json: the options; report.md: the evaluation table);
a checkpoint directory reads its run's (the parent directory). What is unknown is said to be unknown.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

LICENCES = {
    "qwen2_vl": "apache-2.0 (Qwen2-VL 2B/7B; check the base model's card)",
    "qwen2_5_vl": "apache-2.0 for 7B, qwen-research for 3B (check the base model's card)",
    "qwen3_vl": "apache-2.0 (check the base model's card)",
    "llava_next": "that of the base model's language model (check its card)",
    "phi3_v": "mit",
    "effnet_minilm": "apache-2.0 (EfficientNet-Lite0 and all-MiniLM-L6-v2)",
}


def run_files(model_dir: str) -> tuple[dict[str, Any], str | None]:
    """(train_config.json options or {}, report.md text or None) of the run `model_dir` belongs to."""
    for where in (model_dir, os.path.dirname(os.path.abspath(model_dir))):
        config_file = os.path.join(where, "train_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                options = json.load(f).get("options", {})
            report_file = os.path.join(where, "report.md")
            report = open(report_file, encoding="utf-8").read() if os.path.isfile(report_file) else None
            return options, report
    return {}, None


def _rows(dataset: str | None) -> str:
    """Row count of a local training set (JSONL / parquet files), else 'unknown'."""
    if not dataset or not os.path.isdir(dataset):
        return "unknown"
    total = 0
    for path in glob.glob(os.path.join(dataset, "**", "*.jsonl"), recursive=True):
        with open(path, encoding="utf-8") as f:
            total += sum(1 for line in f if line.strip())
    for path in glob.glob(os.path.join(dataset, "**", "*.parquet"), recursive=True):
        import pyarrow.parquet as pq

        total += pq.ParquetFile(path).metadata.num_rows
    return str(total) if total else "unknown"


def model_card(
    model_dir: str, family: str, base: str, pooling: str, dims: list[int], custom: bool, notes: list[str]
) -> str:
    """The card's Markdown."""
    options, report = run_files(model_dir)
    keys = ("temperature", "train_batch_size", "per_device_train_batch_size", "max_steps", "learning_rate",
            "lora", "lora_r", "lora_alpha", "dora", "quantization", "positives", "matryoshka_dims",
            "false_negative_margin", "num_hard_negatives")  # fmt: skip
    if options.get("train_batch_size"):  # the global batch wins; the per-device default was not used
        keys = tuple(k for k in keys if k != "per_device_train_batch_size")
    recipe = [f"  - {k}: {options[k]}" for k in keys if k in options]
    data = options.get("dataset_name")
    subsets = options.get("subset_name")
    remote = ", trust_remote_code=True" if custom else ""
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: feature-extraction",
        "tags: [vlm2vec, multimodal-embedding]",
        "---",
        "# VLM2Vec embedding model",
        "",
        f"Exported by `python -m vlm2vec.export` from `{os.path.abspath(model_dir)}`.",
        "",
        f"- Base model: `{base}` (family `{family}`); licence: {LICENCES.get(family, 'see the base model')}",
        f"- Embedding: {pooling} token pooling, L2-normalised; dimensions {dims}",
        f"- Training data: {data or 'unknown'}"
        + (f" (subsets {subsets})" if subsets else "")
        + f"; rows: {_rows(data)}",
        "- Recipe:" if recipe else "- Recipe: unknown (no train_config.json beside the model)",
        *recipe,
        "",
        "## Evaluation (the run's report)",
        "",
        report.strip() if report else "No evaluation report in the run.",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        f'model = SentenceTransformer("PATH"{remote})',
        'emb = model.encode(["a text", {"image": pil_image, "text": "Represent the given image."}])',
        "```",
        "",
        "Images go first, then the text, as in training (`<|image_1|>` in a text places an image).",
        "A `prompt=` is the row's prefix.",
        'With vlm2vec: `VLM2Vec.from_pretrained("PATH").encode(texts, images)`.',
    ]
    if not custom:
        lines += [
            "With transformers: `AutoModel.from_pretrained(PATH)` + `AutoProcessor.from_pretrained(PATH)`;",
            "render rows with `processor.apply_chat_template`, pool the last hidden state as above.",
            "With vLLM: `vllm serve PATH --runner pooling` (pooling and normalisation come from",
            "modules.json).",
        ]
    else:
        lines += [
            "This family needs the `vlm2vec` package (a custom sentence-transformers module, loaded with",
            "`trust_remote_code=True`); vLLM cannot serve it.",
        ]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
