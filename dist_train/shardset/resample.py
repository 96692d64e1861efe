"""Image resizing with Pillow's pixels, compiled where that pays (resample_jit.py).

`resize(rgb, size, "lanczos")` is `rgb.resize(size, Image.Resampling.LANCZOS)`, bit for bit, for
8-bit images (L, RGB): in Pillow's scalar loops until the process has resized COMPILE_AFTER
images, then with numba's kernels, about 6x faster (~0.5 against ~3.3 ms a 384x512 photo to
256 px on the 2-core box). The switch costs numba's import (~0.7 s where torch is not loaded)
and the cached machine code once per process, so a short job never pays it; where numba is
missing or fails to import, Pillow keeps going, with the same pixels either way.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import numpy as np
import PIL
from PIL import Image

FILTERS = {"bilinear": (0, Image.Resampling.BILINEAR), "bicubic": (1, Image.Resampling.BICUBIC),
           "lanczos": (2, Image.Resampling.LANCZOS)}
COMPILE_AFTER = 200  # resizes in Pillow before a process loads the compiled kernels
COMPILE_JOB = 300  # images per process from which a job that knows its size loads them at once
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
_state = {"resized": 0, "kernels": None}  # kernels: resample_jit once imported, False if that failed


def compiled_kernels():
    """resample_jit (numba's kernels), or None where numba cannot be imported."""
    if _state["kernels"] is None:
        try:
            _state["kernels"] = importlib.import_module(".resample_jit", __package__)
        except ImportError:
            _state["kernels"] = False
    return _state["kernels"] or None


def use_compiled() -> None:
    """Resize with the compiled kernels from the next image on (a job that knows it is long)."""
    _state["resized"] = max(_state["resized"], COMPILE_AFTER)


@functools.lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int, kind: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    k, b = compiled_kernels().coefficients(in_size, out_size, kind)
    if flip:  # output column x takes column out_size - 1 - x's weights: a mirrored result
        k, b = np.ascontiguousarray(k[::-1]), np.ascontiguousarray(b[::-1])
    return k, b


def _horizontal_first(w: int, h: int, out_w: int, out_h: int) -> bool:
    """Pillow's pass order: from 13.0 on it runs the vertical pass first where the height loses
    more than twice the pixels the width loses (Resample.c, ImagingResampleInner)."""
    return PILLOW_MAJOR < 13 or not (0 < h - out_h and h - out_h > (w - out_w) * 2)


def resize_array(pixels: np.ndarray, size: tuple[int, int], method: str, flip: bool = False) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8 as Pillow resizes it (`size` = (w, h)), mirrored left to
    right with `flip` (the same as flipping the result); needs the compiled kernels."""
    jit = compiled_kernels()
    kind = FILTERS[method][0]
    pixels = np.ascontiguousarray(pixels)  # a view (a crop) is copied: the kernels are compiled for C order only
    h, w = pixels.shape[:2]
    out_w, out_h = size
    ky, by = _coefficients(h, out_h, kind, False)
    horizontal = out_w != w or flip
    if out_h != h and not _horizontal_first(w, h, out_w, out_h):
        pixels = jit.vertical(pixels, ky, by)
        return pixels if not horizontal else jit.horizontal(pixels, *_coefficients(w, out_w, kind, flip))
    if horizontal:
        first, last = int(by[0, 0]), int(by[-1, 0] + by[-1, 1])  # the rows the vertical pass reads
        pixels = jit.horizontal(pixels[first:last], *_coefficients(w, out_w, kind, flip))
        by = by.copy()
        by[:, 0] -= first
    return jit.vertical(pixels, ky, by) if out_h != h else pixels


def resize(im: Image.Image, size: tuple[int, int], method: str = "lanczos",
           pixels: np.ndarray | None = None) -> Image.Image:
    """`im.resize(size, <method>)` with Pillow's pixels, compiled once this process has resized
    COMPILE_AFTER images (8-bit L and RGB; other modes always go to Pillow). `pixels`:
    `np.asarray(im)` where the caller has it (it costs a copy of the image)."""
    if im.size == size or im.mode not in ("L", "RGB"):
        return im.resize(size, FILTERS[method][1])
    _state["resized"] += 1
    if _state["resized"] <= COMPILE_AFTER or not HAVE_NUMBA or compiled_kernels() is None:
        return im.resize(size, FILTERS[method][1])
    pixels = np.asarray(im) if pixels is None else pixels
    out = resize_array(pixels if pixels.ndim == 3 else pixels[:, :, None], size, method)
    return Image.fromarray(out if im.mode == "RGB" else out[:, :, 0], im.mode)
