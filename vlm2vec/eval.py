"""`python -m vlm2vec.eval --model DIR_OR_ID --data DIR_OR_NAME --out DIR [--benchmark mmeb-v2]`: the
command line of the two evaluations, MMEB (eval_v1.py) and MMEB-V2 (eval_v2.py).

Bad input (a missing model or data folder, unknown task names) is refused in one line (exit status 2)
before the model loads. Then the model loads on every process a launcher started (torchrun /
deepspeed: gloo on CPU, nccl on GPUs), the chosen evaluation runs on all of them (each embeds a shard,
rank 0 scores), and rank 0 prints the report it wrote to --out (scores.json, table.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from vlm2vec import distributed
from vlm2vec.embedding import encoder_of, model_fingerprint
from vlm2vec.errors import DataError
from vlm2vec.eval_v1 import HUB_EVAL_NAME, dataset_names, evaluate, render_report
from vlm2vec.eval_v2 import evaluate_v2, render_v2_report
from vlm2vec.media import MediaError
from vlm2vec.mmeb_v2 import available_tasks
from vlm2vec.scoring import check_dims, parse_dims

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
    p.add_argument(
        "--eval_dims",
        "--eval-dims",
        default=None,
        metavar="N,N,...",
        help="also score these embedding prefixes, e.g. 64,256 (Matryoshka: the first d numbers of each "
        "embedding, re-normalised when the model normalises its embeddings; increasing, each <= the "
        "embedding size): scores.json gains dims/<d> (the full embedding's results stay where they are), "
        "table.md a column per size. Embedded once: the cache holds full embeddings. Default: the "
        "model's own matryoshka_dims (recorded in its vlm2vec.json by a Matryoshka training run), else "
        "none; --eval_dims '' scores only the full embedding",
    )
    p.add_argument("--label", default=None, help="row label in table.md (default: the --model value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`: what a hub repo id can be (a path that does not exist is not one)."""
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name


def preflight(args: argparse.Namespace, tasks: Sequence[str] | None, datasets: Sequence[str] | None) -> None:
    """Bad input refused before the model loads: a model path that does not exist, a data folder
    without task data, unknown task names. Raises DataError (one line)."""
    model = os.path.expanduser(args.model)
    if not os.path.exists(model) and not _looks_like_hub_id(args.model):
        raise DataError(f"--model {args.model}: no such model directory")
    marks = ("config.json", "vlm2vec.json", "adapter_config.json")  # a base model, ours, a LoRA adapter
    if os.path.isdir(model) and not any(os.path.isfile(os.path.join(model, m)) for m in marks):
        raise DataError(f"--model {args.model}: not a model directory (no {', '.join(marks)})")
    try:
        if args.benchmark == "mmeb-v2":
            available_tasks(args.data, tasks)
        else:
            dataset_names(args.data, datasets)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"--data {args.data}: {err}") from err


def eval_dims(args: argparse.Namespace) -> tuple[list[int] | None, str]:
    """The prefixes to score and where they come from: --eval_dims, else the matryoshka_dims that the
    model directory's vlm2vec.json records, else none. ValueError (one line) for bad sizes."""
    if args.eval_dims is not None:
        return (parse_dims(args.eval_dims) if args.eval_dims.strip() else None), "--eval_dims"
    meta = Path(os.path.expanduser(args.model)) / "vlm2vec.json"
    recorded = json.loads(meta.read_text(encoding="utf-8")).get("matryoshka_dims") if meta.is_file() else None
    if not recorded:
        return None, "--eval_dims"
    what = f"{meta} matryoshka_dims"
    if not isinstance(recorded, list) or not all(type(d) is int for d in recorded):
        raise ValueError(f"{what}: expected a list of integers, got {recorded!r}")
    return check_dims(recorded, None, what), what


def _fail(err: object, rank: int = 0, world_size: int = 1, every_rank: bool = False) -> int:
    """One line on stderr, exit status 2: how the trainer reports bad input. every_rank: the error may
    be one rank's own (its shard of the inputs), so each rank says it, tagged."""
    if every_rank and world_size > 1:
        print(f"python -m vlm2vec.eval: error (rank {rank}): {err}", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"python -m vlm2vec.eval: error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()] or datasets
    try:
        dims, dims_from = eval_dims(args)
        preflight(args, tasks, datasets)
    except ValueError as err:  # DataError included
        return _fail(err, int(os.environ.get("RANK", "0")))
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a launcher stopping its ranks, a scheduler) -> SystemExit, so finished work is flushed
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rank, world_size, local_rank = distributed.init_distributed()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    from huggingface_hub.errors import HFValidationError

    from vlm2vec.model import VLM2Vec

    options = {
        "dtype": args.dtype,
        "pooling": args.pooling,
        "max_len": args.max_len,
        "resolution": args.resolution,
        "prompt_layout": args.prompt_layout,
    }
    try:
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
    except (OSError, HFValidationError) as err:  # not a model directory, or a hub id that cannot load
        distributed.shutdown()
        return _fail(f"--model {args.model}: cannot load the model: {err}".splitlines()[0], rank)
    model.eval()
    if dims:
        try:
            check_dims(dims, model.embedding_dim, dims_from)
        except AttributeError:  # a backbone that does not say: the first embedded dataset tells
            pass
        except ValueError as err:
            distributed.shutdown()
            return _fail(err, rank)
        if dims_from != "--eval_dims" and rank == 0:
            print(f"scoring the prefixes {','.join(map(str, dims))} ({dims_from}; --eval_dims '' for none)",
                  file=sys.stderr)  # fmt: skip
    # the settings the model runs with (recorded, a released checkpoint's, or overridden) key the cache
    options["settings"] = model.settings.to_dict()
    try:
        if args.benchmark == "mmeb-v2":
            scores = evaluate_v2(
                encoder_of(model, args.batch_size), args.data, tasks, out_dir=args.out,
                cache_dir=args.cache_dir, use_cache=not args.no_cache,
                fingerprint=model_fingerprint(args.model, options), batch_size=args.batch_size,
                max_rows=args.max_rows, label=args.label or args.model, show_progress=not args.no_progress,
                check_inputs=model.family.check_inputs, dims=dims, normalize=model.normalize,
            )  # fmt: skip
            if scores is not None:
                print(render_v2_report(scores))
            distributed.finish()
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
            dims=dims,
            normalize=model.normalize,
        )
        distributed.finish()  # together: rank 0 scores and writes after the others' last embedding
    except (DataError, MediaError, FileNotFoundError) as err:
        return _fail(err, rank, world_size, every_rank=True)
    finally:
        distributed.shutdown()  # after an error, at once: a peer may be inside a collective
    if scores is not None:
        print(render_report(scores))
        print(f"wrote {Path(args.out) / 'scores.json'} and {Path(args.out) / 'table.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
