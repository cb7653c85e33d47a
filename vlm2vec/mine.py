"""`python -m vlm2vec.mine --model M --data TRAIN_DIR --out OUT_DIR --num_negatives K`: hard negatives
for MMEB-train rows, mined with a model, written as MMEB-train rows that `--dataset_name OUT_DIR
--num_hard_negatives K` trains on.

Path: read the rows (data.load_train_data) -> per subset, every distinct query and positive embedded
once with evaluation's engine (embedding.embed_dataset: resumable on-disk cache, sharded over the
ranks of torchrun / deepspeed, gathered on rank 0) -> rank 0 ranks each row's pool block by block
(mine_topk.py), drops its own positive, same items and likely false negatives and takes K from the
rank window (mine_select.py) -> `<subset>.jsonl` per subset plus the mining report (mine_report.py),
written to a temporary folder renamed to --out at the end.

Image and video paths are written absolute (resolved against the data's image root), so the output
folder trains without --image_dir. Existing negatives of the input rows are replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlm2vec import distributed
from vlm2vec.data import DataError, TrainData, TrainExample, load_train_data
from vlm2vec.embedding import Inputs, embed_dataset, encoder_of, model_fingerprint
from vlm2vec.media import Frames, MediaError, load_frames, load_visual, resolve_path
from vlm2vec.mine_report import subset_entry, write_report
from vlm2vec.mine_select import ItemKey, Mined, MineSettings, exclusions, mine_pool

PROG = "python -m vlm2vec.mine"
DEMO_MODEL = "demo:emoji"


@dataclass(frozen=True)
class TrainVisual:
    """A row side's visual input for the embedding engine: image path(s) and/or a video."""

    image: str | tuple[str, ...] | None
    video: str | None

    def key(self) -> str:
        return json.dumps([self.image, self.video])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Mine hard negatives for MMEB-train rows with an embedding model: every distinct "
        "query and positive is embedded once (cached, resumable, sharded under torchrun), each row's "
        "pool (the positives of its subset, or of all subsets) is ranked, its own positive, same items "
        "and likely false negatives are dropped, and K negatives are taken from the rank window.",
        epilog="Output in --out: <subset>.jsonl (MMEB-train rows with neg_text / neg_image_path lists of "
        "at most K items; train with --dataset_name OUT --num_hard_negatives K), mining_report.json, "
        "mining_report.md, scores.png (positive and negative score histograms; needs matplotlib).",
    )
    p.add_argument("--model", required=True, help="model directory or hub id (anything "
                   f"VLM2Vec.from_pretrained loads, e.g. a training run's output), or {DEMO_MODEL} (the "
                   "untrained default model)")  # fmt: skip
    p.add_argument("--data", required=True, help="training data: a folder of <subset>.jsonl/.parquet/.arrow")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--num_negatives", type=int, required=True, help="K negatives per row")
    p.add_argument("--subsets", nargs="+", default=None, help="subsets to mine (default: all)")
    p.add_argument("--pool", choices=("subset", "all"), default="subset",
                   help="candidates: the distinct positives of the row's subset, or of all")  # fmt: skip
    p.add_argument("--rank_range", default="0:100", help="window LO:HI of ranks (0 = best, after the "
                   "filters) K is taken from (default 0:100)")  # fmt: skip
    p.add_argument("--max_score_ratio", type=_optional_float, default=0.95, help="drop candidates scoring "
                   "above this times the positive's score (default 0.95; none: off)")  # fmt: skip
    p.add_argument("--margin", type=_optional_float, default=0.0, help="drop candidates scoring above the "
                   "positive's score minus this (default 0.0; none: off)")  # fmt: skip
    p.add_argument("--sampling", choices=("top", "random"), default="top",
                   help="the K best of the window, or K drawn at random from it (by --seed)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random")
    p.add_argument("--encoder", choices=("model", "probe"), default="model", help="model: the model "
                   "embeds both sides; probe: images through a ridge map of the model's frozen image "
                   "features fitted on the rows (vlm2vec/probe.py), texts through the model")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=32, help="inputs per encoder batch (default 32)")
    p.add_argument("--max_rows", type=int, default=None, help="only the first N rows of each subset")
    p.add_argument("--image_dir", default=None, help="root of image paths (default: the --data folder)")
    p.add_argument("--cache_dir", default=None, help="embedding cache (default: OUT.cache, kept)")
    p.add_argument("--no_cache", action="store_true", help="do not cache embeddings on disk")
    p.add_argument("--query_block", type=int, default=1024, help="queries ranked together (memory)")
    p.add_argument("--pool_block", type=int, default=65536, help="candidates scored together (memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--strict", action="store_true", help="an error (exit 2) instead of a warning when "
                   "some row gets fewer than K negatives")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if any)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def parse_rank_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        return int(lo or 0), int(hi)
    except ValueError:
        raise DataError(f"--rank_range {text!r}: expected LO:HI, e.g. 10:100") from None


