"""peft LoRA / DoRA on a backbone, and bitsandbytes NF4 config for QLoRA.

Target names like `q_proj` also occur in CLIP vision towers (LLaVA-NeXT, Phi-3.5-V). The reference's
peft config matches names everywhere, so its adapters sit inside those towers too (VLM2Vec v1/v2
`src/model.py` / `src/model/model.py`: `LoraConfig(target_modules=..., use_dora=True,
init_lora_weights="gaussian")`). Here targets are resolved to full module names, skipping `exclude` (the
vision tower, when the run keeps it frozen) so that choice is explicit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

LORA_INITS = ("gaussian", "default", True, False)


def lora_target_names(
    model: nn.Module, targets: Sequence[str], exclude: nn.Module | None = None
) -> list[str]:
    """Full names of Linear (or 4-bit Linear) modules whose last name part is in `targets`,
    skipping everything inside `exclude` (the vision tower) and the LM head."""
    excluded_prefixes = []
    if exclude is not None:
        excluded_prefixes = [name for name, module in model.named_modules() if module is exclude]
    wanted = set(targets)
    names = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in wanted or not _is_linear(module):
            continue
        if any(name == p or name.startswith(p + ".") for p in excluded_prefixes if p):
            continue
        names.append(name)
    return names


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
    except ImportError:
        return False


def add_lora(
    model: nn.Module,
    *,
    targets: Sequence[str],
    exclude: nn.Module | None = None,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.1,
    dora: bool = False,
    init: str | bool = "gaussian",
    modules_to_save: Sequence[str] = (),
) -> nn.Module:
    """Wrap `model` in a peft LoRA (DoRA with dora=True) adapter; only adapter weights (and the
    modules named in modules_to_save, trained in full) train. exclude: a module whose Linears get no
    adapter (None: every module whose name matches, as the reference's peft config).

    init: "gaussian" (VLM2Vec's released checkpoints), "default"/True (Kaiming A, zero B), False
    (random B: for tests that need a non-identity adapter)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if init not in LORA_INITS:
        raise ValueError(f"init must be one of {LORA_INITS}, got {init!r}")
    names = lora_target_names(model, targets, exclude)
    if not names:
        where = " outside the vision tower" if exclude is not None else ""
        raise ValueError(f"targets {list(targets)} match no Linear module{where}")
    if is_quantized(model):
        # casts norms to fp32 and makes inputs require grad so 4-bit layers pass gradients to LoRA
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if exclude is not None:
            exclude.requires_grad_(False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        use_dora=dora,
        init_lora_weights=True if init == "default" else init,
        bias="none",
        modules_to_save=list(modules_to_save) or None,
    )
    return get_peft_model(model, config)


def is_quantized(model: nn.Module) -> bool:
    """True when any weight is a bitsandbytes 4-bit parameter."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def nf4_config(
    compute_dtype: torch.dtype | None = None, skip_modules: Sequence[str] = ()
) -> BitsAndBytesConfig:
    """transformers BitsAndBytesConfig for 4-bit NF4 base weights (QLoRA); `skip_modules` stay dense."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=list(skip_modules) or None,
    )
