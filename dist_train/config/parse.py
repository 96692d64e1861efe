"""Flags and YAML -> a validated Config; the resolved config back to YAML."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from dist_train.errors import ArgParser, UserError, atomic_write_text, did_you_mean
from dist_train.trust.files import read_yaml

from .ranges import check_fields
from .sections import SECTION_OF, SECTIONS, Config

CHOICES = {"mixed_precision": (None, "no", "bf16", "fp16"), "loss": ("ce", "focal", "f1"),
           "class_weights": (None, "auto"), "crop": ("random", "center"), "sampler": ("none", "balanced", "sqrt")}
DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'90s', '45m', '2h', '1h30m', '600' -> seconds; UserError for anything else or zero."""
    m = DURATION.match(str(text).strip().lower())
    if not m or not any(m.groups()):
        raise UserError(f"--time-limit {text}: expected a duration like 90s, 45m, 2h or 1h30m")
    h, mins, secs = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mins * 60 + secs
    if seconds <= 0:
        raise UserError(f"--time-limit {text}: expected a positive duration")
    return seconds


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _none_or(typ: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else typ(text)

    parse.__name__ = typ.__name__
    return parse


def _add_field(group: Any, f: dataclasses.Field) -> None:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    kw: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default})", "dest": f.name}
    if f.type in ("bool",) or f.type is bool:
        group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        return
    if "nargs" in f.metadata:
        kw.update(nargs=f.metadata["nargs"], type=f.metadata["type"], metavar=("MIN", "MAX"))
    elif f.name == "unfreeze":
        kw.update(type=str, metavar="STAGES")
    else:
        base = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        kw.update(type=_none_or(base) if "None" in str(f.type) else base)
    group.add_argument(_flag(f.name), **kw)


def build_parser() -> argparse.ArgumentParser:
    """Every field becomes a flag, grouped by section; defaults are left unset so YAML can fill them."""
    p = ArgParser(
        prog="dist_train/run.py",
        description="Train a timm model on dist_train shards (DDP through `accelerate launch`).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of config values; flags override it")
    for name, section in SECTIONS.items():
        group = p.add_argument_group(name)
        for f in fields(section):
            _add_field(group, f)
    return p


def load_yaml(path: str) -> dict:
    """A YAML mapping of flat config keys (`lr: 0.01`; '-' or '_' in names)."""
    try:
        data = read_yaml(path) or {}  # the bounded safe loader: plain data, no aliases, size and depth limits
    except UserError as e:
        raise UserError(f"--config {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of config keys")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in SECTION_OF:
            close = did_you_mean(name, SECTION_OF)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"--config {path}: unknown key '{key}' ({hint}see dist_train/run.py --help)")
        out[name] = value
    return out


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """defaults < YAML < flags, then validated."""
    return config_from_args(vars(build_parser().parse_args(argv)))


def config_from_args(args: dict[str, Any]) -> Config:
    """The parsed flags of `build_parser` (a tool may add its own and take them out first) over
    the YAML of --config, validated."""
    args = dict(args)
    values = load_yaml(args.pop("config")) if "config" in args else {}
    values.update(args)
    try:
        cfg = Config.from_flat(values)
    except TypeError as e:
        raise UserError(f"config: {e}") from None
    return validate(cfg)


def _check_augment(v: dict) -> None:
    lo, hi = v["scale"]
    if not 0 < lo <= hi <= 1:
        raise UserError(f"--scale {lo} {hi}: expected 0 < MIN <= MAX <= 1")
    lo, hi = v["ratio"]
    if not 0 < lo <= hi < math.inf:
        raise UserError(f"--ratio {lo} {hi}: expected finite numbers 0 < MIN <= MAX")
    if v["color_jitter"] and v["aa"]:
        raise UserError(f"--color-jitter {v['color_jitter']} with --aa {v['aa']}: timm applies one or the other "
                        "(its auto-augment policies vary colour themselves); pass one of them")


def validate(cfg: Config) -> Config:
    """Reject values no run could use, with one line each; returns `cfg` unchanged."""
    v = cfg.flat()
    if not v["data"]:
        raise UserError("--data is required: a shard folder written by `python -m dist_train.shard`")
    check_fields(v)
    for name, allowed in CHOICES.items():
        if v[name] not in allowed:
            raise UserError(f"{_flag(name)} {v[name]}: expected {', '.join(str(a) for a in allowed if a)}")
    if v["secure"] and str(v["data"]).startswith("pipe:"):
        raise UserError(f"--data {v['data']}: pipe: URLs run shell commands and are refused with --secure")
    _check_augment(v)
    if v["time_limit"] is not None:
        parse_duration(v["time_limit"])
    if v["resume"] not in ("auto", "none") and not Path(v["resume"]).is_dir():
        raise UserError(f"--resume {v['resume']}: expected auto, none or a checkpoint folder")
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.flat(), sort_keys=False))