def settings_of(args: argparse.Namespace) -> MineSettings:
    try:
        return MineSettings(
            args.num_negatives, parse_rank_range(args.rank_range), args.max_score_ratio, args.margin,
            args.sampling, args.seed,
        )  # fmt: skip
    except ValueError as err:
        raise DataError(str(err)) from None


def preflight(args: argparse.Namespace) -> MineSettings:
    """Bad input refused before the data or the model loads (DataError, one line)."""
    settings = settings_of(args)
    if args.batch_size < 1 or args.query_block < 1 or args.pool_block < 1:
        raise DataError("--batch_size, --query_block and --pool_block must be >= 1")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DataError(f"--out {args.out} exists; pass --overwrite to replace it")
    if not Path(args.data).expanduser().exists():
        raise DataError(f"--data {args.data}: no such file or folder")
    if args.model != DEMO_MODEL and args.model.startswith((".", "/", "~")) and not Path(args.model).exists():
        raise DataError(f"--model {args.model}: no such model directory")
    return settings


# ------------------------------------------------------------------------------------------- inputs
def _visual(image: Any, video: str | None) -> TrainVisual | None:
    return None if image is None and video is None else TrainVisual(image, video)


def query_key(ex: TrainExample) -> ItemKey:
    return (ex.query_text, ex.query_image, ex.query_video)


def pos_key(ex: TrainExample) -> ItemKey:
    return (ex.pos_text, ex.pos_image, ex.pos_video)


def subset_inputs(rows: Sequence[TrainExample]) -> tuple[Inputs, list[ItemKey]]:
    """The distinct queries and positives of one subset as the engine's `Inputs` (query_index: each
    row's query, cand_index: [[its positive]]), and the distinct positives in first-seen order."""
    index: dict[ItemKey, int] = {}
    texts: list[str] = []
    images: list[TrainVisual | None] = []

    def add(key: ItemKey) -> int:
        if key not in index:
            index[key] = len(texts)
            texts.append(key[0])
            images.append(_visual(key[1], key[2]))  # type: ignore[arg-type]
        return index[key]

    q_idx = [add(query_key(ex)) for ex in rows]
    p_idx = [[add(pos_key(ex))] for ex in rows]
    positives = list(dict.fromkeys(pos_key(ex) for ex in rows))
    return Inputs(texts, images, q_idx, p_idx), positives  # type: ignore[arg-type]


def input_kinds(rows: Sequence[TrainExample]) -> set[str]:
    kinds = set()
    for ex in rows:
        for image, video in ((ex.query_image, ex.query_video), (ex.pos_image, ex.pos_video)):
            if isinstance(image, tuple):
                kinds.add("multi_image")
            elif image is not None:
                kinds.add("image")
            if video is not None:
                kinds.add("video")
    return kinds


