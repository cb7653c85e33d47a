"""Released VLM2Vec checkpoints and the settings each was trained and evaluated with.

`VLM2Vec.from_pretrained(<id>)` (and `python -m vlm2vec.eval --model <id>`) looks an id up here when the
directory has no vlm2vec.json (the released repositories have none), so a released checkpoint evaluates
with its own prompt layout, resolution and pixel bounds without flags; explicit arguments still override.
A local directory counts as a copy of a released checkpoint when its path names it: the last path part
is the repository name (`.../VLM2Vec-Qwen2VL-7B`) or a part is the hub cache folder
(`models--TIGER-Lab--VLM2Vec-Qwen2VL-7B`).

Sources (read-only reference checkouts): V1 = branch v1 (ICLR 2025 code), V2.0 = main.
- Qwen2-VL V1 (2B/7B): bare `<|image_pad|>` (v1 src/model_utils.py:29-34), images resized to 1344x1344
  (`image_resolution` default "high", v1 src/arguments.py:91 and src/dataset.py:16-29); the reference
  evaluates them in V2.0 with `--resize_use_processor false --image_resolution high` and the default
  pixel bounds 4*28*28..1280*28*28 (main experiments/public/eval/eval_vlm2vecv1_8gpu.sh; a 1344 image is
  above the upper bound, so it becomes 980x980 = 1225 tokens whatever the lower bound).
- VLM2Vec-V2.0 (Qwen2-VL-2B): bare pads, native resolution within 4*28*28..1280*28*28 (main
  src/arguments.py:43-46, experiments/public/eval/eval_8gpu.sh passes no resolution).
- LLaVA-NeXT: `<image>`, high resolution (main experiments/examples/llava_next/run_eval.sh), processor of
  llava-hf/llava-v1.6-mistral-7b-hf (v1 src/model_utils.py:57-60).
- VLM2Vec-Full (Phi-3.5-V): `<|image_1|>`, 4 crops, no resize (v1 src/dataset.py:55: Phi is never
  resized; main experiments/examples/phi3_v/run_eval.sh `--num_crops 4`).
Every one: last-token pooling ("eos" in V2.0 scripts), L2-normalised, temperature 0.02.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from vlm2vec.backbones import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """One released checkpoint. base: the model its adapter applies to (None: full weights)."""

    repo_id: str
    family: str
    base: str | None
    prompt_layout: str
    resolution: str
    min_pixels: int | None = None
    max_pixels: int | None = None
    num_crops: int | None = None
    pooling: str = "last"
    normalize: bool = True
    temperature: float = 0.02

    def settings(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "num_crops": self.num_crops,
            "prompt_layout": self.prompt_layout,
        }

    def meta(self) -> dict[str, Any]:
        """What a vlm2vec.json would record for this checkpoint (read by `VLM2Vec.from_pretrained`)."""
        meta: dict[str, Any] = {
            "family": self.family,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "settings": self.settings(),
        }
        if self.base is not None:
            meta["base"] = self.base  # the adapter_config.json of a release may name the authors' local path
        return meta

    def download(self) -> str:
        """A local snapshot of the repository (the hub cache; downloads once)."""
        from huggingface_hub import snapshot_download

        return snapshot_download(self.repo_id)


_QWEN_V1 = dict(family="qwen2_vl", prompt_layout="reference", resolution="high",
                min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)  # fmt: skip

RELEASED: dict[str, ReleasedCheckpoint] = {
    c.repo_id: c
    for c in (
        ReleasedCheckpoint("TIGER-Lab/VLM2Vec-Qwen2VL-2B", base="Qwen/Qwen2-VL-2B-Instruct", **_QWEN_V1),
        ReleasedCheckpoint("TIGER-Lab/VLM2Vec-Qwen2VL-7B", base="Qwen/Qwen2-VL-7B-Instruct", **_QWEN_V1),
        ReleasedCheckpoint(
            "VLM2Vec/VLM2Vec-V2.0",
            family="qwen2_vl",
            base="Qwen/Qwen2-VL-2B-Instruct",
            prompt_layout="reference",
            resolution="native",
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
        ),
        ReleasedCheckpoint(
            "TIGER-Lab/VLM2Vec-LLaVa-Next",
            family="llava_next",
            base="llava-hf/llava-v1.6-mistral-7b-hf",
            prompt_layout="reference",
            resolution="high",
        ),
        ReleasedCheckpoint(
            "TIGER-Lab/VLM2Vec-Full",
            family="phi3_v",
            base=None,
            prompt_layout="reference",
            resolution="native",
            num_crops=4,
        ),
    )
}
"""Hub id -> settings. VLM2Vec-Full is a full fine-tune (its own weights); the others are LoRA adapters
whose base is named here. (Which of LLaVa-Next's files are present is not checked offline: an adapter
repository loads on `base`, a full one on its own weights.)"""

_CACHE_DIR = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


def released_checkpoint(path_or_id: str) -> ReleasedCheckpoint | None:
    """The released checkpoint `path_or_id` is (its hub id, or a local copy named like it), or None."""
    path_or_id = os.fspath(path_or_id)
    by_lower = {k.lower(): c for k, c in RELEASED.items()}
    if path_or_id.lower() in by_lower and not os.path.isdir(path_or_id):
        return by_lower[path_or_id.lower()]
    if not os.path.isdir(path_or_id):
        return None
    parts = os.path.normpath(os.path.abspath(path_or_id)).split(os.sep)
    for part in reversed(parts):
        match = _CACHE_DIR.match(part)
        if match:
            return by_lower.get(f"{match['org']}/{match['name']}".lower())
    by_name = {k.split("/")[1].lower(): c for k, c in RELEASED.items()}
    return by_name.get(parts[-1].lower())
