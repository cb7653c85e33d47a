"""The fixed tables of MMEB: the 36 evaluation datasets (meta-task, in/out-of-distribution) and the
20 training subsets. Kept apart from the readers so eval code and reports can import them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<|image_1|>"  # how stored MMEB rows mark the image; each backbone replaces it
META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")


@dataclass(frozen=True)
class EvalDatasetInfo:
    """One MMEB-eval dataset: its name as on the hub (file stem locally), meta-task, and whether it is
    out-of-distribution (no training subset of the same source in MMEB-train)."""

    name: str
    meta_task: str
    ood: bool

    @property
    def split(self) -> str:
        return "OOD" if self.ood else "IND"


def _table(meta_task: str, ind: tuple[str, ...], ood: tuple[str, ...]) -> tuple[EvalDatasetInfo, ...]:
    return tuple(EvalDatasetInfo(n, meta_task, False) for n in ind) + tuple(
        EvalDatasetInfo(n, meta_task, True) for n in ood
    )


MMEB_EVAL_DATASETS: tuple[EvalDatasetInfo, ...] = (
    _table(
        "Classification",
        ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"),
        ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"),
    )
    + _table(
        "VQA",
        ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"),
        ("ScienceQA", "VizWiz", "GQA", "TextVQA"),
    )
    + _table(
        "Retrieval",
        (
            "VisDial",
            "CIRR",
            "VisualNews_t2i",
            "VisualNews_i2t",
            "MSCOCO_t2i",
            "MSCOCO_i2t",
            "NIGHTS",
            "WebQA",
        ),
        ("OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"),
    )
    + _table("Grounding", ("MSCOCO",), ("Visual7W-Pointing", "RefCOCO", "RefCOCO-Matching"))
)

EVAL_DATASET_INFO: dict[str, EvalDatasetInfo] = {d.name: d for d in MMEB_EVAL_DATASETS}

# Subset names of TIGER-Lab/MMEB-train (note `ImageNet_1K` with an underscore, unlike the eval name).
MMEB_TRAIN_SUBSETS: tuple[str, ...] = (
    "ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
    "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
    "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
    "MSCOCO",
)  # fmt: skip


def eval_datasets(meta_task: str | None = None, ood: bool | None = None) -> list[EvalDatasetInfo]:
    """The MMEB-eval datasets in table order, optionally only one meta-task and/or IND (ood=False) / OOD."""
    if meta_task is not None and meta_task not in META_TASKS:
        raise ValueError(f"meta_task must be one of {META_TASKS}, got {meta_task!r}")
    return [
        d
        for d in MMEB_EVAL_DATASETS
        if (meta_task is None or d.meta_task == meta_task) and (ood is None or d.ood == ood)
    ]


def eval_dataset_info(name: str) -> EvalDatasetInfo:
    """Table entry of one MMEB-eval dataset by name; a clear error for unknown names."""
    try:
        return EVAL_DATASET_INFO[name]
    except KeyError:
        raise ValueError(f"unknown MMEB-eval dataset {name!r}; known: {sorted(EVAL_DATASET_INFO)}") from None
