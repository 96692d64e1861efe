"""Run folders, read back: config.yaml, run.json, progress.json, summary.json and best/ (config.json,
metrics.json), each parsed by `trust.files` against the schema here.

A run folder may come from someone else, so each file is checked for the types and ranges its
readers rely on before any of it is used: `"plan": "x"` in progress.json, `"model_args": 5` in
best/config.json or a list where a model name belongs are one line naming the file and the
field. What the files do not constrain (other config keys) stays plain data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dist_train.errors import UserError

from .files import MAX_JSON_BYTES, read_json, read_yaml
from .schema import Bool, Dict, Either, Float, Int, List, Opt, Spec, Str, Where
from .shardinfo import MAX_CLASSES, MAX_SAMPLES

RUN_HINT = "expected a run folder written by dist_train/run.py"
PROGRESS_HINT = "expected a checkpoint written by dist_train/run.py"
MAX_IMG_SIZE = 16384
MAX_SMALL_JSON = 16 << 20  # run.json, summary.json, best/config.json, best/metrics.json

_SCALAR = Either((Bool(), Int(None, None), Float(), Str(max_len=4096), Opt(Bool())),
                 "a number, string, true/false or null")
_VALUE = Either((_SCALAR, List(_SCALAR, 64)), "a number, string, true/false, null or a list of them")

RUN_CONFIG: Spec = Dict(fields={
    "data": Str(max_len=4096, min_len=1, pattern=r"[^\x00-\x1f]*"),
    "model": Str(max_len=512, min_len=1),
    "img_size": Opt(Int(1, MAX_IMG_SIZE)),
    "head": Str(max_len=64),
    "crop_pct": Opt(Float(0, 1, above=True)),
    "train_split": Opt(Str(max_len=128)),
    "fold": Opt(Either((Int(0, 10_000), Str(max_len=16)), "a fold number or all")),
    "task": Opt(Str(max_len=256)),
}, values=_VALUE, keys=Str(max_len=64, pattern=r"[A-Za-z_][A-Za-z0-9_-]*"), max_keys=500)


def _same_length(a: str, b: str) -> Any:
    def rule(doc: dict) -> tuple[str, str] | None:
        if a in doc and b in doc and len(doc[a]) != (doc[b] if isinstance(doc[b], int) else len(doc[b])):
            return a, f"as many entries as {b} says ({doc[b] if isinstance(doc[b], int) else len(doc[b])})"
        return None

    return rule


_CLASSES = List(Str(max_len=1024), MAX_CLASSES)
RUN_JSON: Spec = Where(Dict(fields={
    "model": Str(max_len=512, min_len=1), "num_classes": Int(1, MAX_CLASSES), "head": Str(max_len=64),
    "classes": _CLASSES, "img_size": Int(1, 1 << 16),
}, required=("model", "num_classes", "classes")), _same_length("classes", "num_classes"))

_BASE64 = r"[A-Za-z0-9+/]*={0,2}"
_FILE_ENTRY = Dict(fields={"size": Int(0, None), "sha256": Str(max_len=64, pattern=r"[0-9a-f]{64}")},
                   required=("size", "sha256"), values=None)
PROGRESS: Spec = Dict(fields={
    "epoch": Int(0, 10**9), "batch": Int(0, MAX_SAMPLES), "samples": Int(0, MAX_SAMPLES),
    "plan": Opt(Dict(fields={"world": Int(1, 1 << 20), "workers": Int(1, 1 << 16), "batch": Int(1, 1 << 24),
                             "done": Opt(Str(max_len=MAX_JSON_BYTES, pattern=_BASE64))},
                     required=("world", "workers", "batch"), values=None)),
    "step": Int(0, 10**12), "updates": Int(0, 10**12), "best_f1": Float(-1, 1), "stale": Int(0, 10**12),
    "stage": Int(0, 1000), "stage_start": Int(0, 10**12),
    "files": Dict(values=_FILE_ENTRY, keys=Str(max_len=1024), max_keys=100_000),
    # the best evaluation so far (train/evaluator.py): where it was, whose weights, its scores
    "best": Opt(Dict(fields={"epoch": Int(0, 10**9), "step": Int(0, 10**12), "weights": Str(choices=("model", "ema")),
                             "val_macro_f1": Float(-1, 1), "val_acc": Float(0, 1), "val_loss": Opt(Float())},
                     required=("epoch", "step", "weights"), values=None)),
}, values=None)

SUMMARY: Spec = Dict(fields={"finished": Bool()})
METRICS: Spec = Dict()

_MEAN = List(Float(), 4, 1, "1..4")
MODEL_CONFIG: Spec = Where(Dict(fields={
    "architecture": Str(max_len=256, min_len=1),
    "num_classes": Int(1, MAX_CLASSES),
    "num_features": Int(0, None),
    "model_args": Dict(fields={"img_size": Int(1, MAX_IMG_SIZE)}, values=_VALUE, keys=Str(max_len=64), max_keys=64),
    "label_names": _CLASSES,
    "pretrained_cfg": Where(Dict(fields={
        "input_size": List(Int(1, MAX_IMG_SIZE), 3, 3, "3 (channels, height, width)"),
        "mean": _MEAN, "std": List(Float(0, None, above=True), 4, 1, "1..4"),
        "crop_pct": Float(0, 4, above=True), "interpolation": Str(max_len=32), "crop_mode": Str(max_len=32),
        "label_names": _CLASSES,
    }, required=("input_size", "mean", "std", "crop_pct")), _same_length("std", "mean")),
    "dist_train": Dict(fields={"head": Str(max_len=64), "model_name": Str(max_len=512)}),
}, required=("architecture", "num_classes", "pretrained_cfg")), _same_length("label_names", "num_classes"))


def read_run_config(run: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """RUN/config.yaml: a flat mapping of config keys; `required` keys must be there."""
    path = Path(run) / "config.yaml"
    cfg = read_yaml(path, RUN_CONFIG, hint=RUN_HINT)
    missing = next((k for k in required if cfg.get(k) in (None, "")), None)
    if missing is not None:
        raise UserError(f"{path}: {missing}: expected a value (required): {RUN_HINT}")
    return cfg


def read_run_json(path: str | os.PathLike) -> dict:
    """RUN/run.json: model, num_classes, head, classes, img_size (runs before it: none)."""
    return read_json(path, RUN_JSON, hint=RUN_HINT, max_bytes=MAX_SMALL_JSON)


def read_progress(path: str | os.PathLike) -> dict:
    """A checkpoint's progress.json: the run's position and the checkpoint's file list."""
    return read_json(path, PROGRESS, hint=PROGRESS_HINT)


def read_summary(path: str | os.PathLike) -> dict:
    """RUN/summary.json (its own writer may record non-finite losses)."""
    return read_json(path, SUMMARY, hint=RUN_HINT, max_bytes=MAX_SMALL_JSON, allow_nonfinite=True)


def read_model_config(path: str | os.PathLike) -> dict:
    """best/config.json in timm's hub format, with dist_train's `dist_train` entry."""
    return read_json(path, MODEL_CONFIG, hint="expected a trained model folder (RUN/best/)", max_bytes=MAX_SMALL_JSON)


def read_metrics(path: str | os.PathLike) -> dict:
    """best/metrics.json: an object of plain values (non-finite numbers kept: its writer may record them)."""
    return read_json(path, METRICS, hint=RUN_HINT, max_bytes=MAX_SMALL_JSON, allow_nonfinite=True)

