"""Image work of the shard writer (run in its pool workers): check that a file decodes, and
encode it as the shard stores it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from dist_train.trust.media import DEFAULT_MAX_PIXELS, ImageRefused, check_image_file
from .dedup import fingerprint

JPEG_FORMATS = ("JPEG", "MPO")


@contextlib.contextmanager
def pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL's own decompression-bomb limit set to ours while decoding (None: PIL's default is kept),
    so an image the user allowed with --max-image-pixels is not refused by PIL's smaller one."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels or 0, DEFAULT_MAX_PIXELS)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def check_image(task: tuple[str, int]) -> str | None:
    """(path, max pixels) -> None if the image decodes, else the reason.

    The header is read first (`trust.media`): a special file, or an image declaring more than
    max pixels, is refused without decoding. `verify()` alone misses truncated JPEGs, so the
    image is loaded; JPEGs decode in draft (1/8 scale) mode, which still reads the whole
    entropy-coded stream but is several times faster.
    """
    path, max_pixels = task
    try:
        check_image_file(path, max_pixels)
    except (ImageRefused, OSError) as e:
        return f"{type(e).__name__}: {e}"
    try:
        with pil_pixel_limit(max_pixels), Image.open(path) as im:
            if im.format in JPEG_FORMATS:
                im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(e).__name__}: {e}"
    return None


def check_and_fingerprint(task: tuple[str, int]) -> list:
    """(path, max pixels): decode the image fully and fingerprint its pixels (`dedup.fingerprint`):
    [None, [exact digest as hex, phash, mirrored phash, flat]] — plain JSON values, as the writer's
    worker protocol carries them (`fingerprint_of` turns it back) — or [the reason, None] when it
    does not decode. The header is read first (`trust.media`): a special file, or an image
    declaring more than max pixels, is refused without decoding."""
    path, max_pixels = task
    try:
        check_image_file(path, max_pixels)
    except (ImageRefused, OSError) as e:
        return [f"{type(e).__name__}: {e}", None]
    try:
        with pil_pixel_limit(max_pixels), Image.open(path) as im:
            im.load()
            digest, phash, mirror, flat = fingerprint(im if im.mode == "RGB" else _to_rgb(im))
            return [None, [digest.hex(), phash, mirror, flat]]
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return [f"{type(e).__name__}: {e}", None]


def fingerprint_of(value: list) -> tuple[bytes, int, int, bool]:
    """`dedup.fingerprint`'s tuple from `check_and_fingerprint`'s JSON form."""
    digest, phash, mirror, flat = value
    return bytes.fromhex(digest), int(phash), int(mirror), bool(flat)


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
    # check_image bounded the pixels from the header (--max-image-pixels): PIL's default must not refuse them
    with pil_pixel_limit(1 << 62), Image.open(path) as im:
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