def check_negatives_writable(name: str, positives: Sequence[ItemKey]) -> None:
    """A training row's negative is a text and at most one image: pools of videos or page lists
    cannot be written as negatives."""
    if any(v is not None or isinstance(im, tuple) for _, im, v in positives):
        raise DataError(
            f"subset {name!r}: its positives are videos or image lists; a training row's negatives hold "
            "one image each (neg_image_path), so this subset cannot be mined (leave it out with --subsets)"
        )


# ------------------------------------------------------------------------------------------- encoder
def load_encoder(args: argparse.Namespace, data: TrainData, device: str) -> tuple[Any, str, Any]:
    """(encode, cache fingerprint, check_inputs(kinds, where)) of --model / --encoder."""
    from vlm2vec.model import VLM2Vec

    options: dict[str, Any] = {"encoder": args.encoder}
    if args.model == DEMO_MODEL:
        from vlm2vec.demo.default_data import FEATURE_FILE
        from vlm2vec.demo.recipe import load_demo_model

        cache = Path(args.data).expanduser().resolve().parent / FEATURE_FILE
        model = load_demo_model(0, "mean", str(cache) if cache.is_file() else None).to(device)
    else:
        try:
            model = VLM2Vec.from_pretrained(args.model, device=device)
        except OSError as err:
            raise DataError(f"--model {args.model}: cannot load the model: {err}".splitlines()[0]) from None
    model.eval()
    _reuse_feature_cache(model, Path(args.data))
    options["settings"] = model.settings.to_dict() if hasattr(model, "settings") else None
    fingerprint = model_fingerprint(args.model, options)
    if args.encoder == "model":
        return encoder_of(model, args.batch_size), fingerprint, model.family.check_inputs
    from vlm2vec.probe import RidgeProbe, has_frozen_features
    from vlm2vec.train_eval import probe_pairs

    if not has_frozen_features(model):
        raise DataError(
            f"--encoder probe: --model {args.model} has no frozen image features (demo family only)"
        )
    images, texts = probe_pairs(data)
    if len(images) < 5:
        raise DataError(f"--encoder probe: {len(images)} image->text rows to fit the probe on; need >= 5")
    probe = RidgeProbe.fit(model, images, texts, batch=args.batch_size)
    fingerprint = model_fingerprint(args.model, {**options, "probe": _digest(probe.w), "lam": probe.lam})

    def check(kinds: set[str], where: str) -> None:
        if kinds - {"image"}:
            raise ValueError(
                f"{where} has {sorted(kinds - {'image'})} rows; the probe embeds single images only"
            )

    return probe, fingerprint, check


# ------------------------------------------------------------------------------------------- mining
def embed_subset(
    name: str, rows: Sequence[TrainExample], data: TrainData, encode: Any, fingerprint: str,
    cache_root: Path | None, batch_size: int, show_progress: bool,
) -> tuple[Inputs, list[ItemKey], torch.Tensor | None]:  # fmt: skip
    """(inputs, distinct positives, [N, D] embeddings of the inputs on rank 0, None elsewhere)."""
    inputs, positives = subset_inputs(rows)

    def load(v: TrainVisual, i: int) -> Any:
        where = f"subset {name!r}, input {i}"
        if v.video is not None:
            return Frames(load_frames(v.video, data.image_root, data.num_frames, where) or [])
        return load_visual(v.image, data.image_root, where)

    done = embed_dataset(
        inputs, encode, load, cache_dir=cache_root / _safe(name) if cache_root else None,
        fingerprint=fingerprint, batch_size=batch_size, desc=f"{name} ({len(inputs.texts)} distinct inputs)",
        show_progress=show_progress,
    )  # fmt: skip
    if distributed.rank() != 0:
        return inputs, positives, None
    return inputs, positives, torch.stack([done[i] for i in range(len(inputs.texts))])


