"""Training options read from the command line and YAML: `load_config(argv)` builds a checked
`TrainConfig` (vlm2vec/config.py) from dataclass defaults < `--config file.yaml` < `--key value` flags.

Flags and YAML keys go through the same per-type coercion (argparse for flags, `_coerce` for YAML), so
both reject the same bad values with a ConfigError naming the option; the default model's recipe fills
the options the user left unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from vlm2vec.config import DEMO_MODEL, IGNORED_OPTIONS, TrainConfig, option_fields
from vlm2vec.demo.recipe import RECIPE
from vlm2vec.ds_config import load_ds_config
from vlm2vec.errors import ConfigError


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
    for f in option_fields():
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
        if str(text).strip().lower() in ("", "none", "null"):  # `--eval_data ''`: none
            return None
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _int_list(text: str) -> list[int]:
    """'64,128,256' (or '64 128 256') -> [64, 128, 256]."""
    try:
        return [int(part) for part in str(text).replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,128,256, got {text!r}") from None


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
    for f in option_fields():
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
        elif base == list[int]:
            kwargs.update(type=_nullable(_int_list), metavar="N,N,...")
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
    if value is None or (nullable and value == ""):
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
    if base == list[int]:
        if isinstance(value, list) and all(type(v) is int for v in value):
            return list(value)
        if isinstance(value, str | int) and not isinstance(value, bool):
            try:
                return _int_list(str(value))
            except argparse.ArgumentTypeError:
                pass
        raise ConfigError(f"{where} must be a list of integers like [64, 128], got {value!r}")
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
    if not validate:
        return config
    config.validate()
    if config.ds_config is not None:  # the DeepSpeed JSON exists and parses (resolved later, per world)
        load_ds_config(config.ds_config)
    return config


def _with_recipe(config: TrainConfig) -> TrainConfig:
    """The default model's recipe values for every option the user left unset (YAML or flags win)."""
    values = {k: v for k, v in RECIPE.items() if k not in config.explicit}
    if "per_device_train_batch_size" in config.explicit:  # the user's per-device size wins over the batch
        values.pop("train_batch_size", None)
    return dataclasses.replace(config, **values)
