"""safetensors files (best/model.safetensors, a checkpoint's model.safetensors), checked before
safetensors maps them.

The format: 8 bytes little-endian header length N, N bytes of JSON header (`name -> {dtype,
shape, data_offsets}` and an optional `__metadata__` of strings), then the tensors' bytes. The
header length, the header as JSON (through `trust.files.parse_json`: size, depth), every dtype,
shape and offset pair are checked against each other and against the file's size, and the
tensors must tile the data exactly; a truncated or crafted file is one line, never a
SafetensorError or a huge allocation.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

from dist_train.errors import UserError

from .files import parse_json
from .schema import Dict, Int, List, Str

MAX_HEADER = 100 << 20  # safetensors' own limit
MAX_TENSORS = 1_000_000
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ENTRY = Dict(fields={"dtype": Str(max_len=16, choices=tuple(DTYPE_BYTES)),
                      "shape": List(Int(0, 1 << 40), 16),
                      "data_offsets": List(Int(0, None), 2, 2, "2 (begin, end)")},
              required=("dtype", "shape", "data_offsets"), values=None)
HEADER = Dict(fields={"__metadata__": Dict(values=Str(max_len=1 << 16), keys=Str(max_len=1024))},
              values=_ENTRY, keys=Str(max_len=1024), max_keys=MAX_TENSORS)
HINT = "expected a safetensors file written by dist_train (or safetensors.torch.save_file)"


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """The checked header of a safetensors file (see the module doc); one UserError line if bad."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > MAX_HEADER or 8 + n > size:
                why = ("shorter than the 8-byte header length" if n is None else
                       f"header length {n:,} {'over the limit' if n > MAX_HEADER else 'beyond the end'} "
                       f"of a {size:,}-byte file")
                raise UserError(f"{path}: {why} (truncated or not safetensors): {HINT}")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}): {HINT}") from None
    if not raw.lstrip().startswith(b"{"):
        raise UserError(f"{path}: header is not a JSON object: {HINT}")
    header = parse_json(raw, f"{path}: header", spec=HEADER, hint=HINT, max_bytes=MAX_HEADER)
    _check_layout(path, header, size - 8 - n)
    return header


def _check_layout(path: Path, header: dict, data_bytes: int) -> None:
    """Every tensor's bytes match its dtype and shape, and the tensors tile the data exactly."""
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        want = math.prod(e["shape"]) * DTYPE_BYTES[e["dtype"]]
        if end < begin or end - begin != want:
            raise UserError(f"{path}: tensor {name!r}: data_offsets {begin}..{end} hold {end - begin:,} bytes, its "
                            f"{e['dtype']} shape {e['shape']} needs {want:,}: {HINT}")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise UserError(f"{path}: tensor {name!r} starts at byte {begin:,} of the data, expected {at:,} "
                            f"(tensors overlap or leave a gap): {HINT}")
        at = end
    if at != data_bytes:
        raise UserError(f"{path}: the tensors end at byte {at:,} of the data, the file holds {data_bytes:,} "
                        f"(truncated or padded): {HINT}")


def load_safetensors(path: str | os.PathLike) -> dict:
    """The tensors of a checked safetensors file, on the CPU."""
    import safetensors.torch

    check_safetensors(path)
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError; the file changed under us, or is odd
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {first}): {HINT}") from None
