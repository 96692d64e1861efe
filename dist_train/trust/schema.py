"""A small declarative schema for documents read from files: types, ranges, lengths, required keys.

A spec checks a parsed value and returns it (converted where it says so: an Int given as 3.0 is
refused, never rounded); the first violation is an `Invalid` naming the field (a dotted path:
`splits.train.shard_lengths[3]`) and what was expected. `check` turns it into one `UserError`
line naming the file too, which is what every reader in `dist_train.trust` reports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from dist_train.errors import UserError


class Invalid(Exception):
    """A value that does not fit its spec: where (`field`), what was expected, what was found."""

    def __init__(self, where: str, expected: str, got: Any) -> None:
        super().__init__(f"{where or 'the document'}: expected {expected}, got {_show(got)}")
        self.where, self.expected = where, expected


MISSING = type("Missing", (), {"__repr__": lambda self: "nothing"})()  # a required key that is absent


def _show(v: Any) -> str:
    """A found value in a few characters (a crafted one can be huge)."""
    if isinstance(v, Mapping):
        return f"an object of {len(v)} keys"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _at(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


class Spec:
    """Base: `check(value, where)` returns the value or raises Invalid."""

    def check(self, v: Any, where: str) -> Any:  # pragma: no cover - every spec overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    lo: int | None = 0
    hi: int | None = None

    def check(self, v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or (self.lo is not None and v < self.lo) or \
                (self.hi is not None and v > self.hi):
            raise Invalid(where, f"an integer {_range(self.lo, self.hi)}", v)
        return v


@dataclass(frozen=True)
class Float(Spec):
    """A finite number (integers accepted) in [lo, hi]; `above`: lo itself excluded."""

    lo: float | None = None
    hi: float | None = None
    above: bool = False

    def check(self, v: Any, where: str) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (self.lo is None or (v > self.lo if self.above else v >= self.lo))
        ok = ok and (self.hi is None or v <= self.hi)
        if not ok:
            lo = None if self.lo is None else f"{'>' if self.above else '>='} {self.lo:g}"
            hi = None if self.hi is None else f"<= {self.hi:g}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            raise Invalid(where, "a finite number" + (f" {bounds}" if bounds else ""), v)
        return float(v)


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}" if hi is not None else ""


@dataclass(frozen=True)
class Str(Spec):
    max_len: int = 1024
    min_len: int = 0
    pattern: str | None = None  # full match
    choices: tuple[str, ...] | None = None

    def check(self, v: Any, where: str) -> str:
        if not isinstance(v, str) or not self.min_len <= len(v) <= self.max_len:
            what = "a non-empty string" if self.min_len else "a string"
            raise Invalid(where, f"{what} of at most {self.max_len} characters", v)
        if self.choices is not None and v not in self.choices:
            raise Invalid(where, "one of " + ", ".join(self.choices), v)
        if self.pattern is not None and not re.fullmatch(self.pattern, v):
            raise Invalid(where, f"a string matching {self.pattern}", v)
        return v


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            raise Invalid(where, "true or false", v)
        return v


@dataclass(frozen=True)
class Opt(Spec):
    """`inner` or null."""

    inner: Spec

    def check(self, v: Any, where: str) -> Any:
        if v is None:
            return None
        try:
            return self.inner.check(v, where)
        except Invalid as e:
            raise Invalid(e.where, f"{e.expected} or null", v) from None


@dataclass(frozen=True)
class Either(Spec):
    """The first of `options` that fits; `expected` says what they are together."""

    options: tuple[Spec, ...]
    expected: str

    def check(self, v: Any, where: str) -> Any:
        for option in self.options:
            try:
                return option.check(v, where)
            except Invalid:
                continue
        raise Invalid(where, self.expected, v)


@dataclass(frozen=True)
class Anything(Spec):
    """Any parsed value (the parser's own size and depth limits bound it)."""

    def check(self, v: Any, where: str) -> Any:
        return v


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_len: int = 1_000_000
    min_len: int = 0
    length: str | None = None  # what the length should be, in words, when min_len == max_len

    def check(self, v: Any, where: str) -> list:
        if not isinstance(v, list) or not self.min_len <= len(v) <= self.max_len:
            n = self.length or (f"{self.min_len}..{self.max_len}" if self.min_len else f"at most {self.max_len:,}")
            raise Invalid(where, f"a list of {n} items", v)
        return [self.item.check(x, _at(where, i)) for i, x in enumerate(v)]


@dataclass(frozen=True)
class Dict(Spec):
    """An object: `fields` (checked when present; `required` ones must be), other keys checked by
    `keys` and `values` (None: other keys are refused), at most `max_keys` keys."""

    fields: Mapping[str, Spec] = field(default_factory=dict)
    required: Sequence[str] = ()
    values: Spec | None = Anything()
    keys: Str = Str(max_len=256)
    max_keys: int = 10_000

    def check(self, v: Any, where: str) -> dict:
        if not isinstance(v, dict):
            raise Invalid(where, "an object", v)
        if len(v) > self.max_keys:
            raise Invalid(where, f"an object of at most {self.max_keys:,} keys", v)
        missing = next((k for k in self.required if k not in v), None)
        if missing is not None:
            raise Invalid(_at(where, missing), "a value (required)", MISSING)
        out = {}
        for k, x in v.items():
            spec = self.fields.get(k)
            if spec is None:
                if self.values is None:
                    raise Invalid(_at(where, str(k)), "no such key (unknown)", x)
                self.keys.check(k, f"{where} key" if where else "key")
                spec = self.values
            out[k] = spec.check(x, _at(where, k))
        return out


@dataclass(frozen=True)
class Where(Spec):
    """`inner`, then `rule(value)` -> None, or what was expected (a cross-field check)."""

    inner: Spec
    rule: Callable[[Any], tuple[str, str] | None]  # -> (field, expected) when broken

    def check(self, v: Any, where: str) -> Any:
        v = self.inner.check(v, where)
        broken = self.rule(v)
        if broken is not None:
            name, expected = broken
            raise Invalid(_at(where, name) if name else where, expected, _pick(v, name))
        return v


def _pick(v: Any, dotted: str) -> Any:
    for part in filter(None, dotted.split(".")):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def check(doc: Any, spec: Spec, source: str, hint: str = "") -> Any:
    """`doc` checked against `spec`; a violation is one UserError: `SOURCE: FIELD: expected ..., got ...`."""
    try:
        return spec.check(doc, "")
    except Invalid as e:
        raise UserError(f"{source}: {e}" + (f": {hint}" if hint else "")) from None
