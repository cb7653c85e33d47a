"""Training options: one dataclass, read from a YAML file and `--key value` flags, checked up front.

Precedence: dataclass defaults < `--config file.yaml` < command-line flags. Names follow HF
`TrainingArguments` where one exists (`--max_steps`, `--learning_rate`, `--output_dir`, ...) and the
VLM2Vec reference implementation otherwise (`--model_name`, `--lora_r`, `--gc_q_chunk_size`, ...), so a
published VLM2Vec command line runs unchanged. Every problem (unknown key, bad type, missing path,
inconsistent values) raises `ConfigError` naming the option before any model or data is touched.

This module holds the options and their checks; `config_parse` reads them from YAML and the command
line, `ds_config` resolves the DeepSpeed JSON against them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm2vec.backbones import FAMILIES, tiny_families
from vlm2vec.data import parse_sources
from vlm2vec.errors import ConfigError
from vlm2vec.eval_v1 import dataset_names

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
POOLINGS = ("last", "mean", "eos")  # eos: the reference's name for last-token pooling (read as last)
RESOLUTIONS = ("low", "mid", "high", "native")
PROMPT_LAYOUTS = ("reference", "native")
REPORT_TO = ("tensorboard", "none")
TINY_PREFIX = "tiny:"
DEMO_MODEL = "demo:emoji"  # the default model: EfficientNet-Lite0 + MiniLM (vlm2vec/demo/family.py)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# the reference implementation's `--model_backbone` values -> our family names
BACKBONE_ALIASES = {
    "phi": "phi3_v",
    "phi3v": "phi3_v",
    "phi35v": "phi3_v",
    "phi3_5_v": "phi3_v",
    "llava": "llava_next",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "phi3_v": "phi3_v",
}

# HF / reference options that published command lines pass but that have no effect here (why in value)
IGNORED_OPTIONS = {
    "save_safetensors": "weights are always written as safetensors",
    "remove_unused_columns": "the collator builds model inputs itself",
    "processor_name": "the processor is loaded with the model",
    "model_type": "the family is detected from the model (or set --model_backbone)",
    "overwrite_output_dir": "an existing output directory is reused; see --resume",
    "do_train": "this entry point only trains",
    "interleave_datasets": "subsets are always mixed by size (see --subset_weights)",
    "interleave_stopping_strategy": "steps are counted, not epochs of one subset",
    "dataloader_drop_last": "every batch is full",
    "ddp_find_unused_parameters": "DeepSpeed handles data parallelism",
}


def _opt(
    default: Any,
    help: str,
    *,
    aliases: tuple[str, ...] = (),
    choices: Sequence[Any] | None = None,
    factory: Any = None,
) -> Any:
    meta = {"help": help, "aliases": aliases, "choices": tuple(choices) if choices else None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All options of `vlm2vec/train.py` (see `--help`)."""

    # --- model -----------------------------------------------------------------------------------
    model_name: str = _opt(
        DEMO_MODEL,
        f"HF hub id or local directory of the backbone, tiny:<family> for "
        f"a tiny randomly initialised model (tests), or {DEMO_MODEL} for the embedded CPU "
        "demo (EfficientNet-Lite0 + all-MiniLM-L6-v2 on Noto emoji; unset options take "
        "its recipe, see the end of --help)",
    )
    model_backbone: str | None = _opt(
        None,
        "backbone family (qwen2_vl, qwen2_5_vl, qwen3_vl, llava_next, "
        "phi3_v; reference names like 'phi' accepted); default: detected",
    )
    checkpoint_path: str | None = _opt(
        None, "start from a saved VLM2Vec directory (its LoRA adapter is trained further)"
    )
    pooling: str = _opt("last", "embedding pooling (eos: the reference's name for last)", choices=POOLINGS)
    normalize: bool = _opt(True, "L2-normalise embeddings (similarity = cosine)")
    temperature: float = _opt(0.02, "InfoNCE temperature")
    symmetric_loss: bool = _opt(False, "add the target->query InfoNCE direction (CLIP style)")
    matryoshka_dims: list[int] | None = _opt(
        None,
        "Matryoshka embeddings: also train each prefix of these lengths as an embedding of its own, "
        "e.g. 64,128,256 (increasing, each <= the embedding size; the full size counts only if listed)",
    )
    positives: str = _opt(
        "mask",
        "candidates of a step that are the same item as a query's target (same text and image/video path, "
        "across chunks and ranks): mask (leave the denominator), any (all count as positives), each (one "
        "term per positive), none (they are negatives, as the reference trains)",
        choices=("mask", "any", "each", "none"),
    )
    false_negative_margin: float | None = _opt(
        None,
        "drop from a query's denominator every non-target candidate scoring above the target's score plus "
        "this margin (cosine units; likely false negatives, as Qwen3-Embedding's loss)",
    )
    max_len: int = _opt(
        256,
        "maximum text tokens per input (the paper's max text length): image/video tokens do not count and "
        "are never cut; longer text keeps its first max_len tokens",
    )
    image_resolution: str | None = _opt(
        None, "resize images first: low 336x336, mid 672x672, high 1344x1344, native", choices=RESOLUTIONS
    )
    num_crops: int | None = _opt(None, "Phi-3.5-V HD crops (paper: 4)")
    min_pixels: int | None = _opt(None, "Qwen dynamic resolution lower bound", aliases=("resize_min_pixels",))
    max_pixels: int | None = _opt(None, "Qwen dynamic resolution upper bound", aliases=("resize_max_pixels",))
    prompt_layout: str | None = _opt(
        None,
        "image tokens in the row: reference (bare Qwen pads, 1-D positions, as VLM2Vec trained; the default "
        "of Qwen2/2.5-VL) or native (Qwen's vision start/end wrapping, M-RoPE); recorded in the saved model",
        choices=PROMPT_LAYOUTS,
    )
    attn_implementation: str = _opt(
        "auto",
        "attention kernel: auto (flash_attention_2 on CUDA when "
        "installed, else sdpa), sdpa, eager, flash_attention_2",
    )
    lora: bool = _opt(
        True,
        "train a LoRA adapter (on the LLM; also inside the vision tower with --freeze_vision false); "
        "off: full fine-tuning",
    )
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(64, "LoRA alpha")
    lora_dropout: float = _opt(0.1, "LoRA dropout")
    lora_target_modules: str | None = _opt(None, "comma-separated module names; default: the family's")
    dora: bool = _opt(False, "DoRA instead of LoRA (the reference always uses DoRA; configs/*.yaml set it)")
    quantization: str | None = _opt(
        None, "load the base in 4-bit NF4 (QLoRA; needs --lora)", choices=("nf4",)
    )
    freeze_vision: bool = _opt(
        True,
        "keep the vision tower frozen (false: LoRA targets also match inside it; full fine-tuning trains it)",
        aliases=("image_encoder_freeze",),
    )
    gradient_checkpointing: bool = _opt(False, "recompute the backbone's activations in backward")

    # --- data ------------------------------------------------------------------------------------
    dataset_name: str | None = _opt(
        None,
        "MMEB-train: local directory/file or hub name (TIGER-Lab/MMEB-train); several sources mixed with "
        "weights: SRC=W,SRC=W (subsets named <source>/<subset>); default: small synthetic data",
        aliases=("train_data",),
    )
    subset_name: list[str] | None = _opt(None, "subsets to train on (default: all found)")
    dataset_split: str | None = _opt(
        None, "split of the hub data (original, diverse_instruction)", aliases=("split_name",)
    )
    num_sample_per_subset: int | dict[str, int] | None = _opt(
        None,
        "keep the first N rows of each subset (the paper: 100000); in YAML also a mapping subset: N "
        "(per-subset caps, as VLM2Vec V2.0's dataset files)",
    )
    image_dir: str | None = _opt(None, "root that image paths are relative to (default: the data folder)")
    subset_weights: str = _opt("size", "how subsets are mixed: size or uniform", choices=("size", "uniform"))
    num_frames: int = _opt(8, "frames sampled per training video (uniformly by index, as MMEB-V2)")
    interleave_batch_size: int | None = _opt(
        None,
        "task-wise batching (VLM2Vec V2.0): each process gets runs of this many rows from one subset (a "
        "global run of N x processes rows is drawn from one subset and split across the processes); each "
        "run gets its own GradCache chunks (must divide the per-device batch)",
    )
    num_hard_negatives: int = _opt(0, "hard negatives per query (from neg_text/neg_image_path)")
    missing_negatives: str = _opt(
        "mask",
        "a row with fewer hard negatives than --num_hard_negatives: mask (train on the ones it has; the "
        "missing slots are left out of its denominator), error, or sample other rows' positives",
        choices=("mask", "error", "sample"),
    )
    skip_bad_rows: bool = _opt(False, "skip (and count) unreadable rows instead of stopping")
    sort_by_length: bool = _opt(True, "group rows of similar length into the same GradCache chunk")
    dataloader_num_workers: int = _opt(0, "background processes that load and prepare batches")
    demo_dir: str = _opt(
        "runs/default_data",
        f"{DEMO_MODEL} without --dataset_name: where the default data (emoji + OpenClipArt, from Debian "
        "packages) and its image features are built once and reused",
    )
    demo_n_train: int = _opt(870, f"{DEMO_MODEL} default data: training emoji (fewer: a quick subset run)")
    demo_n_eval: int = _opt(1000, f"{DEMO_MODEL} default data: held-out emoji (fewer: a quick subset run)")
    demo_clipart_n_eval: int = _opt(800, f"{DEMO_MODEL} default data: held-out OpenClipArt texts")
    demo_clipart_drawings: int | None = _opt(
        None, f"{DEMO_MODEL} default data: only the first N OpenClipArt drawings (a quick subset run)"
    )
    eval_data: str | None = _opt(
        None,
        "MMEB-format eval directory scored after training (and every --eval_steps) on all ranks, with the "
        "untrained model and a frozen-feature probe as baselines; default: the default data's held-out "
        f"split for {DEMO_MODEL} without --dataset_name, else none",
    )
    eval_steps: int = _opt(0, "also evaluate every N steps (0: only after training)")
    eval_dims: list[int] | None = _opt(
        None,
        "also score these embedding prefixes (e.g. 64,256; Matryoshka): one report column per dimension; "
        "default: --matryoshka_dims",
    )

    # --- step ------------------------------------------------------------------------------------
    per_device_train_batch_size: int = _opt(8, "queries per process per step")
    train_batch_size: int | None = _opt(
        None,
        "global queries per step (overrides the per-device size: divided by the number of processes)",
        aliases=("global_batch_size",),
    )
    grad_cache: bool = _opt(True, "GradCache: encode in chunks, recompute each chunk in backward")
    gc_q_chunk_size: int = _opt(2, "GradCache chunk size for queries")
    gc_p_chunk_size: int = _opt(2, "GradCache chunk size for targets (positives + hard negatives)")
    gc_max_visual_tokens: int | None = _opt(
        None,
        "size GradCache chunks by tokens instead of rows: each chunk holds at most this many tokens "
        "(visual + text, as padded); a video row costs thousands, a text row tens. "
        "Explicit --gc_q_chunk_size/--gc_p_chunk_size then cap rows per chunk",
    )
    reuse_vision_features: bool = _opt(
        True,
        "frozen vision tower: reuse the first pass's image features "
        "in the recompute (one vision pass per step)",
    )
    cross_device_negatives: bool = _opt(True, "score every query against the candidates of all processes")

    # --- optimisation ----------------------------------------------------------------------------
    max_steps: int = _opt(60, "optimizer steps (<= 0: use num_train_epochs)")
    num_train_epochs: float = _opt(1.0, "epochs over the data when max_steps <= 0")
    learning_rate: float = _opt(2e-4, "peak learning rate", aliases=("lr",))
    lr_scheduler_type: str = _opt("linear", "decay after warmup", choices=SCHEDULERS)
    warmup_steps: int = _opt(0, "linear warmup steps (wins over warmup_ratio)")
    warmup_ratio: float = _opt(0.0, "warmup as a fraction of max_steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm (0: off)")
    bf16: bool = _opt(False, "bfloat16 weights and compute (fp32 master weights in the optimizer)")
    fp16: bool = _opt(False, "not supported (use --bf16)")
    seed: int = _opt(42, "seed of data order, initialisation and dropout")
    skip_nonfinite_loss: bool = _opt(False, "skip a step whose loss is NaN/Inf (default: stop with an error)")

    # --- run -------------------------------------------------------------------------------------
    output_dir: str = _opt("runs/vlm2vec", "where the model, checkpoints and logs go")
    ds_config: str | None = _opt(
        None,
        "DeepSpeed JSON (configs/ds_zero*.json); default: ZeRO-0",
        aliases=("deepspeed", "deepspeed_config"),
    )
    save_steps: int = _opt(500, "write a checkpoint every N steps and at the end (0: only at the end)")
    save_total_limit: int | None = _opt(None, "keep only the newest N checkpoints")
    resume: str | None = _opt(
        None,
        "auto (newest checkpoint in output_dir, if any) or a checkpoint dir",
        aliases=("resume_from", "resume_from_checkpoint"),
    )
    logging_steps: int = _opt(1, "log every N steps (JSONL + TensorBoard)")
    logging_dir: str | None = _opt(None, "TensorBoard directory (default: output_dir/tensorboard)")
    report_to: str = _opt("tensorboard", "metrics sink besides the JSONL log", choices=REPORT_TO)
    disable_tqdm: bool = _opt(False, "no progress bar")
    run_name: str | None = _opt(None, "a name recorded in the logs", aliases=("project_name",))
    local_rank: int = _opt(-1, "set by the deepspeed launcher")
    export_dir: str | None = _opt(
        None,
        "after training, also export the model there (python -m vlm2vec.export: merged weights, "
        "sentence-transformers / transformers / vLLM layout, model card)",
    )

    # filled by load_config: which options the user set (YAML or command line), and which were ignored
    explicit: frozenset[str] = field(
        default_factory=frozenset, repr=False, compare=False, metadata={"internal": True}
    )
    ignored: tuple[str, ...] = field(default=(), repr=False, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.pooling == "eos":  # the reference's V2 scripts pass --pooling eos: last-token pooling
            self.pooling = "last"

    def validate(self) -> TrainConfig:
        """Check values and paths; raise ConfigError naming the first bad option."""
        for f in option_fields():  # YAML values are not checked by argparse
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{f.name} {value!r}: choose one of {', '.join(map(str, choices))}")
        positive = (
            "max_len",
            "per_device_train_batch_size",
            "gc_q_chunk_size",
            "gc_p_chunk_size",
            "num_frames",
            "lora_r",
            "lora_alpha",
            "logging_steps",
            "demo_n_train",
            "demo_n_eval",
            "demo_clipart_n_eval",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("matryoshka_dims", "eval_dims"):
            dims = getattr(self, name)
            if dims is not None and (
                not dims or min(dims) < 1 or any(a >= b for a, b in zip(dims, dims[1:]))
            ):
                raise ConfigError(f"--{name} {dims}: give increasing sizes >= 1, like 64,128,256")
        margin = self.false_negative_margin
        if margin is not None and not math.isfinite(margin):
            raise ConfigError(f"--false_negative_margin must be a finite number, got {margin}")
        caps = self.num_sample_per_subset
        for subset, cap in caps.items() if isinstance(caps, dict) else [("", caps)]:
            if cap is not None and cap < 1:
                where = f" {subset}:" if subset else ""
                raise ConfigError(f"--num_sample_per_subset{where} must be >= 1, got {cap}")
        for name in ("train_batch_size", "save_total_limit", "num_crops",
                     "gc_max_visual_tokens", "interleave_batch_size", "demo_clipart_drawings"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        for name in (
            "warmup_steps",
            "save_steps",
            "eval_steps",
            "num_hard_negatives",
            "dataloader_num_workers",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "learning_rate", "adam_epsilon"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ConfigError(f"--{name} must be a positive finite number, got {value}")
        for name in ("weight_decay", "max_grad_norm", "lora_dropout", "warmup_ratio"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(
                f"--lora_dropout and --warmup_ratio must be in [0, 1), got "
                f"{self.lora_dropout} and {self.warmup_ratio}"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ConfigError(
                f"set --max_steps > 0 or --num_train_epochs > 0 (got {self.max_steps} and "
                f"{self.num_train_epochs})"
            )
        if self.fp16:
            raise ConfigError(
                "--fp16 is not supported (no loss scaling here, and DeepSpeed refuses fp16 on "
                "the CPU); use --bf16"
            )
        if self.quantization and not self.lora:
            raise ConfigError("--quantization nf4 trains a LoRA adapter on frozen 4-bit weights: add --lora")
        self._validate_model()
        self._validate_paths()
        return self

    def _validate_model(self) -> None:
        if self.model_name == DEMO_MODEL:
            if self.demo_n_train + self.demo_n_eval > 1870:
                raise ConfigError(
                    f"--demo_n_train {self.demo_n_train} + --demo_n_eval {self.demo_n_eval} "
                    "exceeds the 1870 emoji available"
                )
            if not self.lora:
                raise ConfigError(
                    f"--model_name {DEMO_MODEL} trains a LoRA adapter + the projector: drop --lora false"
                )
        elif self.model_name.startswith(TINY_PREFIX):
            family = self.model_name[len(TINY_PREFIX) :]
            if family not in tiny_families():
                raise ConfigError(
                    f"--model_name {self.model_name!r}: no tiny model of family {family!r}; "
                    f"choose one of {', '.join(TINY_PREFIX + f for f in tiny_families())}"
                )
        elif not os.path.exists(self.model_name) and (_offline() or not HUB_NAME.match(self.model_name)):
            raise ConfigError(
                f"--model_name {self.model_name!r}: no such directory"
                + (
                    " (and the hub is offline)"
                    if _offline()
                    else ", and not a hub id like 'Qwen/Qwen2-VL-2B-Instruct'"
                )
            )
        if self.model_backbone is not None and self.model_backbone.lower() not in BACKBONE_ALIASES:
            if self.model_backbone not in FAMILIES:
                raise ConfigError(
                    f"--model_backbone {self.model_backbone!r} is unknown; choose one of "
                    f"{', '.join(sorted(set(BACKBONE_ALIASES.values())))}"
                )

    def _validate_paths(self) -> None:
        if self.eval_data:  # a local MMEB eval directory: <dataset>.jsonl / .parquet / .arrow or folders
            where = f"--eval_data {self.eval_data!r}: not an MMEB eval directory"
            if not os.path.isdir(self.eval_data):
                raise ConfigError(f"{where} (not a directory)")
            try:
                dataset_names(self.eval_data)
            except FileNotFoundError as err:
                raise ConfigError(f"{where} ({err})") from None

        try:
            sources = [src for src, _ in parse_sources(self.dataset_name)] if self.dataset_name else []
        except ValueError as err:
            raise ConfigError(f"--dataset_name: {err}") from None
        for source in sources:
            self._validate_source(source)
        for name in ("image_dir", "checkpoint_path"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise ConfigError(f"--{name} {path!r}: no such directory")
        out = self.export_dir
        if out and os.path.isdir(out) and os.listdir(out):  # checked again at export (vlm2vec/export.py)
            if not all(os.path.isfile(os.path.join(out, f)) for f in ("modules.json", "vlm2vec.json")):
                raise ConfigError(f"--export_dir {out!r}: not empty and not a previous export (pick another)")
        if self.resume is not None and self.resume.isdigit():  # the reference's `--resume_from <step>`
            self.resume = os.path.join(self.output_dir, f"checkpoint-{int(self.resume)}")
        if self.resume is not None and self.resume != "auto" and not os.path.isdir(self.resume):
            raise ConfigError(f"--resume {self.resume!r}: no such checkpoint directory (or pass 'auto')")

    def _validate_source(self, source: str) -> None:
        if not os.path.exists(source):
            if _offline() or not HUB_NAME.match(source):
                raise ConfigError(
                    f"--dataset_name {source!r}: no such file or directory"
                    + (
                        " (and the hub is offline)"
                        if _offline()
                        else ", and not a hub name like 'TIGER-Lab/MMEB-train'"
                    )
                )

    @property
    def family(self) -> str | None:
        """Backbone family requested by --model_backbone or a tiny: model name (None: detect)."""
        if self.model_name.startswith(TINY_PREFIX):
            return self.model_name[len(TINY_PREFIX) :]
        if self.model_backbone is None:
            return None
        return BACKBONE_ALIASES.get(self.model_backbone.lower(), self.model_backbone)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in option_fields()}


def _offline() -> bool:
    return any(
        os.environ.get(v, "0").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def option_fields() -> list[dataclasses.Field]:
    """The user-facing options of TrainConfig (internal bookkeeping fields left out)."""
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]


def format_config(config: TrainConfig) -> str:
    """One option per line, for the log and `--help`-style inspection."""
    return "\n".join(f"  {k}: {v!r}" for k, v in config.to_dict().items())
