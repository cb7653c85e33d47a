"""MMEB evaluation: `python -m vlm2vec.eval --model DIR_OR_ID --data DIR_OR_NAME --out DIR`.

Per dataset: read the rows (data.load_eval_dataset), check them, embed every *distinct* (text, image)
input once (candidates repeat across queries), score each query against its own candidates (ground
truth first) and write the metrics (scoring.py). Embeddings go to an on-disk cache in parts as they
are computed, so an interrupted run resumes where it stopped and a re-run with the same model and data
embeds nothing. Under `torchrun` / `deepspeed` every rank embeds a strided shard of the distinct inputs,
rank 0 gathers them, scores and writes `scores.json` + `table.md` (paper layout, with the paper's
VLM2Vec rows for reference). gloo on CPU, nccl on GPUs.

Tie handling: see scoring.py (ties count against the ground truth; the reference's count, ties as
hits, is reported beside it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm2vec.media import Frames
from vlm2vec.mmeb_tables import EVAL_DATASET_INFO, MMEB_EVAL_DATASETS
from vlm2vec.scoring import (
    aggregate,
    dataset_metrics,
    markdown_table,
    per_dataset_table,
    rank_candidates,
)

HUB_EVAL_NAME = "TIGER-Lab/MMEB-eval"
DATASET_META_FILE = "datasets.json"
"""Optional file in a local eval directory: {"<dataset>": {"meta_task": ..., "ood": bool}} for datasets
that are not in the MMEB table (e.g. the emoji demo); MMEB names need nothing."""
CACHE_FORMAT = 1

Encoder = Callable[..., torch.Tensor]
"""encode(texts, images) -> [N, D] embeddings (images: PIL, a list of PIL, or None per row), called as
encode(texts, images, videos) when a batch has videos (lists of sampled frames); see `encoder_of`."""


@dataclass
class Inputs:
    """The distinct inputs of one dataset and, per query, where its query and candidates sit in them."""

    texts: list[str]
    images: list[str | None]
    query_index: list[int]
    cand_index: list[list[int]]

    def digest(self) -> str:
        h = hashlib.sha256()
        for text, image in zip(self.texts, self.images):
            key = image.key() if hasattr(image, "key") else (image or "")
            h.update(text.encode("utf-8", "surrogatepass") + b"\0" + key.encode("utf-8") + b"\1")
        return h.hexdigest()


# ------------------------------------------------------------------------------------------ reading
def dataset_names(data: str, requested: Sequence[str] | None = None) -> list[str]:
    """The datasets to evaluate: `requested`, else every table file / dataset folder of a local
    directory (sorted), else the 36 MMEB datasets (hub name)."""
    if requested:
        return list(requested)
    path = Path(data).expanduser()
    if path.is_dir():
        from vlm2vec.data import TABLE_SUFFIXES

        names = sorted(
            {
                p.stem if p.is_file() else p.name
                for p in path.iterdir()
                if (p.is_file() and p.suffix in TABLE_SUFFIXES)
                or (p.is_dir() and any(f.suffix in TABLE_SUFFIXES for f in p.rglob("*")))
            }
        )
        if not names:
            raise FileNotFoundError(f"--data {data}: no <dataset>.jsonl / .parquet / .arrow files or folders")
        return names
    if path.is_file():
        return [path.stem]
    return [d.name for d in MMEB_EVAL_DATASETS]


def dataset_meta(data: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """meta_task and split (IND/OOD) per dataset: the MMEB table, overridden by a local datasets.json."""
    extra: dict[str, Any] = {}
    meta_file = Path(data).expanduser() / DATASET_META_FILE
    if meta_file.is_file():
        extra = json.loads(meta_file.read_text(encoding="utf-8"))
    out = {}
    for name in names:
        info = EVAL_DATASET_INFO.get(name)
        entry: dict[str, Any] = {"meta_task": info.meta_task, "ood": info.ood} if info else {}
        entry.update(extra.get(name, {}))
        out[name] = {"meta_task": entry.get("meta_task"), "ood": entry.get("ood")}
    return out


def collect_inputs(eval_set: Any, *, allow_ragged: bool = False, check_images: bool = True) -> Inputs:
    """Deduplicate a dataset's query and candidate inputs by (text, image path) and check its rows:
    every row needs candidates, (unless allow_ragged) as many as row 0, and every image must exist
    (checked once per distinct path). Errors name the dataset and the row."""
    key_to_index: dict[tuple[str, str | None], int] = {}
    texts: list[str] = []
    images: list[str | None] = []
    root = Path(eval_set.image_root) if eval_set.image_root is not None else None

    def index_of(text: str, image: str | None, row: int, where: str, what: str) -> int:
        key = (text, image)
        if key not in key_to_index:
            if image is not None and check_images:
                path = Path(image) if root is None or Path(image).is_absolute() else root / image
                if not path.is_file():
                    raise ValueError(
                        f"dataset {eval_set.name!r}, row {row} ({where}): {what} image not found: {path}"
                    )
            key_to_index[key] = len(texts)
            texts.append(text)
            images.append(image)
        return key_to_index[key]

    query_index, cand_index = [], []
    expected = None
    for i, ex in enumerate(eval_set.examples):
        n = len(ex.cand_texts)
        if n == 0:
            raise ValueError(f"dataset {eval_set.name!r}, row {i} ({ex.where}): empty candidate list")
        if expected is None:
            expected = n
        elif n != expected and not allow_ragged:
            raise ValueError(
                f"dataset {eval_set.name!r}, row {i} ({ex.where}): {n} candidates, but row 0 has {expected}; "
                "MMEB rows of one dataset rank the same number of candidates (pass --allow-ragged-candidates "
                "if this dataset's label sets really differ in size)"
            )
        query_index.append(index_of(ex.query_text, ex.query_image, i, ex.where, "query"))
        cand_index.append(
            [
                index_of(t, p, i, ex.where, f"candidate {j}")
                for j, (t, p) in enumerate(zip(ex.cand_texts, ex.cand_images))
            ]
        )
    return Inputs(texts, images, query_index, cand_index)


# ------------------------------------------------------------------------------------------ caching
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


# ------------------------------------------------------------------------------------------ embedding
def _length_order(inputs: Inputs) -> list[int]:
    """Inputs grouped by kind and length, so each batch pads little."""
    return sorted(range(len(inputs.texts)), key=lambda i: (inputs.images[i] is None, len(inputs.texts[i])))


def embed_inputs(
    inputs: Inputs,
    encode: Encoder,
    load_image: Callable[[str, int], Any],
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
            loaded = [load_image(inputs.images[i], i) if inputs.images[i] else None for i in batch]
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


def _gather_to_rank0(done: dict[int, torch.Tensor], rank: int, world_size: int) -> dict[int, torch.Tensor]:
    if world_size == 1:
        return done
    import torch.distributed as dist

    keys = sorted(done)
    payload = (keys, torch.stack([done[k] for k in keys]) if keys else None)
    gathered: list[Any] = [None] * world_size if rank == 0 else None  # type: ignore[assignment]
    dist.gather_object(payload, gathered, dst=0)
    if rank != 0:
        return {}
    merged: dict[int, torch.Tensor] = {}
    for keys_r, emb_r in gathered:
        for k, row in zip(keys_r, emb_r if emb_r is not None else []):
            merged[k] = row
    return merged


# ------------------------------------------------------------------------------------------ evaluate
def score_dataset(inputs: Inputs, emb: dict[int, torch.Tensor], name: str) -> dict[str, Any]:
    missing = [i for i in range(len(inputs.texts)) if i not in emb]
    if missing:
        raise RuntimeError(
            f"dataset {name!r}: {len(missing)} inputs have no embedding (first: input {missing[0]})"
        )
    table = torch.stack([emb[i] for i in range(len(inputs.texts))])
    ranks = rank_candidates(table[inputs.query_index], table, inputs.cand_index)
    return dataset_metrics(ranks)


def evaluate(
    encode: Encoder,
    data: str,
    datasets: Sequence[str] | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str = "unnamed-model",
    batch_size: int = 16,
    max_rows: int | None = None,
    image_root: str | None = None,
    allow_ragged: bool = False,
    use_cache: bool = True,
    label: str = "this model",
    show_progress: bool = True,
    shard: bool = True,
) -> dict[str, Any] | None:
    """Evaluate an encoder on MMEB-format data; returns the scores dict on rank 0 (None elsewhere) and,
    with out_dir, writes scores.json and table.md there. `encode(texts, images) -> [N, D]`.

    Multi-process: call on every rank after `torch.distributed` is initialised; the ranks split the
    embedding work and rank 0 scores. cache_dir (default out_dir/embeddings; none with use_cache=False)
    holds resumable parts. shard=False: every rank embeds every input in the same order (a model whose
    forward passes are collectives, e.g. ZeRO-3 partitioned weights; no cache then)."""
    from vlm2vec.data import DataError, load_eval_dataset, load_image

    rank, world_size = _dist_rank_world()
    if not shard:
        use_cache = False
    names = dataset_names(data, datasets)
    meta = dataset_meta(data, names)
    if cache_dir is None and out_dir is not None:
        cache_dir = Path(out_dir) / "embeddings"
    results: dict[str, Any] = {}
    started = time.time()
    for name in names:
        try:
            eval_set = load_eval_dataset(data, name, image_root=image_root, max_rows=max_rows)
        except DataError as err:
            raise DataError(f"dataset {name!r}: {err}") from err
        inputs = collect_inputs(eval_set, allow_ragged=allow_ragged)
        cache = None
        if use_cache and cache_dir is not None:
            cache = EmbeddingCache(Path(cache_dir) / name, fingerprint, inputs.digest(), len(inputs.texts))
            if rank == 0:
                cache.prepare()
            _barrier(world_size)

        def load(path: str, i: int, _set: Any = eval_set) -> Any:
            return load_image(path, _set.image_root, f"dataset {_set.name!r}, input {i}")

        done = embed_inputs(
            inputs, encode, load, cache=cache, batch_size=batch_size,
            rank=rank if shard else 0, world_size=world_size if shard else 1,
            desc=f"{name} ({len(inputs.texts)} distinct inputs)", show_progress=show_progress and rank == 0,
        )  # fmt: skip
        _barrier(world_size)
        if shard:
            done = _gather_to_rank0(done, rank, world_size)
        if rank == 0:
            metrics = score_dataset(inputs, done, name)
            results[name] = {
                **metrics,
                "meta_task": meta[name]["meta_task"],
                "split": None if meta[name]["ood"] is None else ("OOD" if meta[name]["ood"] else "IND"),
                "n_distinct_inputs": len(inputs.texts),
            }
            if out_dir is not None:  # partial results survive an interruption
                _write_outputs(out_dir, results, meta, label, data, started)
    if rank != 0:
        return None
    return _summary(results, meta, label, data, started)


def _summary(results: dict, meta: dict, label: str, data: str, started: float) -> dict[str, Any]:
    names = list(results)
    agg = {
        key: {"p_at_1": v["mean"], "n_datasets": v["n"]}
        for key, v in aggregate(
            {n: results[n]["p_at_1"] for n in names},
            {n: meta[n]["meta_task"] for n in names},
            {n: meta[n]["ood"] for n in names},
        ).items()
    }
    agg_ties = aggregate(
        {n: results[n]["p_at_1_ties_as_hits"] for n in names},
        {n: meta[n]["meta_task"] for n in names},
        {n: meta[n]["ood"] for n in names},
    )
    for key, v in agg_ties.items():
        agg[key]["p_at_1_ties_as_hits"] = v["mean"]
    return {
        "model": label,
        "data": data,
        "metric": "precision@1 (ties count as misses; p_at_1_ties_as_hits = the reference's argmax count)",
        "datasets": results,
        "aggregate": agg,
        "seconds": round(time.time() - started, 1),
    }


def summary_row(scores: dict[str, Any], key: str = "p_at_1") -> dict[str, float]:
    """{column: P@1 in %} of a scores dict, for markdown_table."""
    return {col: 100 * v[key] for col, v in scores["aggregate"].items() if key in v}


def _write_outputs(
    out_dir: str | os.PathLike, results: dict, meta: dict, label: str, data: str, started: float
):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = _summary(results, meta, label, data, started)
    tmp = out / "scores.json.tmp"
    tmp.write_text(json.dumps(scores, indent=2) + "\n")
    tmp.replace(out / "scores.json")
    (out / "table.md").write_text(render_report(scores))
    return scores


def render_report(scores: dict[str, Any]) -> str:
    """table.md: the paper-layout summary (ours, the reference's tie count if it differs, the paper's
    VLM2Vec rows) and the per-dataset table."""
    rows = {scores["model"]: summary_row(scores)}
    lenient = summary_row(scores, "p_at_1_ties_as_hits")
    if lenient != rows[scores["model"]]:
        rows[f"{scores['model']} (ties counted as hits, as the reference)"] = lenient
    n_sets = len(scores["datasets"])
    return (
        f"# MMEB evaluation: {scores['model']}\n\nData: `{scores['data']}` ({n_sets} datasets). "
        "Precision@1 (%); a score tie with the ground truth counts as a miss. Overall = mean over "
        "datasets; the paper's rows are over all 36 MMEB datasets.\n\n"
        + markdown_table(rows)
        + "\n## Per dataset\n\n"
        + per_dataset_table(scores["datasets"])
    )


# ------------------------------------------------------------------------------------------ processes
def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def init_distributed() -> tuple[int, int, int]:
    """Join the process group a launcher (torchrun / deepspeed) describes in the environment; returns
    (rank, world_size, local_rank). Single process without launcher variables: (0, 1, 0)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return (dist.get_rank(), dist.get_world_size(), local_rank) if dist.is_initialized() else (0, 1, 0)


