"""MMEB data: train/eval row readers, a step-indexed batch sampler, and the per-chunk collator.

Path of one training batch::

    load_train_data(dir)          -> TrainData: validated TrainExample rows per subset (caps applied)
    TrainBatches(data, B)[step]   -> ContrastiveBatch: rows chosen by (seed, step) only, images loaded
    ChunkCollator(model, ...)(b)  -> PreparedBatch: model.prepare per GradCache chunk (own padding)

Batch n is a pure function of (seed, n, the data), so a checkpoint only needs the step number
(`TrainBatches.state_dict()`), and DataLoader workers may build batches in any order
(`DataLoader(batches, batch_size=None, sampler=range(start, stop), collate_fn=collator)`).

Hard negatives: `neg_text` / `neg_image_path` may each hold one item or a list ("", None, [] = none).
With `num_negatives=K` a row with more keeps K (drawn per step); a row with fewer trains on the ones it
has (`missing_negatives="mask"`, the default: its candidate group is shorter, `ContrastiveBatch.cand_counts`,
and targets point at each group's positive; nothing is padded or duplicated), is a bad row at read time
("error"), or is filled at batch time with positives of other rows of the same subset ("sample", never
one equal to its own positive).

Bad input (unreadable file or image, missing column, empty query, placeholder/image mismatch, too few
hard negatives, image tokens cut by max_len) raises `DataError` naming the file and row; with
`skip_bad_rows=True` the row is skipped and counted in a `BadRows` (warned, never silent).

Modules, each importing only the ones above it (and, below them all, `vlm2vec.errors` for DataError and
`vlm2vec.media` for load_image / load_visual / load_frames, the readers of a row's images and videos)::

    errors      DataError, BadRows
    tables      records of .jsonl/.parquet/.arrow files and hub datasets, subsets of a train directory
    rows        one row -> checked TrainExample / EvalExample; collect_rows (the bad-row policy)
    train_sets  TrainData, load_train_data, read_train_file, load_train_mix (layout of a train directory)
    sampler     StepSampler: which rows make batch n
    batches     ContrastiveBatch, TrainBatches: batch n with its images and frames loaded
    collator    PreparedBatch, ChunkCollator: a batch -> model inputs per GradCache chunk
    eval_sets   EvalSet, load_eval_dataset, find_eval_source (layout of an eval directory)

`from vlm2vec.data import X` works for every public name of these modules listed in `__all__`.
"""

from vlm2vec.data.batches import ContrastiveBatch, TrainBatches
from vlm2vec.data.collator import ChunkCollator, PreparedBatch, estimate_length
from vlm2vec.data.errors import BadRows, DataError
from vlm2vec.data.eval_sets import EvalSet, find_eval_source, load_eval_dataset
from vlm2vec.data.rows import (
    EVAL_COLUMNS,
    TRAIN_COLUMNS,
    VIDEO_PLACEHOLDER,
    EvalExample,
    TrainExample,
    replace_image_token,
)
from vlm2vec.data.sampler import StepSampler
from vlm2vec.data.tables import TABLE_SUFFIXES
from vlm2vec.data.train_sets import TrainData, load_train_data, load_train_mix, parse_sources, read_train_file
from vlm2vec.mmeb_tables import IMAGE_PLACEHOLDER

__all__ = [
    "IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER", "TRAIN_COLUMNS", "EVAL_COLUMNS", "TABLE_SUFFIXES",
    "DataError", "BadRows", "TrainExample", "TrainData", "load_train_data", "read_train_file",
    "load_train_mix", "parse_sources", "StepSampler", "ContrastiveBatch", "TrainBatches", "ChunkCollator",
    "PreparedBatch", "EvalExample", "EvalSet", "load_eval_dataset", "find_eval_source",
    "replace_image_token", "estimate_length",
]  # fmt: skip
