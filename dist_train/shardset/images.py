"""Image work of the shard writer (run in its pool workers): check that a file decodes, and
encode it as the shard stores it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from dist_train.trust.media import DEFAULT_MAX_PIXELS, ImageRefused, check_image_file, file_image_size
from . import resample
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


def check_and_encode(task: tuple) -> tuple[list, bytes]:
    """(path, max pixels, resize, quality[, compiled]): the writer's one pass over an image, on one
    full decode (`compiled`: resize with the compiled kernels now, `resample.use_compiled`).

    Returns ([None, [exact digest as hex, phash, mirrored phash, flat], member extension], member
    bytes): the validity check, the fingerprints (`dedup.fingerprint`; plain JSON values, as the
    writer's worker protocol carries them: `fingerprint_of` turns them back) and the bytes the
    shard stores, exactly as `encode_image` makes them, from that decode. The bytes are empty when
    the member is the source file itself (JPEG or PNG without resize: the writer copies it).
    An image that does not decode gives ([the reason, None, None], b""); the header is read first
    (`trust.media`): a special file, or an image declaring more than max pixels, is refused
    without decoding. A failure to encode a decoded image raises (the run stops: not the file's fault).
    """
    path, max_pixels, resize, quality = task[:4]
    if task[4:5] == (True,):
        resample.use_compiled()
    try:
        check_image_file(path, max_pixels)
    except (ImageRefused, OSError) as e:
        return [f"{type(e).__name__}: {e}", None, None], b""
    with pil_pixel_limit(max_pixels), contextlib.ExitStack() as stack:
        try:
            im = stack.enter_context(Image.open(path))
            im.load()
            rgb = im if im.mode == "RGB" else _to_rgb(im)
            pixels = np.asarray(rgb)  # once: the exact digest and the compiled resize read it
            digest, phash, mirror, flat = fingerprint(rgb, pixels)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            return [f"{type(e).__name__}: {e}", None, None], b""
        ext, data = _member(path, im, rgb, resize, quality, pixels)
    return [None, [digest.hex(), phash, mirror, flat], ext], data


def _member(path: str, im: Image.Image, rgb: Image.Image, resize: int | None, quality: int,
            pixels: np.ndarray) -> tuple[str, bytes]:
    """`encode_image`'s (extension, bytes) from the decoded image `im` (`rgb`: it in RGB, `pixels`:
    its array), b"" for
    the source file's own bytes. Where `encode_image` decodes a JPEG at a reduced DCT scale (`draft`:
    the target is at most half the image's size), the file is decoded again at that scale (1/2 to
    1/8 of each side: a fraction of the full decode's cost), so the bytes stay the same."""
    fmt = im.format
    if resize is None:
        if fmt in JPEG_FORMATS or fmt == "PNG":
            return ("jpg" if fmt in JPEG_FORMATS else "png"), b""
        return "png", _png_bytes(im)
    size = target_size(im.size, resize)
    if fmt in JPEG_FORMATS and min(im.width // size[0], im.height // size[1]) >= 2:  # draft may reduce
        with pil_pixel_limit(1 << 62), Image.open(path) as small:
            small.draft("RGB", size)
            if small.size != im.size:
                return "jpg", _jpeg_bytes(_to_rgb(small), size, quality)
    return "jpg", _jpeg_bytes(rgb, size, quality, pixels)


def fingerprint_of(value: list) -> tuple[bytes, int, int, bool]:
    """`dedup.fingerprint`'s tuple from `check_and_encode`'s JSON form."""
    digest, phash, mirror, flat = value
    return bytes.fromhex(digest), int(phash), int(mirror), bool(flat)


WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(im: Image.Image, alpha: bool = False) -> Image.Image:
    """RGB (RGBA with `alpha`) copy of `im`. 16-bit images (PIL modes I;16*, and I as PIL opens
    16-bit PNGs) are scaled to 8 bits first: PIL's own convert clips them at 255, which turns
    most of a 16-bit image white. Float images (mode F, e.g. 32-bit float TIFFs) whose values all
    lie in [0, 1] (torchvision's and scikit-image's float convention) are scaled by 255, which
    PIL's convert would make black; others are clipped to 0-255 as PIL does, NaN as 0."""
    if im.mode in WIDE_INT_MODES:
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray((wide >> 8).astype(np.uint8))
    elif im.mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return im.convert("RGBA" if alpha else "RGB")


def encode_image(task: tuple[str, int | None, int]) -> tuple[str, bytes]:
    """(path, resize, quality) -> (member extension, bytes) for one sample, from the file alone
    (the writer makes the same bytes in `check_and_encode`; the peers bench encodes with this).

    Without resize JPEG and PNG bytes go in untouched; other formats (folder layout: bmp, webp,
    tiff, ...) are converted losslessly to PNG because the contract stores jpg or png. With
    resize the shorter side shrinks to `resize` (never enlarged) and the result is JPEG at
    `quality`; alpha is dropped since JPEG has none.
    """
    path, resize, quality = task
    # the header was bounded (--max-image-pixels) before: PIL's default must not refuse them
    with pil_pixel_limit(1 << 62), Image.open(path) as im:
        fmt = im.format
        if resize is None:
            if fmt in JPEG_FORMATS or fmt == "PNG":
                return ("jpg" if fmt in JPEG_FORMATS else "png"), Path(path).read_bytes()
            return "png", _png_bytes(im)
        size = target_size(im.size, resize)
        if fmt in JPEG_FORMATS and size != im.size:
            im.draft("RGB", size)
        return "jpg", _jpeg_bytes(_to_rgb(im), size, quality)


def target_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """The shorter side shrunk to `resize`, never enlarged."""
    w, h = size
    scale = resize / min(w, h)
    return (w, h) if scale >= 1 else (max(1, round(w * scale)), max(1, round(h * scale)))


def _jpeg_bytes(rgb: Image.Image, size: tuple[int, int], quality: int, pixels: np.ndarray | None = None) -> bytes:
    """JPEG at `quality` of `rgb` (`pixels`: its array, if at hand) resized to `size` with LANCZOS
    (Pillow's pixels; compiled once the process has resized enough images to pay for it: `resample`)."""
    if rgb.size != size:
        rgb = resample.resize(rgb, size, "lanczos", pixels)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_bytes(im: Image.Image) -> bytes:
    """Lossless PNG of an image of another format (alpha kept)."""
    buf = io.BytesIO()
    _to_rgb(im, alpha="A" in im.getbands() or "transparency" in im.info).save(buf, format="PNG")
    return buf.getvalue()


LARGE_SIDE = 1024  # a median shorter side from which a full-size set gets `large_images_hint`


def large_images_hint(paths: list[str], sample: int = 200) -> str | None:
    """A line for a set stored at full size (no --resize) whose images are large: median shorter
    side >= LARGE_SIDE px, read from the headers of up to `sample` of them, evenly spaced.
    Training decodes every image whole, every epoch, whatever --img-size it crops to."""
    sides = []
    for path in paths[:: max(1, len(paths) // sample)][:sample]:
        try:
            sides.append(min(file_image_size(path)[1:]))  # the trust layer's header read, no decode
        except (ImageRefused, OSError):  # checked by the pass before; a hint only
            continue
    median = int(np.median(sides)) if sides else 0
    if median < LARGE_SIDE:
        return None
    return (f"the images are stored as they are, median shorter side {median} px: training decodes each one "
            f"whole every epoch, {(median / 256) ** 2:.0f}x the pixels of a --resize 256 set; shard with --resize "
            "(about 1.15x the largest --img-size you will train at: 256 for 224) unless you need the full size")
