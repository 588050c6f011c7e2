"""What a processor or tokenizer would reject later, checked on the raw text and image header instead
(`formats.py` turns each problem into an error naming the row and column)."""

from __future__ import annotations

import re

from ..models.families import FAMILIES

# Longest side / shortest side above which image processors fail (Qwen2-VL's smart_resize refuses > 200) or squash
# the image to a strip of patches.
MAX_ASPECT_RATIO = 200
# Text that a processor or tokenizer turns into vision tokens: typed in a message it would desynchronise the
# placeholder count ("Found total 4 tokens and 3 images"). Every family's vision tokens, from models/families.py.
VISION_TEXT_TOKENS = tuple(sorted({t for f in FAMILIES.values() for t in (f.image_token, *f.vision_special_tokens)},
                                  key=lambda t: (-len(t), t)))
_ROW_COL_TOKEN = re.compile(r"<row_\d+_col_\d+>")
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why the tokenizer would fail on `text` or turn part of it into vision tokens (None if it would not): a lone
    surrogate character, or an image placeholder typed into the text."""
    if (bad := _SURROGATE.search(text)) is not None:
        return (f"has a lone surrogate character U+{ord(bad.group(0)):04X} at position {bad.start()} (not valid "
                "Unicode, often a broken JSON escape); fix or remove it")
    token = next((t for t in VISION_TEXT_TOKENS if t in text), None)
    if token is None and (match := _ROW_COL_TOKEN.search(text)) is not None:
        token = match.group(0)
    if token is not None:
        return (f"contains the image placeholder {token!r}; images are given as {{'type': 'image'}} blocks (or the "
                "images column), not typed into the text")
    return None


def image_shape_problem(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why an image of this size is refused before decoding (None if it is not): above `max_pixels` (the
    decompression-bomb guard), an empty side, or an aspect ratio above `MAX_ASPECT_RATIO`."""
    if max_pixels is not None and width * height > max_pixels:
        return (f"image is {width}x{height} = {width * height:,} pixels, above max_image_pixels={max_pixels:,} "
                "(decompression-bomb guard)")
    if min(width, height) < 1:
        return f"image is {width}x{height}: empty"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (f"image is {width}x{height}, aspect ratio {ratio:.0f}:1, above {MAX_ASPECT_RATIO}:1 (image "
                "processors reject it or squash it to a strip); crop or pad it")
    return None
