"""JSON and YAML documents read from files, parsed with limits, and data addresses read back from them.

- `parse_json` / `read_json`: a size cap, a nesting-depth cap (the C parser's own recursion is
  bounded; a document nested 2000 deep is one line, not a RecursionError), `NaN` / `Infinity` refused
  unless the caller's own writer may write them, then the caller's schema (`trust.schema`).
- `read_yaml`: PyYAML's safe loader only (no Python objects), no aliases (`*a` would let a
  small file expand), the same size and depth caps.
- `stored_address`: a data address read back from a file is used only when it is a plain local
  path or an http(s)/s3/gs URL; a `pipe:` command (or any other scheme, which a handler may run)
  is honoured only when typed on the command line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from dist_train.errors import UserError

from .schema import Spec, check

MAX_JSON_BYTES = 64 << 20  # progress.json of a 300M-sample epoch holds ~50 MB of `done` bits
MAX_YAML_BYTES = 1 << 20
MAX_DEPTH = 64


def too_deep(doc: Any, max_depth: int) -> bool:
    """Whether lists and objects nest more than `max_depth` levels, walked without recursion."""
    stack = [(doc, 1)] if isinstance(doc, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def parse_json(data: bytes | str, source: str, *, spec: Spec | None = None, hint: str = "",
               max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH, allow_nonfinite: bool = False) -> Any:
    """A JSON document (`source` names it in errors), checked against `spec` when given."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tail = f": {hint}" if hint else ""
    if len(raw) > max_bytes:
        raise UserError(f"{source}: {len(raw):,} bytes, expected at most {max_bytes:,}{tail}")
    deep = f"{source}: nested more than {max_depth} levels, expected at most {max_depth}{tail}"
    try:
        kw = {} if allow_nonfinite else {"parse_constant": _refuse_constant}
        doc = json.loads(raw.decode("utf-8"), **kw)  # the C parser's recursion is bounded: RecursionError
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}){tail}") from None
    except RecursionError:
        raise UserError(deep) from None
    except ValueError as e:
        raise UserError(f"{source}: not valid JSON ({' '.join(str(e).split())[:200]}){tail}") from None
    if too_deep(doc, max_depth):
        raise UserError(deep)
    return check(doc, spec, source, hint) if spec is not None else doc


def read_capped(path: str | os.PathLike, max_bytes: int, hint: str = "") -> bytes:
    """A file's bytes, refused before reading when it is larger than `max_bytes` or not a regular file."""
    path = Path(path)
    tail = f": {hint}" if hint else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{path}: not a regular file{tail}")
            if st.st_size > max_bytes:
                raise UserError(f"{path}: {st.st_size:,} bytes, expected at most {max_bytes:,}{tail}")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}){tail}") from None
    if len(data) > max_bytes:
        raise UserError(f"{path}: more than {max_bytes:,} bytes, expected at most {max_bytes:,}{tail}")
    return data


def read_json(path: str | os.PathLike, spec: Spec | None = None, *, hint: str = "", max_bytes: int = MAX_JSON_BYTES,
              allow_nonfinite: bool = False) -> Any:
    """A JSON file parsed by `parse_json`; every problem is one line naming the file."""
    return parse_json(read_capped(path, max_bytes, hint), str(path), spec=spec, hint=hint, max_bytes=max_bytes,
                      allow_nonfinite=allow_nonfinite)


class _Refused(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader (plain data only) without aliases and with a nesting cap."""

    max_depth = MAX_DEPTH

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            raise _Refused("aliases (*name) are not accepted")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > self.max_depth:
                raise _Refused(f"nested more than {self.max_depth} levels, expected at most {self.max_depth}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_yaml(path: str | os.PathLike, spec: Spec | None = None, *, hint: str = "",
              max_bytes: int = MAX_YAML_BYTES) -> Any:
    """A YAML file through the bounded safe loader, then `spec`; one line per problem."""
    data = read_capped(path, max_bytes, hint)
    tail = f": {hint}" if hint else ""
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}){tail}") from None
    except _Refused as e:
        raise UserError(f"{path}: {e}{tail}") from None
    except (yaml.YAMLError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}{tail}") from None
    return check(doc, spec, str(path), hint) if spec is not None else doc


# --------------------------------------------------------------------- addresses read from files
STORED_SCHEMES = ("http", "https", "s3", "gs")


def is_plain_address(address: str) -> bool:
    """A local path (no scheme, no control characters) or an http(s)/s3/gs URL."""
    if not address or any(ord(c) < 32 for c in address):
        return False
    scheme = urlparse(address).scheme
    if len(scheme) <= 1:  # none, or a drive letter
        return not address.startswith("pipe:")
    return scheme.lower() in STORED_SCHEMES and "://" in address


def stored_address(address: Any, source: str | os.PathLike, flag: str = "--data", instead: str | None = None) -> str:
    """`address` read back from the file `source`: returned when `is_plain_address`, else one line
    saying which file holds it and how to pass it on the command line instead (`flag`, or the
    words `instead` where the command has no such flag)."""
    text = str(address) if isinstance(address, (str, os.PathLike)) else None
    if text is None or not is_plain_address(text):
        shown = repr(text if text is not None else address)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        how = instead or f"pass it explicitly with {flag} ADDRESS if you trust it"
        raise UserError(f"{source}: data address {shown} is not a local path or an http(s)/s3/gs URL; an "
                        f"address read from a file never runs a command: {how}")
    return text