def encoder_of(model: Any, batch_size: int) -> Encoder:
    """A VLM2Vec as an Encoder (its own inner progress bar off: evaluate shows one per dataset)."""

    def encode(texts: list[str], images: list[Any], videos: list[Any] | None = None) -> torch.Tensor:
        # frames arrive sampled (per task): num_frames=None keeps them all
        return model.encode(
            texts, images, videos, batch_size=batch_size, show_progress=False, num_frames=None
        )

    return encode


# ------------------------------------------------------------------------------------------ CLI
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlm2vec.eval",
        description="Evaluate a VLM2Vec embedding model with the MMEB protocol (Precision@1 per dataset, "
        "meta-task, IND/OOD, overall). Multi-process: torchrun --nproc_per_node N -m vlm2vec.eval ... "
        "(or the deepspeed launcher); every rank embeds a shard, rank 0 scores and writes the outputs.",
        epilog="Outputs in --out: scores.json (per-dataset P@1, P@1 with ties as hits, hit@5, MRR; "
        "meta-task / IND / OOD / overall means), table.md (paper layout next to the paper's VLM2Vec "
        "numbers), embeddings/ (resumable cache unless --cache-dir/--no-cache says otherwise). Ties: a "
        "candidate scoring exactly as high as the ground truth makes the query a miss; the reference "
        "implementation's count (ties as hits) is reported beside it.",
    )
    p.add_argument("--model", required=True, help="model directory or hub id (anything "
                   "VLM2Vec.from_pretrained loads, including a training run's output directory)")  # fmt: skip
    p.add_argument("--data", required=True, help="local directory with one <dataset>.jsonl/.parquet/.arrow "
                   "(or folder) per dataset, columns qry_text, qry_img_path, tgt_text, tgt_img_path, image "
                   f"paths relative to it; or a hub name such as {HUB_EVAL_NAME} (online)")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (scores.json, table.md)")
    p.add_argument("--benchmark", choices=("mmeb", "mmeb-v2"), default="mmeb", help="mmeb: the 36 image "
                   "datasets (P@1); mmeb-v2: the 78 image/video/visual-document tasks of a local copy "
                   "(Hit@1 / NDCG@5, group table), see vlm2vec/mmeb_v2.py for the layout")  # fmt: skip
    p.add_argument("--tasks", default=None, help="--benchmark mmeb-v2: comma-separated task names "
                   "(default: every task found under --data)")  # fmt: skip
    p.add_argument("--datasets", default=None, help="comma-separated dataset names (default: all in --data; "
                   "the 36 MMEB datasets for a hub name)")  # fmt: skip
    p.add_argument("--image-root", default=None, help="root of image paths (default: the --data directory)")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per encoder batch (default 16)")
    p.add_argument("--max-rows", type=int, default=None, help="only the first N queries of each dataset")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="do not cache embeddings on disk")
    p.add_argument(
        "--allow-ragged-candidates",
        action="store_true",
        help="allow rows of one dataset to have different candidate counts (default: an error)",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: checkpoint)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--pooling", choices=("last", "mean"), default=None, help="override the saved pooling")
    p.add_argument("--max-len", type=int, default=None, help="override the saved max token length")
    p.add_argument(
        "--resolution",
        choices=("low", "mid", "high", "native"),
        default=None,
        help="image resolution preset (low 336 px, mid 672 px, high 1344 px, native; default: the saved "
        "model's, or a released checkpoint's own, vlm2vec/released.py)",
    )
    p.add_argument(
        "--prompt-layout",
        choices=("reference", "native"),
        default=None,
        help="override the saved prompt layout (reference: bare Qwen image pads as VLM2Vec trained)",
    )
    p.add_argument(
        "--attn-implementation", default=None, help="sdpa, eager, flash_attention_2 (default auto)"
    )
    p.add_argument("--label", default=None, help="row label in table.md (default: the --model value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a launcher stopping its ranks, a scheduler) -> SystemExit, so finished work is flushed
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rank, world_size, local_rank = init_distributed()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    from vlm2vec.model import VLM2Vec

    options = {
        "dtype": args.dtype,
        "pooling": args.pooling,
        "max_len": args.max_len,
        "resolution": args.resolution,
        "prompt_layout": args.prompt_layout,
    }
    model = VLM2Vec.from_pretrained(
        args.model,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        pooling=args.pooling,
        max_len=args.max_len,
        resolution=args.resolution,
        prompt_layout=args.prompt_layout,
        attn_implementation=args.attn_implementation,
        device=device,
    )
    model.eval()
    # the settings the model runs with (recorded, a released checkpoint's, or overridden) key the cache
    options["settings"] = model.settings.to_dict()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    try:
        if args.benchmark == "mmeb-v2":
            from vlm2vec.eval_v2 import evaluate_v2, render_v2_report

            tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()] or datasets
            scores = evaluate_v2(
                encoder_of(model, args.batch_size), args.data, tasks, out_dir=args.out,
                cache_dir=args.cache_dir, use_cache=not args.no_cache,
                fingerprint=model_fingerprint(args.model, options), batch_size=args.batch_size,
                max_rows=args.max_rows, label=args.label or args.model, show_progress=not args.no_progress,
                check_inputs=model.family.check_inputs,
            )  # fmt: skip
            if scores is not None:
                print(render_v2_report(scores))
            return 0
        scores = evaluate(
            encoder_of(model, args.batch_size),
            args.data,
            datasets,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            fingerprint=model_fingerprint(args.model, options),
            batch_size=args.batch_size,
            max_rows=args.max_rows,
            image_root=args.image_root,
            allow_ragged=args.allow_ragged_candidates,
            label=args.label or args.model,
            show_progress=not args.no_progress,
        )
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if scores is not None:
        print(render_report(scores))
        print(f"wrote {Path(args.out) / 'scores.json'} and {Path(args.out) / 'table.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
