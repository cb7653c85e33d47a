"""MMEB-V2 readers against the reference's construction: for each task kind a tiny copy in the form the
reference loads (hub parquet per config / split, save_to_disk, BEIR configs, frame folders), read by our
reader, and the queries / candidates / labels the reference builds, written out by hand from its code
(VLM2Vec src/data/eval_dataset/*.py; the image token is `<|image_1|>`, the video token `<|video_1|>`)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from PIL import Image

from vlm2vec.data import DataError
from vlm2vec.media import write_frames, write_video
from vlm2vec.mmeb_v2 import available_tasks, get_task, load_task, missing_tasks
from vlm2vec.mmeb_v2_video import MVBENCH_VIDEOS, QA_PROMPT
from vlm2vec.synthetic import moving_shape, write_rows

QA = "<|video_1|> " + QA_PROMPT + " "  # "...Question: " + " " + question, as process_query writes it
PARQUET = "test-00000-of-00001.parquet"


def _image(root: Path, rel: str) -> None:
    (root / "image-tasks" / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "image-tasks" / rel)


def _instruct(root: Path, task: str, rows: list[dict], form: str = "hub") -> None:
    """MMEB_Test_Instruct rows of one config in one of the forms the data can sit on disk."""
    for r in rows:
        for p in [r["qry_img_path"], *r["tgt_img_path"]]:
            if p:
                _image(root, p)
    base = root / "image-tasks" / "MMEB_Test_Instruct"
    if form == "hub":
        write_rows(base / task / PARQUET, rows)
    elif form == "parquet":
        write_rows(base / f"{task}.parquet", rows)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"test": ds}) if form == "dict" else ds).save_to_disk(str(base / task))


def _row(qi: str, qt: str, qp: str, ti: str, tt: list[str], tp: list[str]) -> dict:
    return dict(qry_inst=qi, qry_text=qt, qry_img_path=qp, tgt_inst=ti, tgt_text=tt, tgt_img_path=tp)


CLS_ROW = _row("<|image_1|>\nRepresent the given image for classification", "", "cls/0.jpg", "",
               ["tench", "goldfish"], ["", ""])  # fmt: skip


@pytest.mark.parametrize("form", ["hub", "parquet", "save_to_disk", "dict"])
def test_image_cls_reads_the_instruct_rows_in_each_on_disk_form(tmp_path, form) -> None:
    _instruct(tmp_path, "ImageNet-1K", [CLS_ROW], form)
    s = load_task(tmp_path, "ImageNet-1K")
    row = s.rows[0]
    # image_cls_dataset.py: "<|image_1|> " + "\nRepresent..." -> " \n" replaced by "\n", then "\n"
    assert row.query_text == "<|image_1|>\nRepresent the given image for classification\n"
    assert row.query_visual.paths == (str(tmp_path / "image-tasks/cls/0.jpg"),)
    assert row.cand_names == ["tench", "goldfish"] and row.labels == ["tench"]
    assert s.pool == {"tench": ("tench", None), "goldfish": ("goldfish", None)}


def test_image_tasks_build_queries_and_candidates_as_each_reference_parser(tmp_path) -> None:
    _instruct(tmp_path, "OK-VQA", [_row("<|image_1|> Represent the given image with the following question:",
                                        "What is it?", "vqa/0.jpg", "", ["a dog", "a cat"],
                                        ["", ""])])  # fmt: skip
    _instruct(tmp_path, "MSCOCO_i2t", [_row("<|image_1|> Find an image caption describing the given image.",
                                            "", "coco/0.jpg", "", ["two dogs", "a cat"],
                                            ["", ""])])  # fmt: skip
    _instruct(tmp_path, "VisDial", [_row("Represent the given dialogue about an image:", "Q: red? A: yes",
                                         "", "<|image_1|> Represent the given image.", ["", ""],
                                         ["vd/0.jpg", "vd/1.jpg"])])  # fmt: skip
    web = "<|image_1|> Represent the given Wikipedia image with related text information:"
    _instruct(tmp_path, "WebQA", [
        _row("Find a Wikipedia image that answers this question:", "Who?", "", web, ["cap a", "cap b"],
             ["wq/0.jpg", "wq/1.jpg"]),
        _row("Find a Wikipedia image that answers this question:", "When?", "", web, ["cap c", "cap b"],
             ["wq/0.jpg", "wq/1.jpg"]),
    ])  # fmt: skip
    _instruct(tmp_path, "CIRR", [_row("<|image_1|> Given an image, find a similar image with the changes:",
                                      "make it red", "cirr/q.jpg", "<|image_1|> Represent the given image.",
                                      ["", ""], ["cirr/0.jpg", "cirr/1.jpg"])])  # fmt: skip
    sel = "<|image_1|> Select the portion of the image that follows the language expressions:"
    _instruct(tmp_path, "RefCOCO-Matching", [_row("<|image_1|> Select the portion of the image that isolates "
                                                  "the object:", "", "ref/q.jpg", sel,
                                                  ['"the red one"', '"the blue one"'],
                                                  ["ref/0.jpg", "ref/0.jpg"])])  # fmt: skip
    vqa = load_task(tmp_path, "OK-VQA").rows[0]  # image_qa: "\n" + stripped instruction
    assert (
        vqa.query_text == "<|image_1|>\nRepresent the given image with the following question: What is it?\n"
    )
    assert vqa.cand_names == ["a dog", "a cat"]
    i2t = load_task(tmp_path, "MSCOCO_i2t").rows[0]  # the token's removal leaves the instruction's space
    assert i2t.query_text == "<|image_1|>  Find an image caption describing the given image.\n"
    visdial = load_task(tmp_path, "VisDial")
    assert visdial.rows[0].query_text == "Represent the given dialogue about an image: Q: red? A: yes\n\n"
    assert visdial.rows[0].query_visual is None and visdial.rows[0].cand_names == ["vd/0.jpg", "vd/1.jpg"]
    assert visdial.pool["vd/1.jpg"][0] == "<|image_1|>  Represent the given image.\n"
    webqa = load_task(tmp_path, "WebQA")
    assert webqa.rows[0].query_text == "Find a Wikipedia image that answers this question: Who?\n"
    assert webqa.pool["wq/0.jpg"][0] == f"<|image_1|>  {web[12:]} cap a\n"
    # the second row names wq/0.jpg with another caption: the reference keeps the first embedding
    assert webqa.rows[1].cand_names == ["wq/0.jpg", "wq/1.jpg"] and webqa.name_collisions == 1
    cirr = load_task(tmp_path, "CIRR")
    assert (
        cirr.rows[0].query_text
        == "<|image_1|>\nGiven an image, find a similar image with the changes: make it red\n"
    )
    assert cirr.rows[0].cand_names == ["cirr/0.jpg:", "cirr/1.jpg:"]
    assert cirr.pool["cirr/0.jpg:"][0] == "<|image_1|>  Represent the given image."  # i2i_vg: no "\n"
    ref = load_task(tmp_path, "RefCOCO-Matching")
    assert ref.rows[0].cand_names == ["ref/0.jpg:the red one", "ref/0.jpg:the blue one"]
    assert ref.pool["ref/0.jpg:the blue one"][0] == f'<|image_1|>  {sel[12:]} "the blue one"\n'
    assert ref.pool["ref/0.jpg:the blue one"][1].paths == (str(tmp_path / "image-tasks/ref/0.jpg"),)


def test_image_task_in_the_v1_layout_is_an_error_naming_task_and_folder(tmp_path) -> None:
    write_rows(tmp_path / "image-tasks" / "ImageNet-1K.jsonl", [dict(qry_text="x", qry_img_path="a.jpg")])
    with pytest.raises(
        DataError, match=r"ImageNet-1K: data folder not found: .*image-tasks/MMEB_Test_Instruct"
    ):
        load_task(tmp_path, "ImageNet-1K")
    _instruct(tmp_path, "ImageNet-1K", [{**CLS_ROW, "qry_img_path": "cls/missing.jpg"}])
    (tmp_path / "image-tasks/cls/missing.jpg").unlink()
    with pytest.raises(
        DataError, match=r"test-00000-of-00001.parquet, row 0: image not found: .*missing.jpg"
    ):
        load_task(tmp_path, "ImageNet-1K")


def _clip(n: int = 4) -> list[Image.Image]:
    return moving_shape("red", "circle", n, 28, random.Random(n))


def test_mvbench_reads_its_20_configs_and_adds_the_subset(tmp_path) -> None:
    task = get_task("MVBench")
    for k, subset in enumerate(MVBENCH_VIDEOS):  # hub layout: <config>/train-*.parquet, no subset column
        write_rows(tmp_path / task.data / subset / "train-00000-of-00001.parquet", [
            dict(video=f"v{k}.mp4", question=f"Q{k}?", candidates=["left", "right"],
                 answer="right")])  # fmt: skip
        write_frames(tmp_path / task.frame_root / subset / f"v{k}.mp4", _clip(2))
    s = load_task(tmp_path, "MVBench")
    assert len(s.rows) == 20 and s.rows[0].where.endswith("row 0")
    row = s.rows[1]  # action_sequence, after episodic_reasoning
    assert row.query_text == QA + "Q1?\nOptions:\n(A) left\n(B) right"
    assert row.cand_names == ["(A) left", "(B) right"] and row.labels == ["(B) right"]
    assert row.query_visual.paths == (str(tmp_path / task.frame_root / "action_sequence" / "v1.mp4"),)
    # no extracted frames: the video under the subset's folder, extracted as the reference's cv2 loop
    import shutil

    shutil.rmtree(tmp_path / task.frame_root / "action_sequence")
    write_video(tmp_path / task.video_root / "star/Charades_v1_480/v1.mp4", _clip(4))
    v = load_task(tmp_path, "MVBench").rows[1].query_visual
    assert (
        v.paths == (str(tmp_path / task.video_root / "star/Charades_v1_480/v1.mp4"),) and v.extractor == "cv2"
    )
    shutil.rmtree(tmp_path / task.data / "state_change")
    with pytest.raises(DataError, match=r"MVBench \(state_change\): no files of config 'state_change'"):
        load_task(tmp_path, "MVBench")


def test_egoschema_joins_the_options_as_given_and_strips_their_letters(tmp_path) -> None:
    task = get_task("EgoSchema")
    options = ["A. the man cooks", "B. the man reads", "C. nothing", "D. he runs", "E. he sleeps"]
    write_rows(tmp_path / task.data / "Subset" / PARQUET, [
        dict(video_idx="e1", question="What does C do?", answer="1", question_idx="q",
             option=options)])  # fmt: skip
    write_frames(tmp_path / task.frame_root / "e1", _clip())
    row = load_task(tmp_path, "EgoSchema").rows[0]
    # egoschema_dataset.py: process_query(query + ' '.join(options)); no separator before the first option
    assert (
        row.query_text
        == QA + "What does C do?A. the man cooks B. the man reads C. nothing D. he runs E. he sleeps"
    )
    assert row.cand_names == options and row.labels == ["B. the man reads"]
    s = load_task(tmp_path, "EgoSchema")
    assert [s.pool[n][0] for n in options] == [
        "the man cooks",
        "the man reads",
        "nothing",
        "he runs",
        "he sleeps",
    ]


def test_nextqa_ranks_the_raw_options_and_reads_only_config_mc(tmp_path) -> None:
    task = get_task("NExTQA")
    row = dict(video="123", question="what is moving", answer=1, qid=0, type="CW",
               a0="a cat", a1="a red ball", a2="a car", a3="a dog", a4="nothing")  # fmt: skip
    write_rows(tmp_path / task.data / "OE" / PARQUET, [dict(row, question="open-ended")])
    with pytest.raises(DataError, match=r"NExTQA: no files of config 'MC'"):
        load_task(tmp_path, "NExTQA")  # no fallback to the other config's files
    write_rows(tmp_path / task.data / "MC" / PARQUET, [row])
    write_frames(tmp_path / task.frame_root / "123", _clip())
    r = load_task(tmp_path, "NExTQA").rows[0]
    options = "(A) a cat\n(B) a red ball\n(C) a car\n(D) a dog\n(E) nothing"
    assert r.query_text == QA + f"what is moving\nOptions:\n{options}"
    assert r.cand_names == ["a cat", "a red ball", "a car", "a dog", "nothing"] and r.labels == ["a red ball"]


def test_msrvtt_reads_config_test_1k_and_refuses_other_files(tmp_path) -> None:
    task = get_task("MSR-VTT")
    rows = [dict(video_id="video7", video="all/video7.mp4", caption="a dog runs")]
    write_rows(tmp_path / task.data / "test_7k" / PARQUET, rows)
    with pytest.raises(DataError, match=r"MSR-VTT: no files of config 'test_1k'"):
        load_task(tmp_path, "MSR-VTT")
    write_rows(tmp_path / task.data / "test_1k" / "train-00000-of-00001.parquet", rows)
    with pytest.raises(DataError, match=r"no 'test' split .*name only \['train'\]"):
        load_task(tmp_path, "MSR-VTT")
    write_rows(tmp_path / task.data / "test_1k" / PARQUET, rows)
    write_video(tmp_path / task.video_root / "all/video7.mp4", _clip())  # msrvtt: video_root + `video`
    s = load_task(tmp_path, "MSR-VTT")
    assert s.rows[0].query_text == "Find a video that contains the following visual content: a dog runs"
    assert s.pool["video7"] == (
        "<|video_1|> Understand the content of the provided video.",
        s.pool["video7"][1],
    )
    assert s.pool["video7"][1].paths == (str(tmp_path / task.video_root / "all/video7.mp4"),)
    assert s.pool["video7"][1].extractor == "ffmpeg"


@pytest.mark.parametrize("name,n_labels", [("HMDB51", 51), ("UCF101", 101), ("K700", 700), ("Breakfast", 10)])
def test_video_classification_ranks_against_the_full_label_list(tmp_path, name, n_labels) -> None:
    from vlm2vec.mmeb_v2_labels import VIDEO_CLS_LABELS

    task = get_task(name)
    labels = VIDEO_CLS_LABELS[task.hub.split("/")[1]]
    write_rows(tmp_path / task.data / "test.jsonl", [dict(video_id="x", pos_text=labels[3])])
    write_frames(tmp_path / task.frame_root / "x", _clip())
    s = load_task(tmp_path, name)
    assert len(s.pool) == n_labels
    assert list(s.pool)[0] == labels[3]  # generate_cand_dataset: the rows' labels first, then the list
    assert s.rows[0].query_text == f"<|video_1|> {task.instruction}"


def test_table_names_match_the_reference(tmp_path) -> None:
    assert (
        get_task("K700").hub == "VLM2Vec/Kinetics-700" and get_task("K700").data == "video-tasks/Kinetics-700"
    )
    with pytest.raises(ValueError, match="the reference names it K700"):
        get_task("Kinetics-700")
    assert get_task("SmthSmthV2").max_rows == 1000  # video.yaml num_sample_per_subset
    assert (
        get_task("ViDoRe_biomedical_lectures_v2_multilingual").data == "visdoc-tasks/biomedical_lectures_v2"
    )
    assert get_task("ViDoSeek-page").data == "visdoc-tasks/ViDoSeek-page-fixed"
    assert get_task("MMLongBench-page").data == "visdoc-tasks/MMLongBench-page-fixed"


def test_smthsmthv2_reads_the_first_num_sample_per_subset_rows(tmp_path) -> None:
    task = dataclasses.replace(get_task("SmthSmthV2"), max_rows=2)
    cands = ["Holding something", "Folding something"]
    rows = [dict(video_id=str(k), pos_text="Holding something", neg_text=cands)
            for k in range(3)]  # fmt: skip
    write_rows(tmp_path / task.data / "test.jsonl", rows)
    for k in range(3):
        write_frames(tmp_path / task.frame_root / str(k), _clip(2))
    s = load_task(tmp_path, task)
    assert len(s.rows) == 2 and s.rows[0].cand_names == ["Holding something", "Folding something"]


def _beir(
    folder: Path, queries: list[dict], qrels: list[dict], pages: list[str], split: str = "test"
) -> None:
    import io

    corpus = []
    for cid in pages:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (len(cid) * 9, 0, 0)).save(buf, "PNG")
        corpus.append({"corpus-id": cid, "image": {"bytes": buf.getvalue(), "path": None}})
    for config, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        write_rows(folder / config / f"{split}-00000-of-00001.parquet", rows)


def test_beir_pool_order_graded_labels_and_the_fixed_page_sets(tmp_path) -> None:
    task = get_task("ViDoSeek-page")
    _beir(tmp_path / "visdoc-tasks/ViDoSeek-page", [{"query-id": "q", "query": "x"}],
          [{"query-id": "q", "corpus-id": "p1", "score": 1}], ["p0", "p1"])  # fmt: skip
    with pytest.raises(DataError, match="before the reference's fix of 2025-11-03.*ViDoSeek-page-fixed"):
        load_task(tmp_path, "ViDoSeek-page")
    qrels = [("q1", "p2", 1), ("q1", "p0", 2), ("q2", "p1", 0), ("q2", "p3", 1)]
    queries = [{"query-id": "q1", "query": "revenue?"}, {"query-id": "q2", "query": "cost?"}]
    qrel_rows = [{"query-id": q, "corpus-id": c, "score": n} for q, c, n in qrels]
    _beir(tmp_path / task.data, queries, qrel_rows, ["p0", "p1", "p2", "p3"])
    s = load_task(tmp_path, "ViDoSeek-page")
    assert s.rows[0].query_text == "Find a document image that matches the given query: revenue?"
    assert s.rows[0].labels == ["p2", "p0"] and s.rows[0].rel_scores == [1.0, 2.0]
    assert s.rows[1].labels == ["p3"]  # score 0 is not relevant
    assert list(s.pool) == ["p2", "p0", "p3", "p1"]  # the queries' pages first, then the corpus
    assert s.pool["p0"][0] == "<|image_1|> Understand the content of the provided document image."
    write_rows(tmp_path / task.data / "queries" / PARQUET, [{"query-id": "q9", "query": "none"}])
    with pytest.raises(DataError, match="query-id 'q9' has no qrels"):
        load_task(tmp_path, "ViDoSeek-page")


def test_vidore_v2_folders_are_the_hub_repos_and_missing_tasks_are_listed(tmp_path) -> None:
    _beir(tmp_path / "visdoc-tasks/biomedical_lectures_v2",
          [{"query-id": "q", "query": "x", "language": "french"}],
          [{"query-id": "q", "corpus-id": "p", "score": 1}], ["p"])  # fmt: skip
    assert [t.name for t in available_tasks(tmp_path)] == ["ViDoRe_biomedical_lectures_v2_multilingual"]
    assert len(missing_tasks(tmp_path)) == 77 and "ViDoRe_esg_reports_v2_multilingual" in missing_tasks(
        tmp_path
    )
    with pytest.raises(DataError, match=r"ViDoRe_esg_reports_v2_multilingual corpus: data folder not found"):
        load_task(tmp_path, "ViDoRe_esg_reports_v2_multilingual")  # asked for and absent: an error


def test_moment_retrieval_one_positive_and_momentseeker_every_frame(tmp_path) -> None:
    from vlm2vec.eval_v2 import load_v2_visual

    task = get_task("QVHighlight")
    base = tmp_path / task.frame_root / "vid"
    for sub in ("query", "negative_0", "positive_0", "positive_1"):
        write_frames(base / sub, _clip(10))
    write_rows(tmp_path / task.data / "test.jsonl", [dict(query="a dog", video_path="videos/vid.mp4")])
    row = load_task(tmp_path, "QVHighlight").rows[0]
    rel = f"{task.frame_root}/vid"
    assert (
        row.query_text
        == "<|video_1|> Find the clip that corresponds to the described scene in the given video: a dog"
    )
    assert row.cand_names == [f"{rel}/negative_0", f"{rel}/positive_0", f"{rel}/positive_1"]
    assert row.labels == [f"{rel}/positive_1"]  # the last positive* folder, as the reference keeps it
    assert len(load_v2_visual(row.query_visual)) == 8
    ms = get_task("MomentSeeker")
    for name in ("a_pos", "a_neg"):
        write_frames(tmp_path / ms.frame_root / "video_frames" / name, _clip(12))
    write_rows(tmp_path / ms.data / "test.jsonl", [dict(query="q", input_frames="a/pos.mp4",
               positive_frames=[{"output_path": "a/pos.mp4"}],
               negative_frames=[{"output_path": "a/neg.mp4"}])])  # fmt: skip
    s = load_task(tmp_path, "MomentSeeker")
    assert (
        s.rows[0].query_text
        == "<|video_1|> Find the clip that corresponds to the given sentence and video segment: q"
    )
    assert len(load_v2_visual(s.rows[0].query_visual)) == 12  # load_frames: every frame
    assert all(len(load_v2_visual(v)) == 12 for _, v in s.pool.values())


@pytest.mark.parametrize(
    "name,row,frame_dir,video,caption",
    [
        (
            "MSVD",
            dict(video_id="m1", video="clips/m1.avi", caption=["a cat", "cat"]),
            "m1",
            "clips/m1.avi",
            "a cat",
        ),
        ("DiDeMo", dict(video="raw/d1.mp4", caption="a man"), "d1", "d1.mp4", "a man"),
        ("YouCook2", dict(id="y1", video_path="val/x/y1.mp4", sentence="cut"), "y1", "y1.mp4", "cut"),
        ("VATEX", dict(videoID="v1", enCap=["a boy", "boy"]), "v1", "v1.mp4", "a boy"),
    ],
)
def test_video_retrieval_fields_per_reader(tmp_path, name, row, frame_dir, video, caption) -> None:
    task = get_task(name)
    write_rows(tmp_path / task.data / f"{task.split}.jsonl", [row])
    write_video(tmp_path / task.video_root / video, _clip())
    s = load_task(tmp_path, name)
    assert s.rows[0].query_text == f"{task.instruction} {caption}" and s.rows[0].labels == [frame_dir]
    assert s.pool[frame_dir][1].paths == (str(tmp_path / task.video_root / video),)
    write_frames(tmp_path / task.frame_root / frame_dir, _clip(3))  # extracted frames win, as in save_frames
    assert load_task(tmp_path, name).pool[frame_dir][1].paths == (
        str(tmp_path / task.frame_root / frame_dir),
    )


def test_videomme_and_activitynetqa_queries_and_candidates(tmp_path) -> None:
    mme, anet = get_task("Video-MME"), get_task("ActivityNetQA")
    options = ["A. red", "B. blue", "C. green", "D. black"]
    write_rows(tmp_path / mme.data / "test.jsonl", [dict(videoID="m", question="Color?", options=options,
               answer="C", question_id="1", domain="d", sub_category="s")])  # fmt: skip
    write_rows(tmp_path / anet.data / "test.jsonl", [dict(video_name="abc", question="is it red", answer="no",
               question_id="1")])  # fmt: skip
    write_frames(tmp_path / mme.frame_root / "m", _clip())
    write_frames(tmp_path / anet.frame_root / "v_abc", _clip())
    s = load_task(tmp_path, "Video-MME")
    assert s.rows[0].query_text == QA + "Color?\nA. red\nB. blue\nC. green\nD. black"
    assert s.rows[0].cand_names == options and s.rows[0].labels == ["C. green"]
    assert [s.pool[o][0] for o in options] == ["red", "blue", "green", "black"]
    a = load_task(tmp_path, "ActivityNetQA").rows[0]
    assert a.query_text == QA + "is it red? (A) yes; (B) no." and a.cand_names == ["yes", "no"]
    assert a.labels == ["no"] and a.query_visual.paths == (str(tmp_path / anet.frame_root / "v_abc"),)


def test_a_frame_folder_gives_the_reference_frame_list(tmp_path) -> None:
    """process_video_frames: natural file order, np.linspace(0, n - 1, 8, dtype=int)."""
    import numpy as np

    from vlm2vec.eval_v2 import load_v2_visual

    task = get_task("HMDB51")
    numbered = [Image.new("RGB", (16, 16), (8 * i,) * 3) for i in range(20)]
    write_frames(tmp_path / task.frame_root / "x", numbered)  # frame_0001.jpg ... frame_0020.jpg
    write_rows(tmp_path / task.data / "test.jsonl", [dict(video_id="x", pos_text="wave")])
    frames = load_v2_visual(load_task(tmp_path, "HMDB51").rows[0].query_visual)
    assert [round(int(np.asarray(f)[0, 0, 0]) / 8) for f in frames] == [0, 2, 5, 8, 10, 13, 16, 19]
