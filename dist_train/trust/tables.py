"""Index tables of raw image sets (`train.csv`, `info.csv`) and the names they and folders give.

- `read_table`: a UTF-8 csv (a BOM is fine), read capped and never from a FIFO, each row with the
  line it ends on in the file (blank lines and quoted line breaks counted), a row with fewer fields
  than the header or with more non-empty ones refused, every problem one line naming the line.
- `index_path`: a path read from such a table, made canonical (`a/`, `./a`, `a//b` -> `a`, `a/b`:
  one image, one key) or None when it would leave its folder (absolute, `..`, a drive, empty).
- `utf8_name`: a file name from a folder must be UTF-8 (sample keys, csv rows and JSON are).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import PurePosixPath, PureWindowsPath
from typing import Sequence

from dist_train.errors import UserError

from .files import read_capped

MAX_TABLE_BYTES = 64 << 20  # a row per image: far more than any real index (the competition's: 200 KB)


def read_table(path: str | os.PathLike, columns: Sequence[str], layout_hint: str = "",
               max_bytes: int = MAX_TABLE_BYTES) -> list[tuple[int, dict[str, str]]]:
    """(line, row) pairs, values stripped (ids keep their leading zeros); UserError on a missing,
    special (a FIFO is not opened for reading) or unreadable file, a missing column, a row whose
    field count does not fit the header, or no rows. `layout_hint`: what a csv without the columns
    may have been meant for instead (added to the missing-column line)."""
    expected = f"expected a UTF-8 csv with columns {','.join(columns)}"
    where = str(path)
    if not os.path.lexists(path):
        raise UserError(f"{where}: not found; {expected}")
    data = read_capped(path, max_bytes, hint=expected)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{where}: line {line}: unreadable ({e}); {expected}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"{where}: empty; {expected}")
        missing = [c for c in columns if c not in (header or [])]
        if missing:
            raise UserError(f"{where}: missing column(s) {','.join(missing)}; {expected}{layout_hint}")
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) < len(header) or any(f.strip() for f in fields[len(header):]):
                raise UserError(f"{where}: line {reader.line_num}: {len(fields)} fields, the header has "
                                f"{len(header)} (an unquoted comma, or a value missing?); {expected}")
            rows.append((reader.line_num, {k: v.strip() for k, v in zip(header, fields)}))
    except csv.Error as e:  # a field over csv's 128 KB limit, a NUL byte
        raise UserError(f"{where}: line {reader.line_num}: unreadable ({e}); {expected}") from None
    if not rows:
        raise UserError(f"{where}: no rows; {expected}")
    return rows


def index_path(rel: str) -> str | None:
    """The canonical relative posix form of a path read from an index table, or None when it names
    nothing below its folder: empty, absolute, with a drive or a `..` part."""
    if not rel or rel.startswith(("/", "\\")):
        return None
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if windows.drive or windows.root or ".." in posix.parts or ".." in windows.parts:
        return None
    canonical = posix.as_posix()  # drops '.' parts, repeated and trailing slashes
    return None if canonical == "." else canonical


def utf8_name(path: str | os.PathLike, where: str) -> None:
    """UserError when a name read from the file system is not UTF-8 (Python keeps its bytes as
    surrogates, which no key, csv row or JSON document can hold)."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        raise UserError(f"{where}: the file name '{shown}' is not UTF-8; expected UTF-8 names (rename it)") from None
