"""Training options: one dataclass, read from a YAML file and `--key value` flags, checked up front.

Precedence: dataclass defaults < `--config file.yaml` < command-line flags. Names follow HF
`TrainingArguments` where one exists (`--max_steps`, `--learning_rate`, `--output_dir`, ...) and the
VLM2Vec reference implementation otherwise (`--model_name`, `--lora_r`, `--gc_q_chunk_size`, ...), so a
published VLM2Vec command line runs unchanged. Every problem (unknown key, bad type, missing path,
inconsistent values) raises `ConfigError` naming the option before any model or data is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

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


class ConfigError(ValueError):
    """A bad option: the message names it and says what is wrong."""


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
        "error",
        "a row with fewer hard negatives: error, or sample other rows' positives",
        choices=("error", "sample"),
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
        for f in _fields():  # YAML values are not checked by argparse
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
            from vlm2vec.backbones import tiny_families

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
            from vlm2vec.backbones import FAMILIES

            if self.model_backbone not in FAMILIES:
                raise ConfigError(
                    f"--model_backbone {self.model_backbone!r} is unknown; choose one of "
                    f"{', '.join(sorted(set(BACKBONE_ALIASES.values())))}"
                )

    def _validate_paths(self) -> None:
        from vlm2vec.data import parse_sources

        if self.eval_data:  # a local MMEB eval directory: <dataset>.jsonl / .parquet / .arrow or folders
            from vlm2vec.eval import dataset_names

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
        if self.ds_config is not None:
            load_ds_config(self.ds_config)
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
        return {f.name: getattr(self, f.name) for f in _fields()}


def _offline() -> bool:
    return any(
        os.environ.get(v, "0").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# ------------------------------------------------------------------------------------------- parsing
def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(int | None) -> (int, True); list[str] | None -> (list[str], True)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _alias_map() -> dict[str, str]:
    out = {}
    for f in _fields():
        out[f.name] = f.name
        for alias in f.metadata["aliases"]:
            out[alias] = f.name
    return out


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _nullable(convert: Any) -> Any:
    def parse(text: str) -> Any:
        if str(text).strip().lower() in ("none", "null"):
            return None
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option shows its default in --help."""
    parser = _Parser(
        prog="vlm2vec/train.py",
        description="Train a VLM2Vec embedding model with GradCache under DeepSpeed "
        "(deepspeed vlm2vec/train.py --ds_config configs/ds_zero2.json [--config x.yaml] [--key value ...]).",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        epilog=_demo_epilog(),
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (flags given here win)")
    hints = _hints()
    groups: dict[str, Any] = {}
    group_of = {
        "model_name": "model",
        "dataset_name": "data",
        "per_device_train_batch_size": "step",
        "max_steps": "optimisation",
        "output_dir": "run",
    }
    group = parser
    for f in _fields():
        if f.name in group_of:
            group = groups.setdefault(f.name, parser.add_argument_group(group_of[f.name]))
        base, nullable = _base_type(hints[f.name])
        names = [f"--{f.name}", *(f"--{a}" for a in f.metadata["aliases"])]
        text = f.metadata["help"]
        if f.metadata["choices"]:
            text += f"; one of {', '.join(f.metadata['choices'])}"
        if "default:" not in text:
            text += f" (default: {f.default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": text}
        if f.metadata["choices"]:
            kwargs["choices"] = list(f.metadata["choices"]) + ([None] if nullable else [])
        if base is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="+", metavar="NAME")
        else:
            kwargs["type"] = _nullable(base) if nullable else base
            kwargs["metavar"] = base.__name__.upper()
        group.add_argument(*names, **kwargs)
    compat = parser.add_argument_group("accepted for compatibility (no effect)")
    for name, why in IGNORED_OPTIONS.items():
        compat.add_argument(
            f"--{name}", dest=f"ignored:{name}", nargs="?", const=True, metavar="VALUE", help=why
        )
    return parser


def _demo_epilog() -> str:
    from vlm2vec.demo.recipe import RECIPE

    shown = {k: " ".join(v) if isinstance(v, list) else v for k, v in RECIPE.items()}
    values = ", ".join(f"--{k} {v}" for k, v in shown.items())
    return (
        f"default run (--model_name {DEMO_MODEL}): without --dataset_name, trains on the default data "
        "(emoji + OpenClipArt, built once in --demo_dir) and evaluates on its held-out split "
        "(--eval_data), with the untrained model and a frozen-feature probe as baselines. "
        f"Options not set take the recipe's values (vlm2vec/demo/recipe.py) instead of the defaults above: "
        f"{values}."
    )


