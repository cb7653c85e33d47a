"""The embedding engine both evaluations share (MMEB in eval_v1.py, MMEB-V2 in eval_v2.py): a dataset's
distinct inputs (`Inputs`), embedded once each (`embed_dataset`), in parts saved to a resumable on-disk
cache (`EmbeddingCache`, keyed by `model_fingerprint` and the input list), split over the processes.

Candidates repeat across queries, so an evaluation first deduplicates its inputs, then asks for their
embeddings here and ranks with them. Under `torchrun` / `deepspeed` every rank embeds a strided shard of
the inputs (grouped by kind and length, so batches pad little) and rank 0 gathers them. The cache's
parts are written as they are computed (atomically), so an interrupted run resumes where it stopped
and a re-run with the same model and data embeds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vlm2vec import distributed
from vlm2vec.media import Frames

if TYPE_CHECKING:
    from vlm2vec.mmeb_v2 import Visual
    from vlm2vec.model import VLM2Vec

CACHE_FORMAT = 1

Encoder = Callable[..., torch.Tensor]
"""encode(texts, images) -> [N, D] embeddings (images: PIL, a list of PIL, or None per row), called as
encode(texts, images, videos) when a batch has videos (lists of sampled frames); see `encoder_of`."""

VisualInput = Image.Image | list[Image.Image] | Frames
"""What an encoder takes for one row's visual: an image, several images (pages), or a video's frames."""

Loader = Callable[[Any, int], VisualInput]
"""load(source, i) -> the encoder input of input i, from its entry in `Inputs.images` (an image path in
MMEB, a `Visual` in MMEB-V2)."""


@dataclass
class Inputs:
    """The distinct inputs of one dataset and, per query, where its query and candidates sit in them."""

    texts: list[str]
    images: list[str | Visual | None]  # an image path (MMEB), a Visual (MMEB-V2), None: text alone
    query_index: list[int]
    cand_index: list[list[int]]

    def digest(self) -> str:
        h = hashlib.sha256()
        for text, image in zip(self.texts, self.images):
            key = image.key() if hasattr(image, "key") else (image or "")
            h.update(text.encode("utf-8", "surrogatepass") + b"\0" + key.encode("utf-8") + b"\1")
        return h.hexdigest()


class EmbeddingCache:
    """Embeddings of one dataset's distinct inputs, stored in parts `part-r{rank}-{k:05d}.pt` next to a
    `meta.json` that pins the model fingerprint and the input list. A part is written atomically
    (temp file + rename), so an interrupted run loses at most the part in progress."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str, inputs_digest: str, n_inputs: int):
        self.dir = Path(directory)
        self.meta = {
            "format": CACHE_FORMAT,
            "model": fingerprint,
            "inputs": inputs_digest,
            "n_inputs": n_inputs,
        }

    def prepare(self) -> None:
        """Create the directory, or clear it (with a warning) when it holds another model's or input
        list's embeddings. Call on one process (rank 0) before any process loads or writes."""
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            if json.loads(meta_file.read_text()) == self.meta:
                return
            warnings.warn(
                f"{self.dir}: the cache is for another model or input list; recomputing", stacklevel=2
            )
            for part in self.dir.glob("part-*.pt"):
                part.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1))
        tmp.replace(meta_file)

    def load(self) -> dict[int, torch.Tensor]:
        done: dict[int, torch.Tensor] = {}
        for part in sorted(self.dir.glob("part-*.pt")):
            try:
                saved = torch.load(part, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a torn part is recomputed, not fatal
                warnings.warn(f"{part}: unreadable cache part ({err}); recomputing its rows", stacklevel=2)
                continue
            for i, row in zip(saved["index"].tolist(), saved["emb"]):
                done[i] = row
        return done

    def write(self, rank: int, indices: list[int], emb: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        k = len(list(self.dir.glob(f"part-r{rank}-*.pt")))
        path = self.dir / f"part-r{rank}-{k:05d}.pt"
        while path.exists():
            k += 1
            path = self.dir / f"part-r{rank}-{k:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"index": torch.tensor(indices, dtype=torch.long), "emb": emb.contiguous()}, tmp)
        tmp.replace(path)


def cache_root_of(
    cache_dir: str | os.PathLike | None, out_dir: str | os.PathLike | None, use_cache: bool
) -> Path | None:
    """Where an evaluation caches its datasets' embeddings (one folder each): cache_dir, else
    out_dir/embeddings; None with use_cache=False or neither folder given."""
    if not use_cache:
        return None
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(out_dir) / "embeddings" if out_dir is not None else None


def model_fingerprint(model_path: str, options: dict[str, Any]) -> str:
    """Identity of a model for the cache: its path, loader options and, for local directories, the
    names, sizes and modification times of its files (a retrained checkpoint invalidates the cache)."""
    files = []
    path = Path(model_path)
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                files.append([str(f.relative_to(path)), st.st_size, int(st.st_mtime)])
    blob = json.dumps({"model": str(path.resolve()) if path.exists() else model_path, "files": files,
                       "options": options}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _length_order(inputs: Inputs) -> list[int]:
    """Inputs grouped by kind and length, so each batch pads little."""
    return sorted(range(len(inputs.texts)), key=lambda i: (inputs.images[i] is None, len(inputs.texts[i])))


def embed_inputs(
    inputs: Inputs,
    encode: Encoder,
    load: Loader,
    *,
    cache: EmbeddingCache | None,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    save_every: int = 8,
    save_seconds: float = 60.0,
    desc: str = "embed",
    show_progress: bool = True,
) -> dict[int, torch.Tensor]:
    """This rank's share of the distinct inputs, embedded; rows already in the cache are not recomputed.
    Returns index -> embedding: on rank 0 everything it knows (its shard + the cache), elsewhere the shard."""
    from tqdm.auto import tqdm

    done = cache.load() if cache is not None else {}
    shard = [i for k, i in enumerate(_length_order(inputs)) if k % world_size == rank]
    mine = [i for i in shard if i not in done]
    pending_idx: list[int] = []
    pending_emb: list[torch.Tensor] = []
    last_flush = time.time()

    def flush() -> None:
        nonlocal pending_idx, pending_emb, last_flush
        if cache is not None and pending_emb:
            cache.write(rank, pending_idx, torch.cat(pending_emb))
        pending_idx, pending_emb, last_flush = [], [], time.time()

    bar = tqdm(total=len(mine), desc=desc, unit="input", disable=not show_progress or rank != 0)
    try:
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            loaded = [load(inputs.images[i], i) if inputs.images[i] else None for i in batch]
            texts = [inputs.texts[i] for i in batch]
            if any(isinstance(v, Frames) for v in loaded):  # videos go to the encoder's third argument
                images = [None if isinstance(v, Frames) else v for v in loaded]
                emb = encode(texts, images, [v if isinstance(v, Frames) else None for v in loaded])
            else:
                emb = encode(texts, loaded)
            emb = emb.float().cpu()
            if emb.shape[0] != len(batch) or not torch.isfinite(emb).all():
                raise RuntimeError(
                    f"{desc}: the encoder returned {tuple(emb.shape)} (non-finite or wrong count)"
                )
            for i, row in zip(batch, emb):
                done[i] = row
            pending_idx.extend(batch)
            pending_emb.append(emb)
            if len(pending_emb) >= save_every or time.time() - last_flush > save_seconds:
                flush()
            bar.update(len(batch))
    finally:  # an interrupted run (Ctrl-C, SIGTERM -> exception, an encoder error) keeps what it finished
        flush()
        bar.close()
    # rank 0 keeps every cached row; the others hand over only their shard (gathered to rank 0)
    return done if rank == 0 else {i: done[i] for i in shard}


def embed_dataset(
    inputs: Inputs,
    encode: Encoder,
    load: Loader,
    *,
    cache_dir: str | os.PathLike | None,
    fingerprint: str,
    batch_size: int,
    shard: bool = True,
    desc: str = "embed",
    show_progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Every input of one dataset embedded, on rank 0 (index -> embedding); call on every rank together.

    cache_dir (this dataset's folder; None: no cache) is prepared by rank 0 before anyone reads it.
    shard=False: every rank embeds every input in the same order (a model whose forward passes are
    collectives, e.g. ZeRO-3 partitioned weights), nothing is gathered and nothing cached."""
    rank, world_size = distributed.rank_world()
    cache = None
    if shard and cache_dir is not None:
        cache = EmbeddingCache(cache_dir, fingerprint, inputs.digest(), len(inputs.texts))
        if rank == 0:
            cache.prepare()
        distributed.barrier()
    done = embed_inputs(
        inputs, encode, load, cache=cache, batch_size=batch_size,
        rank=rank if shard else 0, world_size=world_size if shard else 1,
        desc=desc, show_progress=show_progress and rank == 0,
    )  # fmt: skip
    distributed.barrier()
    return distributed.gather_to_rank0(done) if shard else done


def encoder_of(model: VLM2Vec, batch_size: int) -> Encoder:
    """A VLM2Vec as an Encoder (its own inner progress bar off: evaluate shows one per dataset)."""

    def encode(
        texts: list[str],
        images: list[Image.Image | list[Image.Image] | None],
        videos: list[Frames | None] | None = None,
    ) -> torch.Tensor:
        # frames arrive sampled (per task): num_frames=None keeps them all
        return model.encode(
            texts, images, videos, batch_size=batch_size, show_progress=False, num_frames=None
        )

    return encode


def write_scores(out_dir: str | os.PathLike, scores: dict[str, Any], table: str) -> None:
    """`scores.json` (written to a temporary name, then renamed: a reader never sees half a file) and
    `table.md` under `out_dir`: the two outputs of either evaluation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "scores.json.tmp"
    tmp.write_text(json.dumps(scores, indent=2) + "\n")
    tmp.replace(out / "scores.json")
    (out / "table.md").write_text(table)
