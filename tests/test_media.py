"""Videos, multi-image rows and PDF pages through media.py and VLM2Vec.encode (tiny backbones, media
written inside the tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec.media import (
    MediaError,
    load_pdf,
    load_video,
    pdf_pages,
    sample_indices,
    write_frames,
    write_pdf,
    write_video,
)
from vlm2vec.model import VLM2Vec


def frames(n: int, seed: int = 0, size: tuple[int, int] = (56, 42)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen():
    return VLM2Vec.tiny("qwen2_vl")


def test_sample_indices_follow_the_reference_linspace() -> None:
    assert sample_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]  # np.linspace(0, 19, 8, dtype=int)
    assert sample_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]  # fewer frames than asked: all of them
    assert sample_indices(5, None) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_indices(0, 8)


def test_folder_list_and_video_files_give_the_same_frames_and_embedding(tmp_path, qwen) -> None:
    video = frames(11)
    write_frames(tmp_path / "frames", video, suffix=".png")
    write_video(tmp_path / "clip.mp4", video)  # lossless H.264 (RGB)
    picked = [video[i] for i in sample_indices(11, 8)]
    for source in (
        tmp_path / "frames",
        tmp_path / "clip.mp4",
        video,
        [str(p) for p in sorted((tmp_path / "frames").iterdir())],
    ):
        got = load_video(source, 8)
        assert len(got) == 8
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, picked)), source
    text = ["<|video_1|> Represent the given video."] * 4
    sources = [str(tmp_path / "frames"), str(tmp_path / "clip.mp4"), video, frames(11, seed=1)]
    emb = qwen.encode(text, videos=sources, batch_size=4, show_progress=False)
    torch.testing.assert_close(emb[1], emb[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[2], emb[0], rtol=0, atol=1e-6)
    assert (emb[3] - emb[0]).abs().max() > 1e-3  # another video is another vector


def test_webm_decodes_to_the_sampled_frames(tmp_path) -> None:
    video = frames(9, seed=2)
    write_video(tmp_path / "clip.webm", video)  # container without a frame count: counted by decoding
    got = load_video(tmp_path / "clip.webm", 4)
    assert len(got) == 4
    for a, i in zip(got, sample_indices(9, 4)):  # VP9 lossless via yuv444p: within rounding
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(video[i], dtype=int)).max() <= 3


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_one_frame_video_against_an_image(family: str) -> None:
    """Qwen2/2.5-VL: a 1-frame video is the image (same pixels, temporal patch filled by repetition,
    same M-RoPE). Qwen3-VL writes a timestamp before each temporal patch of a video, so it differs."""
    model = VLM2Vec.tiny(family)
    img = frames(1, seed=3)[0]
    as_video = model.encode(["<|video_1|> x"], videos=[[img]], show_progress=False)
    as_image = model.encode(["<|image_1|> x"], [img], show_progress=False)
    if family == "qwen3_vl":
        assert (as_video - as_image).abs().max() > 1e-3
    else:
        torch.testing.assert_close(as_video, as_image, rtol=0, atol=1e-6)


MIXED_TEXTS = [
    "<|video_1|> What happens in the video?",
    "a plain caption of some length",
    "<|image_1|> left, <|image_2|> right: which is larger?",
    "<|image_1|> one image",
    "Find the page: <|image_1|><|image_2|><|image_3|>",
]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "phi3_v"])
def test_multi_image_and_video_rows_are_padding_invariant(family: str) -> None:
    model = VLM2Vec.tiny(family)
    pics = frames(6, seed=4, size=(40, 56))
    texts, images = list(MIXED_TEXTS), [None, None, pics[:2], pics[2], pics[3:6]]
    videos = [frames(5, seed=5), None, None, None, None]
    if "video" not in model.family.input_kinds:
        texts, images, videos = texts[1:], images[1:], None
    batched = model.encode(texts, images, videos, batch_size=len(texts), show_progress=False)
    alone = torch.cat(
        [
            model.encode(
                [t], [i], None if videos is None else [videos[k + 1 - len(texts) + 4]], show_progress=False
            )
            for k, (t, i) in enumerate(zip(texts, images))
        ]
    )
    torch.testing.assert_close(batched, alone, rtol=0, atol=2e-6)
    if model.family.supports_packed:
        packed = model.encode(texts, images, videos, batch_size=len(texts), packed=True, show_progress=False)
        torch.testing.assert_close(packed, alone, rtol=0, atol=2e-6)
    # image order matters: swapping the two images of row 2 changes its vector
    swapped = model.encode([texts[-3]], [[images[-3][1], images[-3][0]]], show_progress=False)
    assert (swapped[0] - batched[-3]).abs().max() > 1e-4


def test_demo_family_takes_a_video_as_one_token_per_frame() -> None:
    from vlm2vec.demo import family

    model = VLM2Vec.tiny(family.FAMILY_NAME)
    video = frames(5, seed=6, size=(64, 64))
    inputs = model.prepare(["<|video_1|> what", "<|image_1|> x"], [None, video[0]], videos=[video, None])
    image_id = model.processor.tokenizer.convert_tokens_to_ids(family.IMAGE_TOKEN)
    assert int((inputs["input_ids"][0] == image_id).sum()) == 5
    assert inputs["image_features"].shape == (5 + model.processor.featurizer.n_tokens, family.FEATURE_DIM)


def test_placeholders_are_checked_against_the_inputs(qwen) -> None:
    pics = frames(2, seed=7)
    with pytest.raises(ValueError, match="row 0: image placeholders must be .* in order"):
        qwen.prepare(["<|image_2|> <|image_1|>"], [pics])
    with pytest.raises(ValueError, match="row 1: the text has 1 image placeholders but 2 images"):
        qwen.prepare(["x", "<|image_1|> y"], [None, pics])
    with pytest.raises(ValueError, match="row 0: the text has <|video_1|> but no video"):
        qwen.prepare(["<|video_1|> y"], [None])
    with pytest.raises(ValueError, match="row 0: a video was given but the text has no"):
        qwen.prepare(["<|image_1|> y"], [pics[0]], videos=[pics])
    implicit = qwen.encode(["two pictures"], [pics], show_progress=False)
    explicit = qwen.encode(["<|image_1|> <|image_2|> two pictures"], [pics], show_progress=False)
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_videos_name_the_row_and_the_file(tmp_path, qwen) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"this is not an mp4 file" * 10)
    cases = [
        (tmp_path / "missing", "not found.*missing"),
        (tmp_path / "empty", "frame folder .*empty has no image files"),
        (tmp_path / "broken.mp4", "cannot decode video .*broken.mp4"),
        ([], "no frames"),
    ]
    for source, message in cases:
        with pytest.raises(MediaError, match=f"row 7 of test.jsonl: .*{message}"):
            load_video(source, 8, where="row 7 of test.jsonl")
    with pytest.raises(MediaError, match=r"videos\[1\].*missing"):
        qwen.encode(["a", "<|video_1|> b"], videos=[None, str(tmp_path / "missing")], show_progress=False)


def test_family_without_video_refuses_before_encoding() -> None:
    model = VLM2Vec.tiny("llava_next")
    with pytest.raises(ValueError, match="video rows, but backbone family 'llava_next' takes only"):
        model.encode(["<|video_1|> x"], videos=["/does/not/matter.mp4"], show_progress=False)
    with pytest.raises(ValueError, match="row 0 has video rows"):
        model.prepare(["<|video_1|> x"], videos=[frames(2)])
    model.family.check_inputs({"image", "multi_image", "text"})  # what it takes passes


def test_pdf_pages_render_once_and_feed_the_encoder(tmp_path, qwen) -> None:
    pages = frames(3, seed=8, size=(60, 80))
    pdf = write_pdf(tmp_path / "doc.pdf", pages)
    cache = tmp_path / "cache"
    files = pdf_pages(pdf, cache_dir=cache, dpi=72)
    assert [f.name for f in files] == ["page-00000.png", "page-00001.png", "page-00002.png"]
    stamp = [f.stat().st_mtime_ns for f in files]
    assert pdf_pages(pdf, cache_dir=cache, dpi=72) == files  # cached: not rendered again
    assert [f.stat().st_mtime_ns for f in files] == stamp
    rendered = load_pdf(pdf, cache_dir=cache, dpi=72)
    assert [im.size for im in rendered] == [(60, 80)] * 3
    emb = qwen.encode(["<|image_1|><|image_2|><|image_3|> the document"], [rendered], show_progress=False)
    assert emb.shape == (1, qwen.embedding_dim) and torch.isfinite(emb).all()


def test_pdf_without_pages_or_unreadable_leaves_nothing_in_the_cache(tmp_path) -> None:
    import pypdfium2 as pdfium

    empty = pdfium.PdfDocument.new()
    empty.save(str(tmp_path / "empty.pdf"))
    empty.close()
    (tmp_path / "junk.pdf").write_bytes(b"%PDF-1.4 nonsense")
    cache = tmp_path / "cache"
    with pytest.raises(MediaError, match="row 3: cannot read PDF .*empty.pdf .*without pages"):
        pdf_pages(tmp_path / "empty.pdf", cache_dir=cache, where="row 3")
    with pytest.raises(MediaError, match="row 4: cannot read PDF .*junk.pdf"):
        pdf_pages(tmp_path / "junk.pdf", cache_dir=cache, where="row 4")
    assert list(cache.iterdir()) == []


# ----------------------------------------------------------- the MMEB-V2 reference's frame extraction
def test_extraction_indices_as_the_reference_computes_them():
    import math

    from vlm2vec.media import cv2_extract_indices, ffmpeg_extract_indices

    assert ffmpeg_extract_indices(40) == list(range(40))
    assert ffmpeg_extract_indices(100) == [math.floor(i * 100 / 64) for i in range(64)]
    assert ffmpeg_extract_indices(100)[:6] == [0, 1, 3, 4, 6, 7]
    assert cv2_extract_indices(100, 100) == list(range(64))  # step = 100 // 64 = 1
    assert cv2_extract_indices(200, 200) == [3 * k for k in range(64)]
    assert cv2_extract_indices(40, 40) == list(range(40))  # reads until a read fails
    assert cv2_extract_indices(200, 150) == [3 * k for k in range(50)]  # the container over-reports


def _numbered(n: int) -> list[Image.Image]:
    """Frames whose gray level is 3 * index: the index survives a lossless codec."""
    return [Image.new("RGB", (16, 16), (3 * i, 3 * i, 3 * i)) for i in range(n)]


@pytest.mark.parametrize("extractor", ["ffmpeg", "cv2"])
def test_a_video_file_is_extracted_to_64_frames_then_sampled_to_8(tmp_path, extractor):
    from vlm2vec.media import extract_frames, write_video

    path = write_video(tmp_path / "v.mp4", _numbered(80))  # libx264rgb qp 0: lossless
    extracted = extract_frames(path, extractor)
    index = [int(np.asarray(f)[0, 0, 0]) // 3 for f in extracted]
    if extractor == "ffmpeg":  # floor(i * 80 / 64)
        assert index == [i * 80 // 64 for i in range(64)]
    else:  # step 80 // 64 = 1: frames 0..63
        assert index == list(range(64))
    sampled = load_video(path, 8, extractor=extractor)
    picks = np.linspace(0, 63, 8, dtype=int).tolist()  # process_video_frames over the 64 saved frames
    assert [int(np.asarray(f)[0, 0, 0]) // 3 for f in sampled] == [index[p] for p in picks]
    # without the extraction step the 8 would be sampled over all 80 frames: a different list
    direct = [int(np.asarray(f)[0, 0, 0]) // 3 for f in load_video(path, 8)]
    assert direct == np.linspace(0, 79, 8, dtype=int).tolist() != [index[p] for p in picks]


def test_row_readers_resolve_against_the_root_and_raise_data_errors(tmp_path) -> None:
    """load_image / load_visual / load_frames (the row readers data and eval share) open paths relative
    to the image root and fail with a DataError naming the row and the file."""
    from vlm2vec.errors import DataError
    from vlm2vec.media import load_frames, load_image, load_visual, write_frames

    Image.new("RGBA", (6, 4), (10, 20, 30, 255)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    img = load_image("a.png", tmp_path, "row 1")
    # decoded in its own mode: the encoder resizes to a preset, then converts to RGB (reference order)
    assert img.mode == "RGBA" and img.size == (6, 4)
    assert load_image(str(tmp_path / "a.png"), "/elsewhere", "row 1").size == (6, 4)  # absolute path
    pair = load_visual(("a.png", "a.png"), tmp_path, "row 2")
    assert isinstance(pair, list) and len(pair) == 2 and load_visual(None, tmp_path, "row 2") is None
    with pytest.raises(DataError, match=r"^row 3\[1\]: cannot read image .*broken.png"):
        load_visual(("a.png", "broken.png"), tmp_path, "row 3")
    with pytest.raises(DataError, match=r"^row 4: cannot read image .*missing.png"):
        load_image("missing.png", tmp_path, "row 4")
    write_frames(tmp_path / "clip", [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(5)])
    assert len(load_frames("clip", tmp_path, 3, "row 5")) == 3 and load_frames(None, tmp_path, 3, "r") is None
    with pytest.raises(DataError, match=r"^row 6: video not found"):
        load_frames("no-clip", tmp_path, 3, "row 6")
