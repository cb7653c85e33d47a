"""A `ContrastiveBatch` -> model inputs per GradCache chunk (`PreparedBatch`), each chunk padded only to
its own longest row; chunks hold a fixed number of rows or fill a token budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlm2vec.data.batches import ContrastiveBatch
from vlm2vec.data.errors import BadRows, DataError
from vlm2vec.data.item_ids import item_ids


def estimate_length(text: str, image: Image.Image | None) -> int:
    """Rough token count used only to order rows by length: ~4 characters per text token, one token per
    28x28 pixels of image (Qwen2-VL's merged patch). Pass your own `length_fn` for exact counts."""
    n = len(text) // 4 + 1
    if image is not None:
        n += (image.width * image.height) // (28 * 28) + 1
    return n


@dataclass
class PreparedBatch:
    """Model inputs, one dict per GradCache chunk, each padded only to its own longest row.

    Rows may be reordered (sort_by_length) or dropped (skip_bad_rows): `query_order[i]` / `cand_order[j]`
    give the index in the collated ContrastiveBatch of prepared row i / j, and `targets[i]` indexes the
    concatenated candidate chunks (the positive of prepared query i). `candidate_ids[j]`: the item id of
    prepared candidate j (`item_ids`: equal for the same text and pixels, on every process)."""

    query_chunks: list[dict[str, torch.Tensor]]
    cand_chunks: list[dict[str, torch.Tensor]]
    targets: torch.Tensor
    query_order: torch.Tensor
    cand_order: torch.Tensor
    subsets: list[str]
    num_negatives: int = 0
    skipped: list[str] = field(default_factory=list)
    candidate_ids: torch.Tensor | None = None

    @property
    def num_queries(self) -> int:
        return len(self.query_order)

    @property
    def num_candidates(self) -> int:
        return len(self.cand_order)


class ChunkCollator:
    """Turns a ContrastiveBatch into per-chunk model inputs by calling `model.prepare(texts, images)`
    once per chunk, so each chunk carries only its own longest row (never the whole batch's).

    model: anything with `prepare(texts, images)` (a VLM2Vec); it must raise ValueError for a row it
      cannot encode (e.g. image tokens cut by max_len). The failing rows are found, and the error re-raised
      naming the example's file and row, or with skip_bad_rows their queries are dropped and counted.
    sort_by_length: order queries and candidates (separately) by `length_fn` so similar lengths share a
      chunk; targets follow the new order.
    packed: ask prepare for padding-free packed sequences (`prepare(..., packed=True)`).
    max_tokens: size chunks by tokens instead of rows: consecutive rows (in the sorted order) fill a
      chunk while the chunk's tokens stay within the budget. A chunk's tokens are what the model sees:
      rows x its longest row when padded, the sum of row lengths when packed; a row's length is its
      prepared length (visual + text tokens, from `model.count_tokens` when the model has it), so a
      video row (~5,000 tokens) goes nearly alone while text rows (~20) share a chunk by the hundred.
      A row longer than the budget gets a chunk of its own; when padded, a row less than half as long as
      its chunk's longest starts a new chunk (videos, images and text rows do not pad each other).
      Chunk sizes then only bound rows per chunk
      when given explicitly (`query_chunk_size` / `cand_chunk_size` act as caps; None: no cap).
    group_size: task-wise batching: every `group_size` consecutive queries (drawn from one subset by
      `StepSampler(homogeneous_size=...)`) and their candidates are sorted and chunked on their own, so
      no GradCache chunk mixes two groups.
    """

    def __init__(
        self,
        model: Any,
        *,
        query_chunk_size: int | None,
        cand_chunk_size: int | None = None,
        sort_by_length: bool = False,
        length_fn: Callable[[str, Image.Image | None], int] = estimate_length,
        skip_bad_rows: bool = False,
        packed: bool = False,
        max_tokens: int | None = None,
        group_size: int | None = None,
    ):
        if not callable(getattr(model, "prepare", None)):
            raise TypeError(f"model must have a prepare(texts, images) method, got {type(model).__name__}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if query_chunk_size is None and max_tokens is None:
            raise ValueError("query_chunk_size is required unless chunks are sized by max_tokens")
        if cand_chunk_size is None and max_tokens is None:
            cand_chunk_size = query_chunk_size
        for size in (query_chunk_size, cand_chunk_size):
            if size is not None and size < 1:
                raise ValueError(f"chunk sizes must be >= 1, got {query_chunk_size} and {cand_chunk_size}")
        self.model, self.query_chunk_size, self.cand_chunk_size = model, query_chunk_size, cand_chunk_size
        self.sort_by_length, self.length_fn = sort_by_length, length_fn
        self.skip_bad_rows, self.packed, self.max_tokens = skip_bad_rows, packed, max_tokens
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.bad_rows = BadRows()

    def _prepare(self, texts: list[str], images: list, videos: list) -> dict[str, torch.Tensor]:
        imgs = images if any(i is not None for i in images) else None
        kwargs: dict[str, Any] = {"packed": True} if self.packed else {}
        if any(v is not None for v in videos):
            kwargs["videos"] = videos
        return self.model.prepare(texts, imgs, **kwargs)

    def _lengths(self, texts: list[str], images: list, videos: list) -> list[int] | None:
        """Per-row lengths: exact prepared token counts under a token budget (`model.count_tokens`),
        `length_fn` estimates for sorting otherwise (None when neither is needed)."""
        count = getattr(self.model, "count_tokens", None)
        if self.max_tokens is not None and callable(count):
            return [int(count(t, i, v)) for t, i, v in zip(texts, images, videos)]
        if self.max_tokens is None and not self.sort_by_length:
            return None
        out = []
        for t, i, v in zip(texts, images, videos):
            if v is None and not isinstance(i, list | tuple):  # one image or none: length_fn as given
                out.append(self.length_fn(t, i))
                continue
            ims = list(i) if isinstance(i, list | tuple) else [i] if i is not None else []
            out.append(self.length_fn(t, None) + sum(self.length_fn("", im) for im in ims + list(v or [])))
        return out

    def _order(self, lengths: list[int] | None) -> list[int]:
        if not self.sort_by_length or lengths is None:
            return list(range(len(lengths))) if lengths is not None else []
        return sorted(range(len(lengths)), key=lambda r: -lengths[r])  # stable: ties keep batch order

    def _groups(self, order: list[int], lengths: list[int] | None, size: int | None) -> list[list[int]]:
        """Rows of each chunk: `size` rows at a time, or filled up to the token budget."""
        if self.max_tokens is None:
            assert size is not None
            return [order[s : s + size] for s in range(0, len(order), size)]
        assert lengths is not None
        groups: list[list[int]] = []
        current: list[int] = []
        longest = total = 0
        for r in order:
            n = lengths[r]
            grown = (total + n) if self.packed else (len(current) + 1) * max(longest, n)
            # padded: a row less than half as long as the chunk's longest would more than double its
            # cost in padding, so it starts a chunk of shorter rows (rows come sorted by length)
            mismatched = not self.packed and 2 * n < longest
            full = grown > self.max_tokens or (size is not None and len(current) == size)
            if current and (full or mismatched):
                groups.append(current)
                current, longest, total = [], 0, 0
            current.append(r)
            longest, total = max(longest, n), total + n
        if current:
            groups.append(current)
        return groups

    def _chunks(
        self,
        texts: list[str],
        images: list,
        videos: list,
        size: int | None,
        segment: int | list[int] | None = None,
        min_chunks: int = 0,
    ) -> tuple[list[int], list[dict[str, torch.Tensor]], list[tuple[int, ValueError]]]:
        """(row order, prepared chunks) or the rows (batch indices) that prepare rejects. `segment`: rows
        per group, or the first row of each group, that chunks never cross (task-wise batching).
        `min_chunks`: split the chunks with the most rows in two until there are at least this many
        (GradCache is exact for any chunking)."""
        try:
            lengths = self._lengths(texts, images, videos)
        except ValueError:  # a row cannot even be measured: find it row by row below
            lengths, size = None, 1
        bounds = _segment_bounds(segment, len(texts))
        order, groups = [], []
        for start, stop in zip(bounds, bounds[1:]):
            rows = list(range(start, stop))
            if lengths is not None:
                part = (
                    [rows[i] for i in self._order([lengths[r] for r in rows])]
                    if self.sort_by_length
                    else rows
                )
                groups += self._groups(part, lengths, size)
            else:
                part = rows
                groups += (
                    [[r] for r in part] if self.max_tokens is not None else self._groups(part, None, size)
                )
            order += part
        while len(groups) < min_chunks and max(map(len, groups), default=0) > 1:
            k = max(range(len(groups)), key=lambda i: len(groups[i]))  # in place: groups still tile order
            half = len(groups[k]) // 2
            groups[k : k + 1] = [groups[k][:half], groups[k][half:]]
        chunks, failures = [], []
        for rows in groups:
            try:
                chunks.append(
                    self._prepare(
                        [texts[r] for r in rows], [images[r] for r in rows], [videos[r] for r in rows]
                    )
                )
            except ValueError as err:
                bad = []
                for r in rows:
                    try:
                        self._prepare([texts[r]], [images[r]], [videos[r]])
                    except ValueError as row_err:
                        bad.append((r, row_err))
                failures.extend(bad or [(r, err) for r in rows])
        return order, chunks, failures

    def __call__(self, batch: ContrastiveBatch, min_chunks: tuple[int, int] = (0, 0)) -> PreparedBatch:
        """`min_chunks`: at least this many (query, candidate) chunks where the rows allow it (ZeRO-3
        needs the same number of forward passes on every process, see `train.align_processes`)."""
        first = batch.group_starts()  # of the batch as given: cand_order indexes it
        skipped = list(batch.skipped)
        kept = list(range(len(batch)))  # original index of each remaining query
        while True:
            starts = batch.group_starts()
            owner = [q for q, n in enumerate(batch.group_sizes()) for _ in range(n)]  # candidate -> query
            if len(batch) == 0:
                raise DataError(f"every row of the batch was bad: {skipped[:3]}")
            q_seg = self.group_size if self.group_size and len(batch) % self.group_size == 0 else None
            q_order, q_chunks, q_fail = self._chunks(
                batch.query_texts,
                batch.query_images,
                batch.videos("query"),
                self.query_chunk_size,
                q_seg,
                min_chunks[0],
            )
            c_order, c_chunks, c_fail = self._chunks(
                batch.cand_texts,
                batch.cand_images,
                batch.videos("cand"),
                self.cand_chunk_size,
                q_seg and starts[::q_seg],
                min_chunks[1],
            )
            if not q_fail and not c_fail:
                break
            bad_queries: dict[int, str] = {}
            for side, fails in (("query", q_fail), ("candidate", c_fail)):
                for r, err in fails:
                    q = r if side == "query" else owner[r]
                    slot = 0 if side == "query" else r - starts[q]
                    label = side if side == "query" else ("positive" if slot == 0 else f"negative {slot}")
                    where = batch.sources[q] if batch.sources else f"batch row {q}"
                    msg = f"{where} [{batch.subsets[q]}] {label}: {err}"
                    if not self.skip_bad_rows:
                        raise DataError(msg) from err
                    bad_queries.setdefault(q, msg)
            for msg in bad_queries.values():
                self.bad_rows.add(msg, "prepare")
                skipped.append(msg)
            keep = [q for q in range(len(batch)) if q not in bad_queries]
            batch, kept = batch.select(keep), [kept[q] for q in keep]
        cand_pos = torch.empty(len(c_order), dtype=torch.long)
        cand_pos[torch.tensor(c_order, dtype=torch.long)] = torch.arange(len(c_order))
        targets = cand_pos[torch.tensor([starts[q] for q in q_order], dtype=torch.long)]
        return PreparedBatch(
            query_chunks=q_chunks,
            cand_chunks=c_chunks,
            targets=targets,
            query_order=torch.tensor([kept[q] for q in q_order], dtype=torch.long),
            cand_order=torch.tensor(
                [first[kept[owner[c]]] + c - starts[owner[c]] for c in c_order], dtype=torch.long
            ),
            subsets=[batch.subsets[q] for q in q_order],
            num_negatives=batch.num_negatives,
            skipped=skipped,
            candidate_ids=item_ids(batch.cand_texts, batch.cand_images, batch.videos("cand"))[c_order],
        )


def _segment_bounds(segment: int | list[int] | None, n: int) -> list[int]:
    """[start of each segment..., n]: `segment` rows each (None: one segment), or the given starts."""
    if isinstance(segment, list):
        return sorted({*segment, n} - {n}) + [n] if n else [0]
    step = segment or max(1, n)
    return list(range(0, n, step)) + [n] if n else [0]
