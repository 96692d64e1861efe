"""Image work of the shard writer (run in its pool workers): check that a file decodes, and
encode it as the shard stores it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .dedup import fingerprint

JPEG_FORMATS = ("JPEG", "MPO")


def check_image(path: str) -> str | None:
    """Decode `path` fully; None if it decodes, else the reason.

    `verify()` alone misses truncated JPEGs, so the image is loaded; JPEGs decode in draft
    (1/8 scale) mode, which still reads the whole entropy-coded stream but is several times
    faster.
    """
    try:
        with Image.open(path) as im:
            if im.format in JPEG_FORMATS:
                im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(e).__name__}: {e}"
    return None


def check_and_fingerprint(path: str) -> tuple[str | None, tuple[bytes, int, int, bool] | None]:
    """Decode `path` fully and fingerprint its pixels (`dedup.fingerprint`): (None, fingerprint),
    or (the reason, None) when it does not decode."""
    try:
        with Image.open(path) as im:
            im.load()
            return None, fingerprint(im if im.mode == "RGB" else _to_rgb(im))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(e).__name__}: {e}", None


WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(im: Image.Image, alpha: bool = False) -> Image.Image:
    """RGB (RGBA with `alpha`) copy of `im`. 16-bit images (PIL modes I;16*, and I as PIL opens
    16-bit PNGs) are scaled to 8 bits first: PIL's own convert clips them at 255, which turns
    most of a 16-bit image white."""
    if im.mode in WIDE_INT_MODES:
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray((wide >> 8).astype(np.uint8))
    return im.convert("RGBA" if alpha else "RGB")


def encode_image(task: tuple[str, int | None, int]) -> tuple[str, bytes]:
    """(path, resize, quality) -> (member extension, bytes) for one sample.

    Without resize JPEG and PNG bytes go in untouched; other formats (folder layout: bmp, webp,
    tiff, ...) are converted losslessly to PNG because the contract stores jpg or png. With
    resize the shorter side shrinks to `resize` (never enlarged) and the result is JPEG at
    `quality`; alpha is dropped since JPEG has none.
    """
    path, resize, quality = task
    with Image.open(path) as im:
        fmt = im.format
        if resize is None:
            if fmt in JPEG_FORMATS or fmt == "PNG":
                return ("jpg" if fmt in JPEG_FORMATS else "png"), Path(path).read_bytes()
            out = _to_rgb(im, alpha="A" in im.getbands() or "transparency" in im.info)
            buf = io.BytesIO()
            out.save(buf, format="PNG")
            return "png", buf.getvalue()
        w, h = im.size
        scale = resize / min(w, h)
        size = (w, h) if scale >= 1 else (max(1, round(w * scale)), max(1, round(h * scale)))
        if fmt in JPEG_FORMATS and size != (w, h):
            im.draft("RGB", size)
        rgb = _to_rgb(im)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return "jpg", buf.getvalue()
