"""The DeepSpeed JSON of a run, resolved against the training options: every "auto" filled from them,
contradictions (a JSON value against an option the user set, ZeRO/offload combinations DeepSpeed would
reject only after building the engine) refused with a ConfigError before anything is built.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from vlm2vec.errors import ConfigError

if TYPE_CHECKING:
    from vlm2vec.config import TrainConfig


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
