"""The single place images are opened: a PIL image, path, bytes or ``{"bytes", "path"}`` dict becomes a fully decoded
RGB image (EXIF orientation applied, transparency composited on white, 16/32-bit gray scaled to 8 bits), or a
ValueError naming the problem (missing file, unreadable or truncated data, too many pixels, extreme aspect ratio)."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageOps

from .checks import image_shape_problem


def load_image(obj: Any, *, max_image_pixels: int | None = None) -> Image.Image:
    """Open a PIL image, path, bytes or ``{"bytes", "path"}`` dict as a fully decoded RGB image.

    The single place images are opened. Raises ValueError for a missing file, unreadable or truncated data, or more
    than ``max_image_pixels`` pixels (default ``PIL.Image.MAX_IMAGE_PIXELS``; None there disables the check)."""
    return _load_rgb(obj, max_image_pixels)[0]


def _load_rgb(obj: Any, max_image_pixels: int | None) -> tuple[Image.Image, bool]:
    limit = Image.MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    image = _open_lazily(obj)
    width, height = image.size  # read from the header; no pixels decoded yet
    problem = image_shape_problem(width, height, limit)
    if problem is not None:
        if image is not obj:
            image.close()
        raise ValueError(problem)
    try:
        image.load()
    except Exception as e:
        raise ValueError(f"cannot decode image, truncated or corrupt ({type(e).__name__}: {e})") from e
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: every source (path, bytes, PIL, datasets) alike
        image = ImageOps.exif_transpose(image)
    try:
        return _to_rgb(image)
    except Exception as e:
        raise ValueError(f"cannot convert image mode {image.mode!r} to RGB ({e})") from e


def _open_lazily(obj: Any) -> Image.Image:
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, Mapping):
        if obj.get("bytes") is None and obj.get("path") is None:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
        obj = obj["bytes"] if obj.get("bytes") is not None else obj["path"]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        source = io.BytesIO(obj)
    elif isinstance(obj, (str, os.PathLike)):
        source = os.fspath(obj)
        if not os.path.isfile(source):
            raise ValueError(f"image file not found: {source!r}")
    else:
        raise ValueError(f"unsupported image type {type(obj).__name__} "
                         "(expected a PIL image, a path, bytes or a {'bytes', 'path'} dict)")
    try:
        with warnings.catch_warnings():  # our own pixel limit decides; PIL's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large: {e}") from e
    except Exception as e:
        raise ValueError(f"cannot read image ({type(e).__name__}: {e})") from e


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """(RGB image, whether it was converted). Transparency is composited on white; 16-bit gray is scaled down."""
    mode = image.mode
    if mode == "RGB":
        return image, False
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"), True
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16-bit (or 32-bit) gray: scaled to 8 bits, not clipped
        image = image if mode in ("I", "F") else image.convert("I")
        scale = 1 / 256 if image.getextrema()[1] > 255 else 1
        image = image.point(lambda v: v * scale).convert("L")
    return image.convert("RGB"), True