def _suggest(name: str, prefix: str = "--") -> str:
    known = list(_alias_map()) + list(IGNORED_OPTIONS) + ["config"]
    close = difflib.get_close_matches(name, known, n=2)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def _unknown_message(tokens: Sequence[str]) -> str:
    flags = [t.split("=")[0] for t in tokens if t.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(tokens)!r} (options are --key value)"
    parts = [f"{flag}{_suggest(flag.lstrip('-'))}" for flag in flags]
    return f"unknown option {', '.join(parts)}; see --help"


def _coerce(name: str, value: Any, source: str) -> Any:
    """A YAML value checked against the field's type (ints stay ints, floats accept ints)."""
    base, nullable = _base_type(_hints()[name])
    where = f"{source}: {name}"
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where} must not be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError as err:
                raise ConfigError(f"{where}: {err}") from None
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(value, dict) and dict[str, int] in typing.get_args(_hints()[name]):
        if all(isinstance(k, str) and type(v) is int for k, v in value.items()):
            return dict(value)
        raise ConfigError(f"{where} must map names to integers, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where} must be a list of names, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def read_yaml(path: str) -> dict[str, Any]:
    """Options from a YAML mapping, keys resolved through the aliases and type-checked."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of option: value")
    aliases, out = _alias_map(), {}
    for key, value in data.items():
        if key in IGNORED_OPTIONS:
            continue
        if key not in aliases:
            raise ConfigError(f"{path}: unknown key {key!r}{_suggest(str(key), '')}; see --help")
        out[aliases[key]] = _coerce(aliases[key], value, path)
    return out


def load_config(argv: Sequence[str] | None = None, *, validate: bool = True) -> TrainConfig:
    """Parse `argv` (default sys.argv[1:]): YAML from --config, then flags; validated unless told not."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if unknown:
        raise ConfigError(_unknown_message(unknown))
    given = vars(namespace)
    ignored = sorted(k.split(":", 1)[1] for k in given if k.startswith("ignored:"))
    given = {k: v for k, v in given.items() if not k.startswith("ignored:")}
    values = read_yaml(given.pop("config")) if "config" in given else {}
    values.update(given)
    config = TrainConfig(**values)
    config.explicit = frozenset(values)
    config.ignored = tuple(ignored)
    if config.model_name == DEMO_MODEL:
        config = _with_recipe(config)
    return config.validate() if validate else config


def _with_recipe(config: TrainConfig) -> TrainConfig:
    """The default model's recipe values for every option the user left unset (YAML or flags win)."""
    from vlm2vec.demo.recipe import RECIPE

    values = {k: v for k, v in RECIPE.items() if k not in config.explicit}
    if "per_device_train_batch_size" in config.explicit:  # the user's per-device size wins over the batch
        values.pop("train_batch_size", None)
    return dataclasses.replace(config, **values)


# --------------------------------------------------------------------------------------------- DeepSpeed
def load_ds_config(path: str) -> dict[str, Any]:
    """A DeepSpeed JSON file as a dict (ConfigError if missing or malformed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--ds_config {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds_config {path!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--ds_config {path!r} must hold a JSON object")
    return data


DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": 1,
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 0},
    "steps_per_print": 2**31 - 1,
}


def per_device_batch_size(config: TrainConfig, world_size: int) -> int:
    """Queries per process: --train_batch_size / world when given, else --per_device_train_batch_size."""
    if config.train_batch_size is None:
        return config.per_device_train_batch_size
    if config.train_batch_size % world_size:
        raise ConfigError(
            f"--train_batch_size {config.train_batch_size} is not divisible by the {world_size} processes"
        )
    per_device = config.train_batch_size // world_size
    if "per_device_train_batch_size" in config.explicit and per_device != config.per_device_train_batch_size:
        raise ConfigError(
            f"--train_batch_size {config.train_batch_size} over {world_size} processes gives "
            f"{per_device} per device, but --per_device_train_batch_size is "
            f"{config.per_device_train_batch_size}; set only one of them"
        )
    return per_device


def resolve_ds_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" filled from the options; explicit values in the JSON that
    contradict an option the user set raise ConfigError (a JSON value wins over an unset default)."""
    ds = json.loads(json.dumps(load_ds_config(config.ds_config) if config.ds_config else DEFAULT_DS_CONFIG))
    source = config.ds_config or "the default DeepSpeed config"
    micro = per_device_batch_size(config, world_size)

    def settle(container: dict, key: str, option: str, value: Any) -> Any:
        current = container.get(key, "auto")
        if current == "auto":
            container[key] = value
        elif option in config.explicit and current != value:
            raise ConfigError(
                f"{source} sets {key}={current!r} but --{option} is {value!r}; make them agree "
                f'or write "auto" in the JSON'
            )
        return container[key]

    settle(ds, "train_micro_batch_size_per_gpu", "per_device_train_batch_size", micro)
    if ds["train_micro_batch_size_per_gpu"] != micro:
        raise ConfigError(
            f"{source}: train_micro_batch_size_per_gpu={ds['train_micro_batch_size_per_gpu']} "
            f'but this run uses {micro} queries per device; write "auto"'
        )
    gas = ds.setdefault("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise ConfigError(
            f"{source}: gradient_accumulation_steps={gas}; GradCache replaces gradient "
            "accumulation here (tune --gc_q_chunk_size/--gc_p_chunk_size for memory) - set 1"
        )
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro * world_size
    settle(ds, "gradient_clipping", "max_grad_norm", config.max_grad_norm)
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    settle(bf16, "enabled", "bf16", config.bf16)
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{source} enables fp16, which this trainer does not support; use bf16")
    ds.pop("fp16", None)
    if "scheduler" in ds:
        raise ConfigError(
            f"{source} has a 'scheduler' section; the schedule comes from --lr_scheduler_type, "
            "--warmup_steps and --learning_rate - remove it"
        )
    if "optimizer" in ds:  # DeepSpeed builds it (e.g. DeepSpeedCPUAdam for ZeRO-Offload)
        params = ds["optimizer"].setdefault("params", {})
        settle(params, "lr", "learning_rate", config.learning_rate)
        settle(params, "betas", "adam_beta1", [config.adam_beta1, config.adam_beta2])
        settle(params, "eps", "adam_epsilon", config.adam_epsilon)
        settle(params, "weight_decay", "weight_decay", config.weight_decay)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    _check_zero(zero, ds, source)
    if config.quantization and zero.get("stage", 0) == 3:
        raise ConfigError(
            "--quantization nf4 cannot be combined with ZeRO-3 (4-bit weights cannot be "
            f"partitioned); use a ZeRO 0-2 config instead of {source}"
        )
    for key, value in list(zero.items()):
        if value == "auto":
            raise ConfigError(f'{source}: zero_optimization.{key} is "auto"; give a number')
    ds.setdefault("steps_per_print", 2**31 - 1)
    return ds


def _offload_device(zero: dict[str, Any], key: str) -> str:
    section = zero.get(key) or {}
    return str(section.get("device", "none")).lower() if isinstance(section, dict) else "none"


def _check_zero(zero: dict[str, Any], ds: dict[str, Any], source: str) -> None:
    """ZeRO stage x offload combinations that DeepSpeed would reject (or mis-train) only after the model
    is built and the engine initialised: refused here, with what to change."""
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage={stage!r}; use 0, 1, 2 or 3")
    params, optimizer = _offload_device(zero, "offload_param"), _offload_device(zero, "offload_optimizer")
    for key, device in (("offload_param", params), ("offload_optimizer", optimizer)):
        if device not in ("none", "cpu"):
            raise ConfigError(
                f'{source}: zero_optimization.{key}.device="{device}" is not supported here (only "cpu", '
                "which configs/ds_zero3_offload.json uses); NVMe offload is untested with this trainer"
            )
    if params == "cpu" and stage != 3:
        raise ConfigError(
            f"{source}: offload_param needs ZeRO-3 (stage is {stage}); set stage 3 or remove offload_param"
        )
    if optimizer == "cpu" and stage == 0:
        raise ConfigError(f"{source}: offload_optimizer needs ZeRO 1-3; set a stage or drop it")
    if optimizer == "cpu" and "optimizer" not in ds and ds.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(
            f'{source}: offload_optimizer needs DeepSpeed\'s CPU Adam: add an "optimizer" section '
            '({"type": "AdamW", "params": {"lr": "auto", ...}} as in configs/ds_zero3_offload.json)'
        )


def format_config(config: TrainConfig) -> str:
    """One option per line, for the log and `--help`-style inspection."""
    return "\n".join(f"  {k}: {v!r}" for k, v in config.to_dict().items())
