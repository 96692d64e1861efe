"""The shard-set format (shards/README.md): the one reader and writer of `_info.json`.

Everything that knows where a shard set's files are, or what `_info.json` holds, lives here:
the writer writes the info through `write_info`, the loaders, predict, evaluate and the
pictures read it through `load_info` / `split_info` / `shard_urls` / `iter_samples`. A shard
set is a local folder or a URL (http(s)://, s3://, gs://, file://, or a webdataset `pipe:`
command with `{}` for the file name); remote files are read through webdataset's gopen,
`_info.json` at an http(s) URL with urllib (`remote`). File names read from `_info.json` go
into paths and `pipe:` commands, so `split_info` accepts only the writer's shard names.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

import webdataset as wds
from webdataset.gopen import Pipe

from dist_train.errors import UserError, atomic_write_json
from dist_train.trust.media import refused, tar_samples
from dist_train.trust.files import MAX_JSON_BYTES, parse_json, read_capped
from dist_train.trust.schema import Dict
from dist_train.trust.shardinfo import check_tar_sizes, parse_info

from .remote import ReadFailed, read_gopen, read_http

INFO_NAME = "_info.json"
REJECTED_NAME = "_rejected.jsonl"
SHARD_HINT = "expected a shard set written by python -m dist_train.shard"
IMAGE_KEYS = ("jpg", "png")  # the image member of a sample: one of these
SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
META, MAX_META_BYTES = Dict(), 1 << 20  # a sample's json member: an object of at most 1 MiB


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """s3:// through the AWS CLI, the way webdataset's docs stream S3 shards."""
    if mode[0] != "r":
        raise ValueError(f"{url}: s3 shards are read-only here")
    return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141, 23])


# webdataset 1.0 has no s3 handler; a user-registered one wins.
wds.gopen_schemes.setdefault("s3", _gopen_s3)


@dataclass(frozen=True)
class SplitInfo:
    """One split of `_info.json`: its shard files and their sample counts, checked consistent."""

    name: str
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]
    num_samples: int
    folds: int = 0  # K when the writer gave every sample a fold (--folds), else 0
    keep_folds: frozenset[int] | None = None  # a fold view (`fold_split`): only these folds' samples


def is_url(root: str) -> bool:
    """http(s)://, s3://, gs://, file://, pipe:... (a one-letter scheme would be a drive)."""
    return len(urlparse(str(root)).scheme) > 1


def join_url(root: str, name: str) -> str:
    """A file of the shard set: path join for folders, '/' for URLs; in a `pipe:` root, `{}`
    stands for the file name (e.g. `pipe:aws s3 cp s3://b/shards/{} -`)."""
    root = str(root)
    if not is_url(root):
        return os.path.join(root, name)
    if root.startswith("pipe:") and "{}" in root:
        return root.replace("{}", name)
    return root.rstrip("/") + "/" + name


def load_info(root: str) -> dict:
    """Read `_info.json` of a local or remote shard set (http(s) with urllib, other URLs through
    webdataset's gopen); a failure is one line with the URL and the reason."""
    root = str(root)
    if not is_url(root):
        if not os.path.isdir(root):
            raise UserError(f"{root}: no such folder: {SHARD_HINT}")
        if not os.path.isfile(os.path.join(root, INFO_NAME)):
            raise UserError(f"{root}: no {INFO_NAME} (incomplete or not a shard set): {SHARD_HINT}")
    url = join_url(root, INFO_NAME)
    try:
        if not is_url(root):
            data = read_capped(url, MAX_JSON_BYTES, SHARD_HINT)
        elif urlparse(url).scheme in ("http", "https"):
            data = read_http(url, MAX_JSON_BYTES)
        else:
            data = read_gopen(url, MAX_JSON_BYTES)
    except ReadFailed as e:
        raise UserError(f"{url}: cannot read shard info ({e}): {SHARD_HINT}") from None
    info = parse_info(data, url, SHARD_HINT)
    if not is_url(root):
        check_tar_sizes(root, info, url, SHARD_HINT)
    return info


def read_local_info(out: Path) -> dict | None:
    """OUT's `_info.json` for the writer (None if absent); unreadable is a UserError."""
    path = Path(out) / INFO_NAME
    if not path.is_file():
        return None
    info = parse_info(read_capped(path, MAX_JSON_BYTES), str(path), "pass --overwrite to replace the shard set")
    check_shard_names(info.get("sha256", {}), str(path))
    return info


def write_info(out: Path, info: dict) -> None:
    """Written last and atomically: its presence is what marks a shard set complete."""
    atomic_write_json(Path(out) / INFO_NAME, info)


