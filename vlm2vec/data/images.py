"""Opening a row's images, image lists and video frames, with paths relative to an image root.

A file that cannot be read raises `DataError` naming the row. Imports nothing from `vlm2vec.data` but
its errors module, so both the training data and evaluation use it."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from vlm2vec.data.errors import DataError


def resolve_path(path: str, image_root: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or image_root is None else image_root / p


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
    from vlm2vec.media import MediaError, load_video

    try:
        return load_video(source, num_frames, root=image_root, where=where)
    except MediaError as err:
        raise DataError(str(err)) from err


def load_image(path: str, image_root: str | os.PathLike | None, where: str) -> Image.Image:
    """Open an image (relative to `image_root`) as RGB; a DataError naming `where` and the file on failure."""
    full = resolve_path(path, Path(image_root) if image_root is not None else None)
    try:
        with Image.open(full) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: cannot read image {full}: {err}") from err
