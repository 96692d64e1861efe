"""The type and allowed range of every config field, checked whether it came from a flag or YAML.

A config.yaml may come from someone else, and a flag may be mistyped: each value is checked to
be of its field's type (YAML gives `lr: abc` or `epochs: [1]` as readily as numbers), finite,
and inside the range a run can use, with one line naming the flag, the value and the range.
`--workers` is bounded by the machine: each worker is a process, so hundreds of them exhaust
memory before the first batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from dist_train.errors import UserError
from dist_train.system import usable_cpus

from .sections import SECTIONS

INT_MAX = 2**31 - 1
WORKERS_PER_CPU, WORKERS_FLOOR = 4, 8


def max_workers() -> int:
    """The most data-loader workers a rank may start: a few per usable core, never fewer than 8."""
    return max(WORKERS_FLOOR, WORKERS_PER_CPU * usable_cpus())


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """lo/hi: bounds (None: only finite); lo_open/hi_open: the bound itself is excluded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    why: str = ""  # said after the range, e.g. how a machine-tied bound was derived

    def holds(self, x: float) -> bool:
        try:
            if not math.isfinite(float(x)):  # an int too large for a float is out of every range too
                return False
        except OverflowError:
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def text(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        if lo and hi and self.integer and not self.lo_open and not self.hi_open:
            bounds = f"in {_num(self.lo)}..{_num(self.hi)}"
        else:
            bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{kind} {bounds}{self.why}".rstrip()


PROBABILITY = Range(0, 1)
FRACTION_BELOW_1 = Range(0, 1, hi_open=True)
POSITIVE_INT = Range(1, INT_MAX, integer=True)
COUNT = Range(0, INT_MAX, integer=True)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)

RANGES: dict[str, Range] = {
    # data
    "workers": COUNT,  # the upper bound is the machine's: see `_range`
    # model
    "img_size": Range(1, 8192, integer=True),
    "drop": FRACTION_BELOW_1, "drop_path": FRACTION_BELOW_1, "model_ema_decay": FRACTION_BELOW_1,
    # task
    "smoothing": FRACTION_BELOW_1,
    # augment
    "hflip": PROBABILITY, "vflip": PROBABILITY, "color_jitter": Range(0, 1), "reprob": PROBABILITY, "crop_pct": Range(0, 1, lo_open=True),
    "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE,
    # optim
    "epochs": POSITIVE_INT, "batch_size": Range(1, 2**20, integer=True), "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE, "momentum": FRACTION_BELOW_1, "warmup_epochs": NON_NEGATIVE,
    "warmup_lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "grad_accum_steps": POSITIVE_INT, "clip_grad": POSITIVE,
    # stages
    "layer_decay": Range(0, 1, lo_open=True), "unfreeze_warmup": COUNT,
    # checkpoint
    "checkpoint_every": POSITIVE_INT, "keep_checkpoints": POSITIVE_INT,
    # runtime
    "seed": Range(0, 2**32 - 1, integer=True), "max_steps": POSITIVE_INT, "eval_every": POSITIVE_INT,
    "log_every": POSITIVE_INT, "dist_timeout": POSITIVE_INT, "max_bad_fraction": PROBABILITY,
    "max_bad_steps": POSITIVE_INT, "patience": POSITIVE_INT, "debug_steps": POSITIVE_INT, "overfit_batches": COUNT,
}
# field name -> its annotation ("int", "float | None", "str", "bool", "list", "Any")
TYPES: dict[str, str] = {f.name: str(f.type) for cls in SECTIONS.values() for f in fields(cls)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _range(name: str) -> Range:
    if name == "workers":
        n = max_workers()
        return Range(0, n, integer=True, why=f" ({WORKERS_PER_CPU} per usable CPU core, {usable_cpus()} here, "
                                              f"at least {WORKERS_FLOOR})")
    return RANGES[name]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(name: str, value: Any, typ: str) -> None:
    """Strings, bools and lists where the field holds one (flags always do; YAML may not)."""
    if value is None and ("None" in typ or typ == "Any"):
        return
    base = typ.split(" ")[0]
    ok = {"str": isinstance(value, str), "bool": isinstance(value, bool), "list": isinstance(value, list),
          "int": _is_number(value), "float": _is_number(value)}.get(base, True)
    if not ok:
        what = {"str": "a string", "bool": "true or false", "list": "a list", "int": "an integer",
                "float": "a number"}[base]
        raise UserError(f"{_flag(name)} {value!r}: expected {what}{' or none' if 'None' in typ else ''}")


def check_fields(values: dict[str, Any]) -> None:
    """Every field of the flat config: its type, and for numbers a finite value in its range."""
    for name, value in values.items():
        typ = TYPES[name]
        _check_type(name, value, typ)
        if name not in RANGES or value is None:
            continue
        r = _range(name)
        if r.integer and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"{_flag(name)} {value!r}: expected {r.text()}")
        if not r.holds(value):
            none = " (or none)" if "None" in typ else ""
            raise UserError(f"{_flag(name)} {value}: expected {r.text()}{none}")
