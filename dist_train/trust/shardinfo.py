"""`_info.json` of a shard set (shards/README.md): its schema, with sane bounds and cross-checks.

`dist_train.shardset.format` is its one reader; it parses the file with `trust.files.parse_json`
and this schema, so a crafted `_info.json` (a million classes, `num_samples` 1e12, `"classes":
"catdog"`, counts that disagree) is one line before anything is allocated from it. Counts are
checked against each other (shard lengths sum to `num_samples`, label and fold counts to the
split's samples) and, for a local shard set, against the size of the tars they describe.
"""

from __future__ import annotations

import os
from typing import Any

from dist_train.errors import UserError

from .files import parse_json
from .schema import Dict, Int, List, Spec, Str, Where

MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_SHARDS = 1_000_000  # per split
MAX_SHARD_SAMPLES = 10_000_000  # samples of one tar
MAX_SAMPLES = 1_000_000_000  # samples of one split
MAX_FOLDS = 1000
MAX_SPLITS = 1000
MIN_SAMPLE_BYTES = 1024  # a sample is at least one tar member: a 512-byte header and a data block

_INDEX = r"\d{1,6}"  # a class or fold index as JSON keys it
_COUNTS = Dict(values=Int(0, MAX_SAMPLES), keys=Str(max_len=6, pattern=_INDEX), max_keys=MAX_CLASSES)


def _split_rule(s: dict) -> tuple[str, str] | None:
    names, lengths = s["filenames"], s["shard_lengths"]
    if len(names) != len(lengths):
        return "shard_lengths", f"one length per file name ({len(names)})"
    if sum(lengths) != s["num_samples"]:
        return "num_samples", f"the sum of shard_lengths ({sum(lengths):,})"
    folds, per_shard = s.get("folds", 0), s.get("fold_counts")
    if per_shard is None:
        return ("fold_counts", "per-shard fold counts (the split has folds)") if folds else None
    if len(per_shard) != len(names):
        return "fold_counts", f"one entry per shard ({len(names)})"
    for i, shard in enumerate(per_shard):
        bad = next((f for f in shard if int(f) >= folds), None)
        if bad is not None:
            return f"fold_counts[{i}]", f"folds 0..{folds - 1}, not {bad}"
        n = sum(sum(c.values()) for c in shard.values())
        if n != lengths[i]:
            return f"fold_counts[{i}]", f"counts summing to shard_lengths[{i}] ({lengths[i]:,}), not {n:,}"
    return None


SPLIT = Where(Dict(fields={
    "name": Str(max_len=128),
    "num_samples": Int(0, MAX_SAMPLES),
    "filenames": List(Str(max_len=255), MAX_SHARDS),
    "shard_lengths": List(Int(0, MAX_SHARD_SAMPLES), MAX_SHARDS),
    "folds": Int(0, MAX_FOLDS),
    "fold_counts": List(Dict(values=_COUNTS, keys=Str(max_len=4, pattern=r"\d{1,4}"), max_keys=MAX_FOLDS),
                        MAX_SHARDS),
}, required=("num_samples", "filenames", "shard_lengths")), _split_rule)


def _info_rule(info: dict) -> tuple[str, str] | None:
    classes, splits = info["classes"], info["splits"]
    if len(set(classes)) != len(classes):
        return "classes", "distinct class names"
    for name, counts in info.get("label_counts", {}).items():
        if name not in splits:
            return f"label_counts.{name}", "a split listed in splits"
        bad = next((k for k in counts if int(k) >= len(classes)), None)
        if bad is not None:
            return f"label_counts.{name}", f"class indices 0..{len(classes) - 1} ({len(classes)} classes), not {bad}"
        n = splits[name]["num_samples"]
        if sum(counts.values()) != n:
            return f"label_counts.{name}", f"counts summing to the split's num_samples ({n:,})"
    for name, s in splits.items():
        for i, shard in enumerate(s.get("fold_counts") or ()):
            bad = next((k for c in shard.values() for k in c if int(k) >= len(classes)), None)
            if bad is not None:
                return f"splits.{name}.fold_counts[{i}]", f"class indices 0..{len(classes) - 1}, not {bad}"
    return None


INFO: Spec = Where(Dict(fields={
    "name": Str(max_len=1024),
    "version": Str(max_len=64),
    "layout": Str(max_len=64),
    "classes": List(Str(max_len=1024), MAX_CLASSES),
    "splits": Dict(values=SPLIT, keys=Str(max_len=128), max_keys=MAX_SPLITS),
    "label_counts": Dict(values=_COUNTS, keys=Str(max_len=128), max_keys=MAX_SPLITS),
    "sha256": Dict(values=Str(max_len=64, pattern=r"[0-9a-f]{64}"), keys=Str(max_len=255), max_keys=MAX_SHARDS),
    "params": Dict(),
    "source_fingerprint": Str(max_len=256),
    "rejected": Int(0, None),
    "ignored": Dict(values=Int(0, None)),
}, required=("splits", "classes")), _info_rule)


def check_tar_sizes(folder: str, info: dict, source: str, hint: str) -> None:
    """Each local shard holds at least MIN_SAMPLE_BYTES per sample `_info.json` counts in it: a
    count no tar could hold is refused before a loader sizes anything by it. A missing shard is
    left to the reader that would open it."""
    for name, s in info["splits"].items():
        for file, n in zip(s["filenames"], s["shard_lengths"]):
            if not isinstance(file, str) or "/" in file or file in ("", ".", ".."):
                continue  # refused by the shard-name check where it is used
            try:
                size = os.stat(os.path.join(folder, file)).st_size
            except OSError:
                continue
            if size < n * MIN_SAMPLE_BYTES:
                raise UserError(f"{source}: splits.{name}: {file} is {size:,} bytes, too small for the {n:,} samples "
                                f"its shard_lengths entry counts (at least {MIN_SAMPLE_BYTES} bytes each): {hint}")


def parse_info(data: Any, source: str, hint: str) -> dict:
    """`_info.json` bytes -> the checked document (see the module doc)."""
    return parse_json(data, source, spec=INFO, hint=hint)
