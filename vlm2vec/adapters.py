"""Loading peft adapters saved under older transformers module names, exactly or not at all.

The released VLM2Vec adapters were saved with transformers 4.46, whose Qwen2-VL kept the language model at
`model.layers.*` (adapter keys `base_model.model.model.layers.*`) and LLaVA-NeXT at
`language_model.model.layers.*`; transformers 5 names both `model.language_model.layers.*`. peft loads
such an adapter without complaint and leaves the unmatched weights at their initial values (a silent
no-op adapter). Here every adapter key is renamed with transformers' own checkpoint conversion mapping
(`conversion_mapping.get_model_conversion_mapping`, the renaming `from_pretrained` applies to old
checkpoints: peft's own conversion looks the mapping up by model type only, which finds none for
Qwen2-VL), handed to peft as its `key_mapping`, and afterwards every weight of the file must sit in the
model, unchanged, and every adapter weight of the model must come from the file; otherwise ValueError
naming the keys. `adapter_model.safetensors` and the reference's `adapter_model.bin` both load.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


def legacy_key_renamer(model: nn.Module) -> Callable[[str], str]:
    """A function mapping a module / parameter name of an older transformers layout of `model` to its
    current name (identity for names that are current already, and for models without a mapping)."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    if not isinstance(model, PreTrainedModel):  # a custom backbone (the demo family): names are its own
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [])[0]

    return rename


def _key_mapping(keys: list[str], rename: Callable[[str], str]) -> dict[str, str]:
    """peft `key_mapping` (regex -> replacement, on keys without the `base_model.model.` prefix) that
    renames exactly the keys whose name changed."""
    mapping = {}
    for key in keys:
        bare = key.removeprefix(PEFT_PREFIX)
        new = rename(bare)
        if new != bare:
            mapping[f"^{re.escape(bare)}$"] = new
    return mapping


def load_adapter(model: nn.Module, directory: str, *, is_trainable: bool = False) -> nn.Module:
    """`PeftModel.from_pretrained(model, directory)` with old module names renamed and a strict check
    that every adapter weight was loaded (ValueError naming missing / unused keys)."""
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    weights = load_peft_weights(directory, device="cpu")
    rename = legacy_key_renamer(model)
    mapping = _key_mapping(list(weights), rename)
    config = PeftConfig.from_pretrained(directory)
    targets = config.target_modules
    if isinstance(targets, list | set):  # full module names in an old layout are renamed too
        config.target_modules = type(targets)(rename(t) if "." in t else t for t in targets)
    peft_model = PeftModel.from_pretrained(
        model, directory, config=config, is_trainable=is_trainable, key_mapping=mapping or None
    )
    expected = {
        PEFT_PREFIX + rename(k.removeprefix(PEFT_PREFIX)) if k.startswith(PEFT_PREFIX) else k: v
        for k, v in weights.items()
    }
    loaded = get_peft_model_state_dict(peft_model)
    unused = sorted(set(expected) - set(loaded))
    missing = sorted(set(loaded) - set(expected))
    changed = sorted(k for k in set(expected) & set(loaded) if not _same(expected[k], loaded[k]))
    if unused or missing or changed:
        parts = [
            f"{what} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for what, keys in (
                ("adapter weights in the file that match no module of the model", unused),
                ("adapter weights of the model that the file does not hold", missing),
                ("adapter weights that did not load unchanged", changed),
            )
            if keys
        ]
        raise ValueError(f"{directory}: the adapter does not fit this model; " + "; ".join(parts))
    return peft_model


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """File tensor `a` equals model tensor `b` (a ZeRO-3 partitioned module copy, empty here, counts as
    equal: its values live on the ranks)."""
    if b.numel() == 0 and a.numel() > 0:
        return True
    return a.shape == b.shape and torch.equal(a.detach().cpu().to(b.dtype), b.detach().cpu())
