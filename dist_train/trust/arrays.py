""".npz files (`*.probs.npz`, `CV/oof.probs.npz`): every array's shape and dtype checked before any
is inflated.

An npz is a zip of .npy members. Each member's .npy header (dtype, shape) is read from the zip
without inflating the data, refused when it holds Python objects (`allow_pickle=False` would
refuse them later, after reading), and its declared bytes must equal the member's uncompressed
size; the declared sizes together are capped, and the caller's `ArraySpec`s and cross-check
(`rule`) see every shape first. So a 3 MB compressed file declaring 10 GB is one line before a
byte is allocated, and what `np.load` then inflates is exactly what was checked.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from dist_train.errors import UserError

MAX_NPZ_BYTES = 2 << 30  # all arrays of one file, uncompressed
MAX_MEMBERS = 64
MAX_NPY_HEADER = 10_000  # numpy's own default limit


@dataclass(frozen=True)
class ArraySpec:
    """What one array may be: numpy dtype kinds (`"f"`, `"iu"`, `"U"`, `"b"`), its number of
    dimensions, the largest item (bytes: 4 per character for `U`) and the most elements."""

    kinds: str
    ndim: int
    max_itemsize: int = 8
    max_size: int = 1 << 31


@dataclass(frozen=True)
class Declared:
    shape: tuple[int, ...]
    dtype: np.dtype


def _member_header(z: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> Declared:
    fmt = np.lib.format
    try:
        with z.open(info) as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _fortran, dtype = read(f, max_header_size=MAX_NPY_HEADER)
            header_bytes = f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, zlib.error) as e:
        raise UserError(f"{source}: member {info.filename}: not a .npy array ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:150]})") from None
    if dtype.hasobject:
        raise UserError(f"{source}: member {info.filename}: holds Python objects (dtype {dtype}); refused, "
                        "nothing read from a file is unpickled")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise UserError(f"{source}: member {info.filename}: bad shape {shape}")
    declared = math.prod(shape) * dtype.itemsize
    if info.file_size != header_bytes + declared:
        raise UserError(f"{source}: member {info.filename}: declares {declared:,} bytes of {dtype} {shape}, the zip "
                        f"says {info.file_size - header_bytes:,} (crafted or damaged)")
    return Declared(tuple(shape), dtype)


def npz_headers(path: str | os.PathLike, source: str | None = None) -> dict[str, Declared]:
    """name -> declared shape and dtype of every array of an npz, read without inflating the data."""
    source = source or str(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if len(members) > MAX_MEMBERS:
                raise UserError(f"{source}: {len(members)} arrays, expected at most {MAX_MEMBERS}")
            out, total = {}, 0
            for info in members:
                if not info.filename.endswith(".npy") or "/" in info.filename:
                    raise UserError(f"{source}: member {info.filename!r} is not a .npy array of an npz file")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise UserError(f"{source}: member {info.filename}: compression {info.compress_type} refused "
                                    "(expected stored or deflated, as numpy writes)")
                d = _member_header(z, info, source)
                total += math.prod(d.shape) * d.dtype.itemsize
                if total > MAX_NPZ_BYTES:
                    raise UserError(f"{source}: arrays declaring over {MAX_NPZ_BYTES:,} bytes uncompressed (member "
                                    f"{info.filename}: {d.dtype} {d.shape}); refused before inflating")
                out[info.filename[:-4]] = d
            return out
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise UserError(f"{source}: not an npz file ({type(e).__name__}: {e})") from None


def _check_spec(source: str, name: str, d: Declared, spec: ArraySpec) -> None:
    ok = d.dtype.kind in spec.kinds and len(d.shape) == spec.ndim and d.dtype.itemsize <= spec.max_itemsize \
        and math.prod(d.shape) <= spec.max_size
    if not ok:
        kinds = {"f": "float", "i": "int", "u": "uint", "U": "str", "b": "bool"}
        want = "/".join(kinds.get(k, k) for k in spec.kinds)
        raise UserError(f"{source}: array {name!r} is {d.dtype} {d.shape}; expected {spec.ndim}-d {want} (items of at "
                        f"most {spec.max_itemsize} bytes, at most {spec.max_size:,} elements)")


def load_npz(path: str | os.PathLike, specs: Mapping[str, ArraySpec], required: tuple[str, ...], *,
             rule: Callable[[dict[str, Declared]], str | None] | None = None, hint: str = "") -> dict[str, np.ndarray]:
    """The arrays `specs` names (those present; `required` must be), after `npz_headers` and the
    specs and `rule` (declared shapes -> None or what is wrong) accepted every declaration."""
    source = str(path)
    tail = f"; {hint}" if hint else ""
    if not Path(path).is_file():
        raise UserError(f"{source}: no such file{tail}")
    declared = npz_headers(path)
    missing = [k for k in required if k not in declared]
    if missing:
        raise UserError(f"{source}: no {', '.join(missing)} array{tail}")
    for name, spec in specs.items():
        if name in declared:
            _check_spec(source, name, declared[name], spec)
    problem = rule(declared) if rule else None
    if problem:
        raise UserError(f"{source}: {problem}{tail}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in specs if name in declared}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{source}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:150]}){tail}") from None
