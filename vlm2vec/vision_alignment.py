"""Keep ZeRO-3 ranks aligned: every rank runs the vision path equally often in each forward.

ZeRO-3 gathers each submodule's weights with collectives when it runs, so a rank whose chunk has no
image (or fewer kinds of visual input) than another would wait forever on a gather its peers never
issue. The trainer counts the vision runs per chunk (`visual_calls`), tops every rank up to the most
with `DUMMY_VISION_KEY`, and `VLM2Vec.forward` runs that many zero-weighted dummy passes
(`dummy_vision_passes`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from PIL import Image
from torch import nn

VISUAL_INPUT_KEYS = ("pixel_values", "pixel_values_videos")
"""Input keys that each make the backbone run its vision path once (images; Qwen videos)."""
DUMMY_VISION_KEY = "vision_dummies"
"""Input key: how many zero-weighted dummy image passes to run in this forward (see `VLM2Vec.forward`)."""
DUMMY_IMAGE_SIZE = 56
"""Side of the blank dummy image: small, but at least one merged patch for every family."""


def visual_calls(inputs: Mapping[str, object]) -> int:
    """How many times the backbone runs its vision path on `inputs`: once per kind of visual input."""
    return sum(key in inputs for key in VISUAL_INPUT_KEYS)


def dummy_image() -> Image.Image:
    """The blank (mid-grey) image the dummy passes encode."""
    return Image.new("RGB", (DUMMY_IMAGE_SIZE, DUMMY_IMAGE_SIZE), (127, 127, 127))


def image_feature_inputs(
    hf_model: nn.Module, prepared: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The entries of a prepared batch that the backbone's `get_image_features` takes."""
    if not hasattr(hf_model, "get_image_features"):
        raise ValueError(f"{type(hf_model).__name__} has no get_image_features: cannot run a dummy image")
    accepted = inspect.signature(hf_model.get_image_features).parameters
    return {k: v for k, v in prepared.items() if k in accepted}


def tensor_sum(value: object) -> torch.Tensor:
    """Sum of every floating tensor in a (nested) model output, as one fp32 scalar."""
    if isinstance(value, torch.Tensor):
        return value.float().sum() if value.is_floating_point() else value.new_zeros((), dtype=torch.float32)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else []
    return sum((tensor_sum(v) for v in items), torch.zeros(()))


@contextmanager
def dummy_vision_passes(hf_model: nn.Module, n: int, image_features: Callable[[], object]) -> Iterator[None]:
    """Run `image_features()` (the vision path on a dummy image) n times right after the token
    embedding, adding 0 * (its features' sum) to the embeddings.

    Why there: every backbone embeds the tokens first and then runs its vision path, so a rank
    whose chunk has no image issues the same module sequence (embedding, vision, language model) as
    a rank whose chunk has one. Why zero-weighted: x + 0 == x, so the embeddings (and the loss) are
    bitwise those without the dummy; a frozen tower contributes no graph at all, a trainable one
    gets exactly-zero gradients (so its gradient reduction still happens on every rank)."""
    if n <= 0:
        yield
        return
    done = []

    def after_embedding(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if done:  # one embedding call per forward runs the dummies (a placeholder lookup may re-embed)
            return output
        done.append(True)
        extra = sum(tensor_sum(image_features()) for _ in range(n))
        return output + 0.0 * extra.to(output.device, output.dtype)

    handle = hf_model.get_input_embeddings().register_forward_hook(after_embedding)
    try:
        yield
    finally:
        handle.remove()
