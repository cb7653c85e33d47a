"""Reading visual inputs: a row's images (relative to an image root), videos (frame folders, frame lists,
video files) and PDF pages. Below both the data package and the evaluations, which read through it.

Frame sampling follows the MMEB-V2 reference: the frames of a video, in natural file-name order, are
sampled uniformly by index with `np.linspace(0, n - 1, k, dtype=int)` (k = `num_frames`, 8 by
default); a video with at most k frames keeps all of them. A video file (mp4, webm, ...) is decoded
with PyAV and sampled the same way over its decoded frames, so a frame folder written from a video
and the video itself give the same frames (up to codec loss). MMEB-V2 evaluation instead reproduces the
reference's two-step extraction of a video file (`extract_frames`: 64 frames at the reference's ffmpeg
or cv2 indices, then the sampling above over those 64).

PDF pages render with pypdfium2 into a cache folder named by the file's content and the resolution;
the folder appears complete or not at all (rendered into a temporary folder, then renamed), so an
interrupted or failed render leaves nothing half-written that a later run would trust.

Errors are `MediaError` (a ValueError) and start with the caller's `where` (file and row) followed by
the file that failed; the row readers (`load_image`, `load_visual`, `load_frames`) raise `DataError`
instead, as every other reader of a bad row does.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm2vec.errors import DataError

DEFAULT_NUM_FRAMES = 8
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PDF_DPI = 144
MAX_FRAMES_SAVED = 64  # the reference's `max_frames_saved` (experiments/public/eval/video.yaml)
EXTRACTORS = ("ffmpeg", "cv2")

VideoSource = str | os.PathLike | Sequence[Any]
"""A frame folder, a video file, or a list of frames (PIL images or image paths)."""


class Frames(list):
    """A video's sampled frames (a list of PIL images), marked so that callers passing visual inputs
    around can tell a video from a list of images."""


class MediaError(ValueError):
    """A video, frame or PDF that cannot be used; the message names the row (`where`) and the file."""


def sample_indices(total: int, num_frames: int | None) -> list[int]:
    """Indices of the frames kept out of `total`: uniform by index (linspace, truncated to int, as the
    reference), all of them when `num_frames` is None or at least `total`."""
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    if num_frames is None or num_frames >= total:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a frame folder in natural order (frame_2 before frame_10)."""
    folder = Path(folder)
    names = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return [folder / n for n in sorted(names, key=_natural_key)]


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _open_rgb(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise MediaError(f"{where}: cannot read frame {path}: {err}") from err


def _frame_count(path: Path) -> int:
    """Frames of the first video stream as decoded (the container's count may be missing or wrong)."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _decode_at(path: Path, wanted: list[int]) -> dict[int, Image.Image]:
    import av

    keep, frames = set(wanted), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in keep:
                frames[i] = frame.to_image().convert("RGB")
            if i >= wanted[-1]:
                break
    return frames


def decode_video(path: str | os.PathLike, num_frames: int | None, where: str = "video") -> list[Image.Image]:
    """Sampled frames of a video file as RGB PIL images (PyAV), keeping only the sampled ones in memory.
    The frame count comes from the container, or from decoding when it says nothing (webm) or
    over-reports (then the sampling is redone over the frames that decode)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{where}: video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{where}: {path} has no video stream")
            total = container.streams.video[0].frames or _frame_count(path)
        if not total:
            raise MediaError(f"{where}: video {path} has no frames")
        wanted = sample_indices(total, num_frames)
        frames = _decode_at(path, wanted)
        if len(frames) < len(wanted):  # the container over-reported its frames
            total = _frame_count(path)
            if not total:
                raise MediaError(f"{where}: video {path} has no decodable frames")
            wanted = sample_indices(total, num_frames)
            frames = _decode_at(path, wanted)
    except av.FFmpegError as err:
        raise MediaError(f"{where}: cannot decode video {path}: {err}") from err
    return [frames[i] for i in wanted]


# ------------------------------------------------------------------ the reference's frame extraction
def ffmpeg_extract_indices(total: int, max_frames: int = MAX_FRAMES_SAVED) -> list[int]:
    """Frames the reference's `save_frames` keeps (src/utils/vision_utils/vision_utils.py): every frame
    when the video has at most `max_frames`, else floor(i * (total / max_frames)) for i < max_frames, over
    the decoded frames (ffprobe -count_frames, then ffmpeg select eq(n, i)). Same float expression."""
    if total <= max_frames:
        return list(range(total))
    step = total / max_frames
    return [math.floor(i * step) for i in range(max_frames)]


def cv2_extract_indices(reported: int, decodable: int, max_frames: int = MAX_FRAMES_SAVED) -> list[int]:
    """Frames the reference's video-QA readers keep (videomme/nextqa/egoschema/mvbench/activitynetqa
    _dataset.py): step = max(1, CAP_PROP_FRAME_COUNT // max_frames), frames 0, step, 2*step, ... until
    `max_frames` are saved or a read fails (the index reaches the frames that decode)."""
    step = max(1, reported // max_frames)
    return [k * step for k in range(max_frames) if k * step < decodable]


def _decoded_count(container: Any) -> int:
    return sum(1 for _ in container.decode(video=0))


def extract_frames(path: str | os.PathLike, extractor: str, where: str = "video") -> list[Image.Image]:
    """The frames the reference extracts from a video file before sampling (`extractor` "ffmpeg": the
    video classification / retrieval readers; "cv2": the video-QA readers), decoded with PyAV at the
    same frame indices. The reference stores them as JPEG files; here they stay in memory (no JPEG loss).
    cv2's CAP_PROP_FRAME_COUNT is the container's frame count; where the container has none, the decoded
    count stands in for it."""
    import av

    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{where}: video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{where}: {path} has no video stream")
            reported = container.streams.video[0].frames
            decodable = _decoded_count(container)
        if not decodable:
            raise MediaError(f"{where}: video {path} has no decodable frames")
        if extractor == "ffmpeg":
            wanted = ffmpeg_extract_indices(decodable)
        else:
            wanted = cv2_extract_indices(reported or decodable, decodable)
        frames = _decode_at(path, wanted)
    except av.FFmpegError as err:
        raise MediaError(f"{where}: cannot decode video {path}: {err}") from err
    return [frames[i] for i in wanted]


def load_video(
    source: VideoSource,
    num_frames: int | None = DEFAULT_NUM_FRAMES,
    *,
    root: str | os.PathLike | None = None,
    where: str = "video",
    extractor: str | None = None,
) -> list[Image.Image]:
    """Sampled frames (RGB PIL images) of a frame folder, a video file or a list of frames.

    extractor ("ffmpeg" / "cv2"): a video file is first reduced to the reference's 64 extracted frames
    (`extract_frames`), which are then sampled like a frame folder. Relative paths resolve against `root`.
    A list is sampled like a folder's sorted frames (the caller
    gives them in temporal order)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        if path.is_dir():
            files = frame_files(path)
            if not files:
                raise MediaError(
                    f"{where}: frame folder {path} has no image files ({'/'.join(IMAGE_SUFFIXES)})"
                )
            return [_open_rgb(files[i], where) for i in sample_indices(len(files), num_frames)]
        if is_video_file(path) and extractor is not None:  # the reference: extract, then sample
            frames = extract_frames(path, extractor, where)
            return [frames[i] for i in sample_indices(len(frames), num_frames)]
        if is_video_file(path):
            return decode_video(path, num_frames, where)
        if not path.exists():
            raise MediaError(f"{where}: video not found (no frame folder or video file): {path}")
        raise MediaError(
            f"{where}: {path} is neither a frame folder nor a video file ({', '.join(VIDEO_SUFFIXES)})"
        )
    frames = list(source)
    if not frames:
        raise MediaError(f"{where}: the video has no frames (empty list)")
    out = []
    for i in sample_indices(len(frames), num_frames):
        frame = frames[i]
        if isinstance(frame, Image.Image):
            out.append(frame.convert("RGB") if frame.mode != "RGB" else frame)
        elif isinstance(frame, str | os.PathLike):
            p = Path(frame) if root is None or Path(frame).is_absolute() else Path(root) / frame
            out.append(_open_rgb(p, where))
        else:
            raise MediaError(f"{where}: frame {i} must be a PIL image or a path, got {type(frame).__name__}")
    return out


# ------------------------------------------------------------------------------------------ row images
def resolve_path(path: str, image_root: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or image_root is None else image_root / p


def load_image(path: str, image_root: str | os.PathLike | None, where: str) -> Image.Image:
    """Open an image (relative to `image_root`), decoded in its own mode; a DataError naming `where` and the
    file on failure. The encoder resizes it to a resolution preset first and converts it to RGB after, as
    the reference does (a palette image resized as a palette: nearest neighbour)."""
    full = resolve_path(path, Path(image_root) if image_root is not None else None)
    try:
        with Image.open(full) as img:
            return img.copy()  # decoded; a plain Image (palette and transparency kept)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: cannot read image {full}: {err}") from err


def load_visual(
    paths: str | tuple[str, ...] | None, image_root: str | os.PathLike | None, where: str
) -> Image.Image | list[Image.Image] | None:
    """A row's image column as encoder input: None, one image, or a list (several images / pages)."""
    if paths is None:
        return None
    if isinstance(paths, tuple):
        return [load_image(p, image_root, f"{where}[{k}]") for k, p in enumerate(paths)]
    return load_image(paths, image_root, where)


def load_frames(
    source: str | None, image_root: str | os.PathLike | None, num_frames: int | None, where: str
) -> list[Image.Image] | None:
    """A row's video (frame folder or video file) as sampled frames; a DataError naming `where`."""
    if source is None:
        return None
    try:
        return load_video(source, num_frames, root=image_root, where=where)
    except MediaError as err:
        raise DataError(str(err)) from err


# ------------------------------------------------------------------------------------------------ PDF
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


def pdf_pages(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, dpi: int = PDF_DPI,
    where: str = "pdf",
) -> list[Path]:  # fmt: skip
    """PNG files of every page of a PDF, rendered once into `cache_dir/<content hash>-<dpi>/` (default:
    a `.pages` folder beside the PDF). Raises MediaError for an unreadable PDF or one without pages;
    then the cache holds nothing for it."""
    import pypdfium2 as pdfium

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{where}: PDF not found: {path}")
    cache = Path(cache_dir) if cache_dir is not None else path.parent / ".pages"
    target = cache / f"{_file_digest(path)}-{dpi}"
    if target.is_dir():
        return sorted(target.glob("page-*.png"))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rendering-", dir=cache))
    try:
        try:
            pdf = pdfium.PdfDocument(str(path))
        except pdfium.PdfiumError as err:
            # PDFium refuses a document without pages at load time, so both land here
            raise MediaError(f"{where}: cannot read PDF {path} (damaged, or without pages): {err}") from err
        try:
            if len(pdf) == 0:
                raise MediaError(f"{where}: PDF {path} has no pages")
            for i in range(len(pdf)):
                image = pdf[i].render(scale=dpi / 72).to_pil().convert("RGB")
                image.save(tmp / f"page-{i:05d}.png")
        finally:
            pdf.close()
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same render first: keep theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(target.glob("page-*.png"))


def load_pdf(path: str | os.PathLike, **kwargs: Any) -> list[Image.Image]:
    """Every page of a PDF as an RGB PIL image (rendered through the page cache of `pdf_pages`)."""
    where = kwargs.get("where", "pdf")
    return [_open_rgb(p, where) for p in pdf_pages(path, **kwargs)]


# ---------------------------------------------------------------------------------------- writers
def write_frames(
    folder: str | os.PathLike, frames: Sequence[Image.Image], suffix: str = ".jpg"
) -> list[Path]:
    """Save frames as `frame_0001.jpg`, ... (the reference's frame-folder layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames, 1):
        p = folder / f"frame_{i:04d}{suffix}"
        frame.convert("RGB").save(p, quality=95) if suffix in (".jpg", ".jpeg") else frame.save(p)
        paths.append(p)
    return paths


def write_video(path: str | os.PathLike, frames: Sequence[Image.Image], fps: int = 4) -> Path:
    """Encode frames (all of one even size) as a video file with PyAV: mp4 -> H.264 (lossless, so a
    test can compare decoded frames with the originals), webm -> VP9."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not frames:
        raise ValueError("write_video needs at least one frame")
    width, height = frames[0].size
    codec, options = (
        ("libvpx-vp9", {"lossless": "1"}) if path.suffix == ".webm" else ("libx264rgb", {"qp": "0"})
    )
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv444p"
        stream.options = options
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_pdf(path: str | os.PathLike, pages: Sequence[Image.Image]) -> Path:
    """A PDF with one page per image (Pillow's PDF writer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not pages:
        raise ValueError("write_pdf needs at least one page")
    first, *rest = [p.convert("RGB") for p in pages]
    first.save(path, "PDF", save_all=True, append_images=rest, resolution=72)
    return path