def split_info(info: dict, split: str) -> SplitInfo:
    """The `splits[split]` entry, checked for the keys the loaders rely on."""
    splits = info.get("splits", {})
    if split not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise UserError(f"split {split!r} is not in the shard set (available: {available})")
    s = splits[split]
    try:
        names, lengths, n = tuple(s["filenames"]), tuple(int(x) for x in s["shard_lengths"]), int(s["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"split {split!r}: bad entry in {INFO_NAME} ({e!r}): {SHARD_HINT}") from None
    check_shard_names(names, f"split {split!r}")
    if len(names) != len(lengths) or sum(lengths) != n:
        raise UserError(
            f"split {split!r}: {len(names)} filenames, {len(lengths)} shard_lengths summing to "
            f"{sum(lengths)}, num_samples {n}: inconsistent {INFO_NAME}: {SHARD_HINT}"
        )
    keep = s.get("keep_folds")
    return SplitInfo(split, names, lengths, n, int(s.get("folds", 0)), None if keep is None else frozenset(keep))


def fold_split(info: dict, split: str, keep: Iterable[int], name: str) -> dict:
    """A copy of `info` with one more split NAME: the samples of SPLIT whose fold is in KEEP.

    It reads SPLIT's shards (the readers skip other folds' samples without decoding them); its
    shard lengths and class counts are the kept folds' counts from `_info.json`, so the loaders'
    equal-steps and exactly-once guarantees hold for it as for any split.
    """
    s, keep = info["splits"][split], sorted(set(keep))
    k = split_info(info, split).folds
    if not k:
        raise UserError(f"split {split!r} has no folds: shard it with python -m dist_train.shard --folds K")
    per_shard = s.get("fold_counts")
    if not isinstance(per_shard, list) or len(per_shard) != len(s["filenames"]):
        raise UserError(f"split {split!r}: bad fold_counts in {INFO_NAME}: {SHARD_HINT}")
    lengths, classes = [], {}
    for shard in per_shard:
        lengths.append(sum(n for f in keep for n in shard.get(str(f), {}).values()))
        for f in keep:
            for c, n in shard.get(str(f), {}).items():
                classes[c] = classes.get(c, 0) + int(n)
    out = {**info, "splits": {**info["splits"], name: {
        "name": name, "filenames": s["filenames"], "shard_lengths": lengths, "num_samples": sum(lengths),
        "folds": k, "keep_folds": keep}}}
    if split in info.get("label_counts", {}):
        out["label_counts"] = {**info["label_counts"],
                               name: {str(c): classes.get(str(c), 0) for c in range(len(class_names(info)))}}
    return out


def cv_splits(info: dict, train: str, val: str | None, fold: str | None) -> tuple[dict, str, str | None]:
    """(info, training split, validation split or None) of a run: `--fold k` holds fold k of
    TRAIN out as the validation split (`fold_split` views), `--fold all` trains on every fold."""
    k = split_info(info, train).folds
    if fold is None:
        if k and val is not None and val not in info.get("splits", {}):
            raise UserError(f"split {val!r} is not in the shard set, whose split {train!r} has {k} folds: pass "
                            f"--fold k (0..{k - 1}) to validate on fold k, or --fold all to train on every fold")
        if val is not None and val not in info.get("splits", {}):  # e.g. every class had one image: all in train
            raise UserError(f"split {val!r} is not in the shard set (available: {', '.join(sorted(info['splits']))}): "
                            "pass --val-split NAME to validate on another split, or --val-split none to train "
                            "without validation")
        return info, train, val
    if not k:
        raise UserError(f"--fold {fold}: split {train!r} has no folds (shard it with python -m dist_train.shard --folds K)")
    if fold == "all":
        return info, train, None
    if not fold.isdigit() or not 0 <= int(fold) < k:
        raise UserError(f"--fold {fold}: expected a fold 0..{k - 1} of split {train!r}, or all")
    f = int(fold)
    names = f"{train}[fold!={f}]", f"{train}[fold={f}]"
    info = fold_split(info, train, [i for i in range(k) if i != f], names[0])
    return fold_split(info, train, [f], names[1]), names[0], names[1]


def check_shard_names(names: Iterable[object], where: str) -> None:
    """Only the writer's own file names (`SHARD_RE`): a name from `_info.json` is joined to the
    shard set's folder and put into `pipe:` commands, so `../x.tar` or `$(cmd).tar` would read
    outside it or run code."""
    bad = next((x for x in names if not isinstance(x, str) or not SHARD_RE.fullmatch(x)), None)
    if bad is not None:
        raise UserError(f"{where}: shard name {bad!r} in {INFO_NAME} refused: expected a plain file name "
                        f"NAME-NNNNNN.tar (NAME of letters, digits, '_'): {SHARD_HINT}")


def class_names(info: dict) -> list[str]:
    return list(info.get("classes") or [])


def label_counts(info: dict, split: str) -> dict[str, int] | None:
    """Per-class sample counts of a labeled split (string class keys), None if unlabeled."""
    return info.get("label_counts", {}).get(split)


def empty_classes(info: dict, split: str) -> list[str]:
    """Names of the classes a labeled split has no sample of (none for an unlabeled split)."""
    counts = label_counts(info, split) or {}
    return [name for i, name in enumerate(class_names(info)) if counts and not int(counts.get(str(i), 0))]


def is_labeled(info: dict, split: str) -> bool:
    return split in info.get("label_counts", {})


def num_images(info: dict) -> int:
    return sum(s["num_samples"] for s in info.get("splits", {}).values())


def shard_urls(root: str, info: dict, split: str) -> list[str]:
    return [join_url(root, name) for name in split_info(info, split).filenames]


def iter_samples(root: str, info: dict, split: str) -> Iterator[dict]:
    """Undecoded samples of a split in shard order: `__key__`, image bytes (`jpg`/`png`), `cls`, `json`.

    A generator: stop iterating as soon as you have what you need and the rest is never read.
    Samples with a member `trust.media` refuses (links, sparse, oversized, ...) are warned about and left out.
    """
    for sample in tar_samples(shard_urls(root, info, split), handler=wds.warn_and_continue):
        if refused(sample):
            warnings.warn(f"skipping sample {sample['__key__']} of {sample['__url__']}: {refused(sample)}", stacklevel=2)
        else:
            yield sample


def _fold_of(sample: dict) -> int:
    """A sample's fold member as a number; -1 when it has none or it is not a whole number."""
    try:
        return int(sample.get("fold", b"-1"))
    except ValueError:
        return -1


def read_meta(root: str, info: dict, split: str) -> dict[str, dict]:
    """key -> the sample's json metadata, for every sample of the split (of a fold view
    (`fold_split`): of its folds only)."""
    keep = split_info(info, split).keep_folds
    return {s["__key__"]: parse_json(s["json"], f"{root} split {split!r} sample {s['__key__']!r}: json member",
                                     spec=META, max_bytes=MAX_META_BYTES)
            for s in iter_samples(root, info, split) if "json" in s and (keep is None or _fold_of(s) in keep)}


def image_bytes(sample: dict) -> bytes | None:
    """The sample's image member (jpg or png), None if it has none."""
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


TABLE_CLASSES = 60  # classes up to which the summary lists each one's count per split


def _many_classes(classes: list[str], counts: dict) -> list[str]:
    """Past TABLE_CLASSES: per split the smallest, median and largest class, and the 10 classes
    with the fewest images in the first split (`label_counts` in _info.json has every count)."""
    lines = [f"  {len(classes)} classes (every count in _info.json's label_counts); images per class:"]
    for split, per in counts.items():
        n = sorted(per.get(str(i), 0) for i in range(len(classes)))
        lines.append(f"    {split}: min {n[0]}, median {n[len(n) // 2]}, max {n[-1]}")
    first = next(iter(counts))
    fewest = sorted(range(len(classes)), key=lambda i: (counts[first].get(str(i), 0), i))[:10]
    lines.append(f"    fewest in {first}: " + ", ".join(f"{classes[i]} {counts[first].get(str(i), 0)}" for i in fewest))
    return lines


def summary(out: Path | str, info: dict) -> str:
    """Human summary of a shard set: images per split and class, shards, rejected, ignored."""
    splits = info["splits"]
    lines = [f"{out}: {info.get('layout', 'unknown')} layout, {num_images(info)} images, "
             f"{sum(len(s['filenames']) for s in splits.values())} shards"]
    width = max(len(n) for n in splits)
    for name, s in splits.items():
        lines.append(f"  {name:<{width}}  {s['num_samples']:>8} images  {len(s['filenames']):>5} shards")
        if s.get("folds"):
            sizes = [sum(sum(sh.get(str(f), {}).values()) for sh in s.get("fold_counts", [])) for f in range(s["folds"])]
            lines.append(f"  {'':<{width}}  {s['folds']} folds of {', '.join(map(str, sizes))} images")
    counts = info.get("label_counts", {})
    if counts and len(info["classes"]) <= TABLE_CLASSES:
        names = list(counts)
        cw = max(len(c) for c in info["classes"])
        lines.append("  " + " " * cw + "".join(f"  {n:>10}" for n in names))
        for i, cls in enumerate(info["classes"]):
            lines.append(f"  {cls:<{cw}}" + "".join(f"  {counts[n].get(str(i), 0):>10}" for n in names))
    elif counts:
        lines += _many_classes(info["classes"], counts)
    rej = info.get("rejected", 0)
    lines.append(f"  rejected: {rej}" + (f" (see {Path(out) / REJECTED_NAME})" if rej else ""))
    ignored = info.get("ignored", {})
    lines.append("  ignored: " + ", ".join(f"{k} {v}" for k, v in ignored.items()))
    return "\n".join(lines)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- reading back
