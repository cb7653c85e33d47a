"""Export a trained run or checkpoint for use outside vlm2vec: merged weights, the backbone's own
transformers files, a chat template rendering the trained prompt, the sentence-transformers layout
(vLLM reads it too) and a model card.

    python -m vlm2vec.export --model RUN_OR_CHECKPOINT_DIR --out DIR [--dtype bf16|fp32] [--overwrite]

The export is written to a temporary directory beside `--out` and renamed at the end, so an interrupted
export leaves nothing that looks complete. Bad input (not a run or checkpoint, a base model that is not
available offline, a non-empty --out, a QLoRA run, a family with no export path) is one line, exit 2.

Qwen2-VL / Qwen2.5-VL `reference` layout (the VLM2Vec recipe's bare `<|image_pad|>` runs): the chat
template gives the same token ids, but transformers' Qwen models give an image run M-RoPE positions
whether or not `<|vision_start|>` precedes it, where the reference trained with plain 1-D positions; so
image rows embed slightly differently through sentence-transformers / transformers / vLLM than through
`VLM2Vec.encode` (text rows are identical). The card says so; docs/export.md has the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import torch

from vlm2vec.model import META_FILE, VLM2Vec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """Bad input to the export: the message is the whole story (one line)."""


def _meta(model_dir: str) -> dict:
    if not os.path.isdir(model_dir):
        raise ExportError(f"--model {model_dir}: no such directory")
    path = os.path.join(model_dir, META_FILE)
    if not os.path.isfile(path):
        hint = " (a run that has not finished: pass one of its checkpoint-N directories)" if os.path.isfile(
            os.path.join(model_dir, "train_config.json")) else ""  # fmt: skip
        raise ExportError(f"--model {model_dir}: neither a run nor a checkpoint (no {META_FILE}){hint}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out}: not empty (pass --overwrite to replace it)")


def _load(model_dir: str, meta: dict) -> VLM2Vec:
    from vlm2vec.model_card import run_files

    options, _ = run_files(model_dir)
    if options.get("quantization"):
        raise ExportError(
            f"--model {model_dir}: a QLoRA run ({options['quantization']} base weights); merging its adapter "
            "into a de-quantised base is not the model it trained, so it is not exported"
        )
    from vlm2vec.backbones import get_family
    from vlm2vec.export_st import BUILTIN_FAMILIES, CUSTOM_FAMILIES

    family = meta.get("family")
    try:
        if meta.get("family_module"):
            __import__(meta["family_module"])
        get_family(family)
    except (ImportError, ValueError) as err:
        raise ExportError(f"--model {model_dir}: family {family!r} cannot be loaded ({err})") from None
    if family not in BUILTIN_FAMILIES + CUSTOM_FAMILIES:
        raise ExportError(f"--model {model_dir}: family {family!r} has no export path")
    try:
        model = VLM2Vec.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    except OSError as err:
        base = meta.get("base") or model_dir
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"base model {base} is not available offline ({first})") from None
    if model.is_peft:
        model.merge_lora()
    return model.eval()


def export(model_dir: str, out: str, dtype: str = "fp32", overwrite: bool = False) -> str:
    """Export `model_dir` (a run's output_dir or a checkpoint) to `out`; returns `out`."""
    from vlm2vec import export_st
    from vlm2vec.model_card import model_card

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    meta = _meta(model_dir)
    out = os.path.abspath(out)
    _check_out(out, overwrite)
    model = _load(model_dir, meta)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        custom = model.family.name in export_st.CUSTOM_FAMILIES
        template = None if custom else export_st.prepare_processor(model)
        model.backbone.to(DTYPES[dtype])
        model.save_pretrained(tmp)
        notes = []
        if custom:
            export_st.write_custom_layout(tmp)
        else:
            export_st.write_processor_files(model, tmp, template)
            export_st.write_builtin_layout(tmp, model.embedding_dim, model.pooling, model.normalize)
            export_st.annotate_config(tmp, model, meta.get("matryoshka_dims"))
            notes += _notes(model)
        saved = json.load(open(os.path.join(tmp, META_FILE), encoding="utf-8"))
        if meta.get("matryoshka_dims") is not None:
            saved.setdefault("matryoshka_dims", meta["matryoshka_dims"])
        saved["exported_from"] = os.path.abspath(model_dir)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)
        dims = sorted(
            {int(d) for d in (meta.get("matryoshka_dims") or [])} | {model.embedding_dim}, reverse=True
        )
        base = meta.get("base") or model.base_path or model_dir
        card = model_card(model_dir, model.family.name, str(base), model.pooling, dims, custom, notes)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _notes(model: VLM2Vec) -> list[str]:
    notes = []
    if (
        model.family.name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
        and model.settings.prompt_layout == "reference"
    ):
        notes.append(
            "Trained with the VLM2Vec reference prompt layout (bare <|image_pad|> runs, 1-D positions). "
            "transformers / sentence-transformers / vLLM give image tokens M-RoPE positions, so image rows "
            "embed slightly differently from `VLM2Vec.encode` (text rows are identical); for exact "
            "embeddings load with vlm2vec."
        )
    if model.settings.resolution != "native":
        notes.append(
            f"Trained with images resized to the `{model.settings.resolution}` preset first; the exported "
            "processor does not resize, so resize images the same way before encoding."
        )
    if model.family.name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        notes.append("vlm2vec resizes images with a side under 28 px to 56x56 first; the processor does not.")
    return notes


def export_after_training(run_dir: str, export_dir: str) -> str:
    """The trainer's `--export_dir`: export the run's saved model; a previous export there is replaced,
    anything else refused (ConfigError: the trainer reports it in one line, exit 2)."""
    from vlm2vec.errors import ConfigError

    previous = all(os.path.isfile(os.path.join(export_dir, f)) for f in ("modules.json", META_FILE))
    try:
        out = export(run_dir, export_dir, overwrite=previous)
    except ExportError as err:
        raise ConfigError(f"--export_dir: {err}") from None
    return f"exported to {out}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlm2vec.export",
        description="Export a trained run or checkpoint: merged weights, chat template, "
        "sentence-transformers layout (vLLM reads it), model card. Written atomically; bad input exits 2 "
        "with one line.",
    )
    parser.add_argument("--model", required=True, help="a run's output_dir or one of its checkpoint-N dirs")
    parser.add_argument("--out", required=True, help="the export directory (must be empty or absent)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(args.model, args.out, args.dtype, args.overwrite)
    except ExportError as err:
        print(f"vlm2vec.export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
