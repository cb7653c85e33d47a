"""MMEB-V2 image tasks (36) as the reference reads them: rows from `ziyjiang/MMEB_Test_Instruct` (config
= task name, split test; columns qry_inst, qry_text, qry_img_path, tgt_inst, tgt_text, tgt_img_path),
images under `image-tasks/` (the yaml's image_root). Texts are built character for character as the
reference's five image parsers build them (VLM2Vec src/data/eval_dataset/image_{cls,qa,i2t,t2i,i2i_vg}
_dataset.py / _eval.py, with src/model/processor.py:process_input_text), the backbone's image token
written as IMAGE_PLACEHOLDER (each backbone family swaps in its own token).
"""

from __future__ import annotations

from pathlib import Path

from vlm2vec.data.errors import DataError
from vlm2vec.mmeb_tables import IMAGE_PLACEHOLDER as IMG
from vlm2vec.mmeb_v2_files import get, task_records
from vlm2vec.mmeb_v2_rows import CandidatePool, V2Row, V2Task, Visual

# experiments/public/eval/image.yaml: dataset_parser per task
IMAGE_PARSERS: dict[str, str] = {
    **dict.fromkeys(
        ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
         "ImageNet-R", "ObjectNet", "Country211"), "image_cls"),
    **dict.fromkeys(
        ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz",
         "GQA", "TextVQA"), "image_qa"),
    **dict.fromkeys(("MSCOCO_i2t", "VisualNews_i2t"), "image_i2t"),
    **dict.fromkeys(
        ("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"), "image_t2i"),
    **dict.fromkeys(
        ("CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO", "RefCOCO-Matching",
         "Visual7W-Pointing"), "image_i2i_vg"),
}  # fmt: skip


def process_input_text(instruction: str, text: str | None = None, *, image: bool = False) -> str:
    """src/model/processor.py:process_input_text for the VLM backbones: instruction [+ " " + text],
    prefixed by the image token and a space when the input has an image."""
    prompt = instruction
    if text:
        prompt = prompt + " " + text
    if image:
        prompt = IMG + " " + prompt
    return prompt


def _query(parser: str, task: str, inst: str, text: str) -> str:
    if parser == "image_t2i":  # no query image; the instruction keeps its own token, if any
        return inst + " " + text + "\n" + ("\n" if task == "VisDial" else "")
    inst = inst.replace(IMG, "")
    if parser in ("image_qa", "image_i2i_vg"):
        inst = "\n" + inst.strip()
    return process_input_text(inst, text, image=True).replace(" \n", "\n") + "\n"


def _image_targets(parser: str, inst: str, captions: list[str]) -> list[str]:
    """t2i / i2i_vg candidate texts: instruction + caption per candidate when captions are given (WebQA,
    EDIS, RefCOCO-Matching), else the instruction alone (t2i adds a newline, i2i_vg does not)."""
    inst = inst.replace(IMG, "")
    if captions[0].strip():
        return [
            process_input_text(inst + " " + c, "", image=True).replace(" \n", "\n") + "\n" for c in captions
        ]
    single = process_input_text(inst, "", image=True).replace(" \n", "\n")
    return [single + ("\n" if parser == "image_t2i" else "")] * len(captions)


def _image(root: Path, task: V2Task, rel: str, where: str) -> Visual:
    path = root / (task.image_root or "") / rel
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    return Visual("images", (str(path),))


def _strings(value: object, column: str, where: str) -> list[str]:
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"{where}: column {column!r} must be a non-empty list, got {value!r}")
    return [str(v) for v in value]


def read_image_task(root: Path, task: V2Task, pool: CandidatePool) -> list[V2Row]:
    parser = IMAGE_PARSERS[task.name]
    rows = []
    for where, rec in task_records(root / task.data, task.name, task.config, task.split):
        inst, text = str(get(rec, "qry_inst", where)), str(get(rec, "qry_text", where) or "")
        tgt_texts = _strings(get(rec, "tgt_text", where), "tgt_text", where)
        query = _query(parser, task.name, inst, text)
        visual = None
        if parser != "image_t2i":
            visual = _image(root, task, str(get(rec, "qry_img_path", where)), where)
        if parser in ("image_cls", "image_qa", "image_i2t"):
            names = [pool.add(t, t, None) for t in tgt_texts]
        else:
            paths = _strings(get(rec, "tgt_img_path", where), "tgt_img_path", where)
            if len(paths) != len(tgt_texts):
                raise DataError(f"{where}: {len(paths)} tgt_img_path but {len(tgt_texts)} tgt_text")
            texts = _image_targets(parser, str(get(rec, "tgt_inst", where)), tgt_texts)
            if parser == "image_t2i":
                keys = paths
            else:  # path + caption: one image can hold several targets (RefCOCO-Matching)
                keys = [p + ":" + c.strip('"') for p, c in zip(paths, tgt_texts)]
            names = []
            for key, t, p in zip(keys, texts, paths):
                old = pool.items.get(key)  # the reference embeds a name once: check its image once
                known = old is not None and old[1] == Visual(
                    "images", (str(root / (task.image_root or "") / p),)
                )
                names.append(pool.add(key, t, old[1] if known else _image(root, task, p, where)))
        rows.append(V2Row(query, visual, names, [names[0]], where=where))
    return rows