def mine_all(
    data: TrainData, embedded: dict[str, tuple[Inputs, list[ItemKey], torch.Tensor]], settings: MineSettings,
    pool_mode: str, device: str, query_block: int, pool_block: int, show_progress: bool,
) -> dict[str, tuple[Mined, list[ItemKey]]]:  # fmt: skip
    """Per subset, (mined result, the pool's items) on rank 0."""
    from tqdm.auto import tqdm

    def pool_of(names: Sequence[str]) -> tuple[list[ItemKey], torch.Tensor]:
        keys: dict[ItemKey, int] = {}
        rows = []
        for name in names:
            inputs, positives, emb = embedded[name]
            where = {(t, *_split(im)): i for i, (t, im) in enumerate(zip(inputs.texts, inputs.images))}
            for key in positives:
                if key not in keys:
                    keys[key] = len(keys)
                    rows.append(emb[where[key]])
        return list(keys), torch.stack(rows)

    shared = pool_of(list(embedded)) if pool_mode == "all" else None
    out = {}
    for s_no, (name, (inputs, _, emb)) in enumerate(embedded.items()):
        items, pool = shared or pool_of([name])
        if len(items) < 2:
            raise DataError(
                f"subset {name!r}: the pool holds {len(items)} distinct candidate(s), none can be a negative "
                "(try --pool all)"
            )
        rows = data.subsets[name]
        pool_index = {k: i for i, k in enumerate(items)}
        pos_index = [pool_index[pos_key(ex)] for ex in rows]
        excl = exclusions([query_key(ex) for ex in rows], pos_index, pool_index)
        queries = emb[inputs.query_index].to(device)
        bar = tqdm(
            total=len(rows), desc=f"rank {name} (pool {len(items)})", unit="row", disable=not show_progress
        )
        mined = mine_pool(
            queries, pos_index, pool.to(device), excl, settings,
            row_ids=[(s_no, r) for r in range(len(rows))], query_block=query_block,
            pool_block=pool_block, progress=bar,
        )  # fmt: skip
        bar.close()
        out[name] = (mined, items)
    return out


def _reuse_feature_cache(model: Any, data: Path) -> None:
    """A demo-family model (frozen image features) without a feature cache of its own reads the one the
    default data's builder wrote beside the data folder: features are keyed by image content, so only
    the time changes (a trained default model re-embeds ~6,000 images otherwise)."""
    from vlm2vec.demo.default_data import FEATURE_FILE

    featurizer = getattr(getattr(model, "processor", None), "featurizer", None)
    cache = data.expanduser().resolve().parent / FEATURE_FILE
    if featurizer is not None and getattr(featurizer, "cache_file", "") is None and cache.is_file():
        featurizer.cache_file, featurizer._cache = str(cache), None


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def _split(image: TrainVisual | None) -> tuple[Any, Any]:
    return (None, None) if image is None else (image.image, image.video)


def _safe(name: str) -> str:
    return name.replace("/", "__").replace(os.sep, "__")


# ------------------------------------------------------------------------------------------- output
def _abs(path: Any, root: Path | None) -> Any:
    if path is None:
        return ""
    if isinstance(path, tuple):
        return [str(resolve_path(p, root)) for p in path]
    return str(resolve_path(path, root))


def mined_rows(
    rows: Sequence[TrainExample], mined: Mined, items: list[ItemKey], root: Path | None
) -> list[dict]:
    """The subset's rows in MMEB-train layout with their mined negatives (lists of at most K)."""
    videos = any(ex.query_video or ex.pos_video for ex in rows)
    out = []
    for ex, negs in zip(rows, mined.negatives):
        row = {
            "qry": ex.query_text, "qry_image_path": _abs(ex.query_image, root),
            "pos_text": ex.pos_text, "pos_image_path": _abs(ex.pos_image, root),
            "neg_text": [items[j][0] for j in negs],
            "neg_image_path": [_abs(items[j][1], root) for j in negs],
        }  # fmt: skip
        if videos:
            row["qry_video_path"] = _abs(ex.query_video, root)
            row["pos_video_path"] = _abs(ex.pos_video, root)
        out.append(row)
    return out


