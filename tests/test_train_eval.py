"""The baseline cache key of in-training evaluation (train_eval.weights_fingerprint): it follows what
training changes, as each family declares it (trainable parameters + `family.modules_to_save`), and
nothing else; no family's module names are written into it."""

from __future__ import annotations

import dataclasses

import torch

from vlm2vec.model import VLM2Vec
from vlm2vec.train_eval import trained_parameters, weights_fingerprint


def _bump(model: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(0.5)


def test_fingerprint_follows_the_family_modules_to_save():
    """A family that trains its vision merger in full: a frozen merger weight is part of the key, a frozen
    LLM weight is not, a trainable one is (the key used to name the demo's `projector` instead)."""
    model = VLM2Vec.tiny("qwen2_vl")
    model.family = dataclasses.replace(model.family, modules_to_save=("merger",))
    model.requires_grad_(False)
    trainable = "backbone.model.language_model.layers.0.self_attn.q_proj.weight"
    dict(model.named_parameters())[trainable].requires_grad_(True)
    key = weights_fingerprint(model, "data")
    assert weights_fingerprint(model, "other data") != key
    _bump(model, "backbone.model.language_model.embed_tokens.weight")  # frozen, not trained in full
    assert weights_fingerprint(model, "data") == key
    _bump(model, "backbone.model.visual.merger.mlp.0.weight")  # frozen here, but trained in full
    key2 = weights_fingerprint(model, "data")
    assert key2 != key
    _bump(model, trainable)
    assert weights_fingerprint(model, "data") != key2
    names = [n for n, _ in trained_parameters(model)]
    assert names == sorted(names) and trainable in names
    assert all(".merger." in n or n == trainable for n in names)


def test_fingerprint_of_the_demo_with_lora():
    """The demo family's projector (modules_to_save): peft's trained copy and its frozen original both
    count; LoRA weights are left out with skip='lora_' (LoRA is the identity at init)."""
    from vlm2vec.demo import family

    model = VLM2Vec.tiny(family.FAMILY_NAME).add_lora()
    names = [n for n, _ in trained_parameters(model)]
    assert any(".projector.modules_to_save." in n for n in names)
    assert any(".projector.original_module." in n for n in names)
    key = weights_fingerprint(model, "x", skip="lora_")
    _bump(model, next(n for n in names if "lora_" in n))
    assert weights_fingerprint(model, "x", skip="lora_") == key
    assert weights_fingerprint(model, "x") != weights_fingerprint(model, "x", skip="lora_")
    _bump(model, next(n for n in names if ".projector.original_module." in n))
    assert weights_fingerprint(model, "x", skip="lora_") != key
