"""Frozen-feature replay: the vision tower's second run on an input returns the first run's output.

GradCache encodes each chunk twice (first pass, then the recompute in backward); nothing in a frozen
tower needs gradients, so the recompute can reuse the first pass's outputs (`VLM2Vec.reuse_vision_features`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vlm2vec.gradcache import recomputing


@contextmanager
def replay_frozen_features(tower: nn.Module | None) -> Iterator[dict[str, int]]:
    """Inside this block the frozen `tower`'s second run on an input replays the first.

    A call is replayed only during the recompute (`gradcache.recomputing()`) or when the earlier call
    ran without grad (a no-grad encoding pass); a repeated image within the first pass runs the tower
    again, so every rank runs it equally often (ZeRO-3). Yields a dict of counters {"computed",
    "reused"}. Raises ValueError if the tower has trainable weights."""
    stats = {"computed": 0, "reused": 0}
    if tower is None:
        yield stats
        return
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("the vision tower has trainable parameters; its features cannot be reused")
    original = tower.forward
    cache: list[tuple[tuple, dict, object, bool]] = []

    def forward(*args: object, **kwargs: object) -> object:
        replay = recomputing()
        for cached_args, cached_kwargs, output, without_grad in cache:
            if (replay or without_grad) and _same_call(cached_args, cached_kwargs, args, kwargs):
                stats["reused"] += 1
                return copy.copy(output)  # callers may reassign fields of a ModelOutput
        without_grad = not torch.is_grad_enabled()
        with torch.no_grad():
            output = original(*args, **kwargs)
        cache.append((args, kwargs, output, without_grad))
        stats["computed"] += 1
        return copy.copy(output)

    had_instance_forward = "forward" in tower.__dict__
    tower.forward = forward
    try:
        yield stats
    finally:
        if had_instance_forward:
            tower.forward = original
        else:
            del tower.forward
        cache.clear()


def _same_call(a: tuple, ka: dict, b: tuple, kb: dict) -> bool:
    """Whether two calls got the same arguments (tensors: same shape, dtype, device and values)."""
    if len(a) != len(b) or ka.keys() != kb.keys():
        return False
    return all(_same_value(x, y) for x, y in zip(list(a) + list(ka.values()), list(b) + [kb[k] for k in ka]))


def _same_value(x: object, y: object) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.shape == y.shape
            and x.dtype == y.dtype
            and x.device == y.device
            and (x is y or torch.equal(x, y))
        )
    if isinstance(x, list | tuple) and isinstance(y, list | tuple):
        return len(x) == len(y) and all(_same_value(p, q) for p, q in zip(x, y))
    try:
        return bool(x == y)
    except Exception:  # values without a usable == count as different
        return False