def write_output(out: Path, overwrite: bool, files: dict[str, list[dict]], report: dict[str, Any]) -> None:
    """Everything written to a temporary sibling folder, then renamed to `out` (a reader never sees half
    an output; an old --out is replaced only once the new one is complete)."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, rows in files.items():
            with open(tmp / f"{_safe(name)}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_report(tmp, report)
        if out.exists():
            if not overwrite:
                raise DataError(f"--out {out} appeared while mining; pass --overwrite to replace it")
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, settings: MineSettings, device: str) -> int:
    """Mining on every rank (each embeds a shard); rank 0 ranks, selects and writes."""
    rank = distributed.rank()
    show = not args.no_progress and rank == 0
    try:
        data = load_train_data(
            args.data, subsets=args.subsets, image_root=args.image_dir, num_sample_per_subset=args.max_rows
        )
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"--data {args.data}: {err}") from None
    encode, fingerprint, check = load_encoder(args, data, device)
    for name, rows in data.subsets.items():
        try:
            check(input_kinds(rows), f"subset {name!r}")
        except ValueError as err:
            raise DataError(f"--model {args.model}: {err}") from None
        check_negatives_writable(name, list(dict.fromkeys(pos_key(ex) for ex in rows)))
    cache_root = None if args.no_cache else Path(args.cache_dir or f"{Path(args.out).expanduser()}.cache")
    embedded = {}
    with torch.no_grad():
        for name, rows in data.subsets.items():
            embedded[name] = embed_subset(
                name, rows, data, encode, fingerprint, cache_root, args.batch_size, show
            )
    if rank != 0:
        return 0
    try:
        return mine_and_write(args, settings, data, embedded, device, show)
    except DataError as err:  # rank 0's own (--strict, --out): the others wait in distributed.finish()
        return _fail(err)


def mine_and_write(
    args: argparse.Namespace, settings: MineSettings, data: TrainData,
    embedded: dict[str, tuple[Inputs, list[ItemKey], torch.Tensor]], device: str, show: bool,
) -> int:  # fmt: skip
    """Rank 0, once every input is embedded: the negatives per subset, the filters' report, the files."""
    results = mine_all(data, embedded, settings, args.pool, device, args.query_block, args.pool_block, show)  # type: ignore[arg-type]
    k = settings.num_negatives
    short = {n: sum(len(x) < k for x in m.negatives) for n, (m, _) in results.items()}
    if any(short.values()):
        counts = ", ".join(f"{n}: {c} of {len(data.subsets[n])}" for n, c in short.items() if c)
        message = f"rows with fewer than K={k} negatives after the filters ({counts})"
        if args.strict:
            raise DataError(f"{message}; nothing written (--strict)")
        print(f"{PROG}: warning: {message}; they train on the ones they have (--missing_negatives mask)",
              file=sys.stderr, flush=True)  # fmt: skip
    subsets = {
        n: subset_entry(len(data.subsets[n]), len(items), k, m.pos_scores, m.neg_scores, m.removed)
        for n, (m, items) in results.items()
    }
    report = {
        "model": args.model, "encoder": args.encoder, "data": str(args.data),
        "settings": {**asdict(settings), "pool": args.pool}, "subsets": subsets,
    }  # fmt: skip
    files = {n: mined_rows(data.subsets[n], m, items, data.image_root) for n, (m, items) in results.items()}
    write_output(Path(args.out), args.overwrite, files, report)
    print((Path(args.out) / "mining_report.md").read_text())
    return 0


def _fail(err: object) -> int:
    if distributed.rank() == 0:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = preflight(args)
    except DataError as err:
        return _fail(err)
    if threading.current_thread() is threading.main_thread():  # SIGTERM -> SystemExit: the cache is flushed
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _, _, local_rank = distributed.init_distributed()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        code = run(args, settings, device)
        distributed.finish()  # together: rank 0 mines and writes after the others' last embedding
        return code
    except (DataError, MediaError) as err:
        return _fail(err)
    finally:
        distributed.shutdown()  # after an error, at once: it may be this rank's alone (an image in its shard)


if __name__ == "__main__":
    raise SystemExit(main())
