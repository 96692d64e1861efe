"""Shard a raw image set once into WebDataset tars: `python -m dist_train.shard --src SRC --out OUT`.

The format is the contract in shards/README.md. Design choices that matter to users:

- Safe to rerun: the same source (file list, sizes, mtimes, csv bytes) and arguments print
  "up to date" and write nothing; anything else is refused unless `--overwrite`, which always
  rebuilds (also the way to repair a set that `--inspect` found damaged).
- Never half-finished: `_info.json` is what readers look for, so an existing one is deleted
  before any shard is touched and the new one is written last; every tar goes to a temporary
  name and is renamed when complete. Files of the previous set (or of a killed run) that the
  new set does not list are removed once the new shards are in place; nothing else is (`outdir`).
- Bounded memory: an image whose header declares more than `--max-image-pixels` is rejected
  without being decoded (`trust.media`).
- Deterministic: tar headers carry fixed mtime/owner/mode and members go in a fixed order, so
  the same input gives byte-identical shards (checked by sha256 in `_info.json`).
- Every image is decoded once, before any shard is written, so a corrupt file is skipped and
  listed in `_rejected.jsonl` (or, with `--strict`, stops the run before it writes anything)
  instead of failing a training job hours later. That decode also fingerprints it (duplicates
  join the layout's groups before the split is decided: `duplicates`, `--dup-threshold`) and,
  with `--resize`, is the one the stored JPEG is made from: the encoded bytes wait in a spool
  file in OUT (`spool`) until the split is known, and the write pass copies them into the tars.
- Default shard count per split (train, validation, any other, folds or not), from its sample
  count n: max(1, min(64, n // 16), ceil(n / 1000)) shards of near-equal length. So a split has
  64 shards once it has 1,024 samples (8 GPUs x 8 loader workers each read their own), a small
  one has few shards of at least 16 samples (280 images: 14 train + 3 validation shards, no
  one-image shards), and no shard holds more than 1000. `--samples-per-shard S` instead gives
  ceil(n / S) near-equal shards of at most S images.
- The `train` split is shuffled (from `--seed`) at write time so each shard mixes classes and
  groups; other splits keep the source order (an unlabeled set's `test`: its index order).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from dist_train import __version__
from dist_train.errors import UserError, atomic_write_text, check_writable_dir
from dist_train.system import usable_cpus
from dist_train.trust.media import DEFAULT_MAX_PIXELS

from . import duplicates as dups
from . import resample
from .format import REJECTED_NAME, SPLIT_RE, num_images, read_local_info, summary
from .images import check_and_encode, fingerprint_of, large_images_hint
from .outdir import begin_replacing, check_out_dir, inspect, publish  # noqa: F401 (inspect: the API)
from .pool import pool_map as _pool_map
from .pool import reuse_workers
from .sources import Record, Source, assign_folds, get_layout, load_source, split_records
from .spool import Spool
from .tars import write_plan

DEFAULT_OUT = Path("shards")
DEFAULT_SHARDS = 64
MAX_DEFAULT_SHARD = 1000
MIN_DEFAULT_SHARD = 16  # samples: below 64 x 16 a split gets fewer shards, never near-empty ones
# Params recorded only when used (older sets, and sets made without them, stay up to date).
OPTIONAL_PARAMS = ("folds", "classes")


# ---------------------------------------------------------------- layout of the shard set


def shard_sizes(n: int, samples_per_shard: int | None) -> list[int]:
    """Near-equal shard lengths for n samples (rule in the module docstring)."""
    if n == 0:
        return []
    if samples_per_shard is None:
        k = max(1, min(DEFAULT_SHARDS, n // MIN_DEFAULT_SHARD), math.ceil(n / MAX_DEFAULT_SHARD))
    else:
        k = math.ceil(n / samples_per_shard)
    base, extra = divmod(n, k)
    return [base + (i < extra) for i in range(k)]


def source_fingerprint(source: Source) -> str:
    """sha256 of the layout, the index csv's bytes and (path, size, mtime_ns) of every used file.

    Stat data rather than content hashes keep the up-to-date check instant on large sets.
    """
    h = hashlib.sha256(source.layout.encode())
    if source.index_file is not None:
        h.update(source.index_file.read_bytes())
    for rel, path in sorted((r.rel, r.path) for r in source.records):
        st = path.stat()
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _differences(old: dict, params: dict, fingerprint: str, out: Path) -> list[str]:
    old_params = old.get("params", {})
    keys = [*params, *(k for k in OPTIONAL_PARAMS if k not in params)]  # one dropped is a change too
    diffs = [f"{k} {_short(old_params.get(k))} -> {_short(params.get(k))}" for k in keys
             if old_params.get(k) != params.get(k)]
    if old.get("source_fingerprint") != fingerprint:
        diffs.append("source files changed")
    missing = [f for f in old.get("sha256", {}) if not (out / f).is_file()]
    if missing:
        diffs.append(f"shards missing: {', '.join(missing[:3])}")
    return diffs


def _short(value: object) -> str:
    """A param for the 'made differently' line: a long list (a class list) by its start and length."""
    if isinstance(value, list) and len(value) > 6:
        return repr(value[:5])[:-1] + f", ... ({len(value)} in all)]"
    return repr(value)


def _up_to_date(out: Path, params: dict, fingerprint: str) -> dict | None:
    """The info of the same set already in OUT (None: OUT holds none); a different one is refused."""
    old = read_local_info(out)
    if old is None:
        check_out_dir(out)  # a folder of other files is no set to replace
        return None
    diffs = _differences(old, params, fingerprint, out)
    if diffs:
        raise UserError(f"{out}: holds a shard set made differently ({'; '.join(diffs)}); pass --overwrite to replace it")
    print(f"{out}: up to date ({num_images(old)} images, {len(old.get('sha256', {}))} shards)")
    return old


def _validate(val_fraction: float, resize: int | None, quality: int, samples_per_shard: int | None,
              workers: int | None, as_split: str | None, max_pixels: int) -> None:
    if max_pixels < 1:
        raise UserError(f"--max-image-pixels {max_pixels}: expected a positive number of pixels")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: expected 0 <= fraction < 1")
    if resize is not None and resize < 1:
        raise UserError(f"--resize {resize}: expected a positive side length in pixels")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: expected 1..100")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: expected a positive integer")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: expected a positive integer")
    if as_split is not None and not SPLIT_RE.match(as_split):
        raise UserError(f"--as-split {as_split!r}: expected a name of letters, digits and '_' (e.g. test)")


def default_out(source: Source) -> Path:
    """shards/<layout> for layouts named so (the competition's train and eval side by side), else
    shards/<folder name>."""
    name = source.layout if get_layout(source.layout).named_by_layout else Path(os.path.abspath(source.root)).name
    return DEFAULT_OUT / name  # abspath: `--src .` is named after the folder, not shards/ itself


def _resolve_out(out: str | Path | None, source: Source) -> Path:
    """OUT (or its default), writable, and not under the folder the images are read from: the next
    run would read the shard set as data (a folder of tars named like a class)."""
    out = Path(out) if out is not None else default_out(source)
    images = os.path.realpath(source.image_root)
    if os.path.commonpath([os.path.realpath(out), images]) == images:
        raise UserError(f"--out {out}: inside the source's image folder {source.image_root}; expected a folder "
                        "outside it (the next run would read the shard set as images)")
    return check_writable_dir(out, "--out")


# ---------------------------------------------------------------- writer


@reuse_workers  # one set of worker processes for the call, stopped when it returns
def write_shards(
    src: str | Path,
    out: str | Path | None = None,
    *,
    layout: str | None = None,
    options: dict | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    resize: int | None = None,
    quality: int = 95,
    samples_per_shard: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    as_split: str | None = None,
    folds: int = 0,
    dup_threshold: int = dups.DEFAULT_THRESHOLD, draw_pairs: Any = None,
    progress: bool = True,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Shard SRC into OUT (default: see `default_out`); returns the `_info.json` dict.

    `options` are the layout's own (e.g. a label cut), resolved by the layout and recorded in the params.
    `folds` K > 1 gives every sample of the training split (`as_split` if given) a fold 0..K-1
    (`assign_folds`), stored with the sample and counted per shard in `_info.json`. `dup_threshold`
    (pHash bits) and `draw_pairs` (a contact sheet): see `duplicates`.
    When OUT already holds the same set, prints "up to date" and returns its info unchanged.
    """
    start = time.perf_counter()
    _validate(val_fraction, resize, quality, samples_per_shard, workers, as_split, max_image_pixels)
    source = load_source(src, layout, options)
    if folds and not source.labeled:
        raise UserError(f"--folds {folds}: {src} is an unlabeled set (nothing to validate on)")
    out = _resolve_out(out, source)
    params = {
        "layout": source.layout, "val_fraction": val_fraction, "seed": seed, "resize": resize,
        "quality": quality, "samples_per_shard": samples_per_shard, "as_split": as_split, **source.options,
        **({"folds": folds} if folds else {}), "dup_threshold": dups.check_threshold(dup_threshold),
    }  # "folds" only with folds: older sets stay up to date
    fingerprint = source_fingerprint(source)
    if (old := None if overwrite else _up_to_date(out, params, fingerprint)) is not None:
        return old
    workers = workers or usable_cpus()
    with Spool(out) as spool:
        records, fps, rejected = _drop_unreadable(source, spool, (max_image_pixels, resize, quality), workers,
                                                  strict, progress)
        source, fp, pairs = dups.group_duplicates(source, records, fps, dup_threshold)
        splits, fold_of = _split(source, as_split, val_fraction, seed, folds)
        plan = [(name, f"{name}-{i:06d}.tar", recs[pos:pos + size]) for name, recs in splits.items()
                for i, (pos, size) in enumerate(_offsets(shard_sizes(len(recs), samples_per_shard)))]
        sha, nbytes = _replace_shards(out, plan, rejected, spool, progress, fold_of)
    info = _make_info(out, source, splits, plan, sha, params, fingerprint, len(rejected), fold_of, folds)
    info["duplicates"] = dups.store(out, fp, pairs, source, splits, dup_threshold, draw_pairs)
    publish(out, info)
    _warn_if_large(out, records, resize)
    elapsed = time.perf_counter() - start
    print(summary(out, info))
    images = sum(len(r) for r in splits.values()) + len(rejected)
    print(f"{nbytes / 1e6:.1f} MB written in {elapsed:.1f}s, {images / max(elapsed, 1e-9):.0f} images/s")
    return info


def _warn_if_large(out: Path, records: list[Record], resize: int | None) -> None:
    """`large_images_hint`'s line, for a set stored at full size (no --resize)."""
    if resize is None and (hint := large_images_hint([str(r.path) for r in records])):
        warnings.warn(f"{out}: {hint}", stacklevel=3)


def _split(source: Source, as_split: str | None, val_fraction: float, seed: int,
           folds: int) -> tuple[dict[str, list[Record]], dict[str, int]]:
    """(the splits of the source's (readable, regrouped) records, empty ones left out, the training
    split shuffled; each training sample's fold with `folds`)."""
    splits = {as_split: list(source.records)} if as_split else split_records(source, val_fraction, seed)
    splits = {name: recs for name, recs in splits.items() if recs}
    fold_of = assign_folds(splits.get(as_split or "train", []), folds, seed) if folds else {}
    if "train" in splits:
        random.Random(seed).shuffle(splits["train"])
    return splits, fold_of


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, length) of consecutive shards of the given lengths."""
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    return list(zip(starts, sizes))


def _drop_unreadable(source: Source, spool: Spool, how: tuple[int, int | None, int], workers: int, strict: bool,
                     progress: bool) -> tuple[list[Record], list[tuple], list[dict]]:
    """The one decode pass (`check_and_encode`, `how` = (max pixels, resize, quality)): every image
    checked and fingerprinted, its member spooled; the unreadable ones are left out (or, strict,
    stop all). Images over max pixels are not decoded. A job with resize and at least
    `resample.COMPILE_JOB` images per worker resizes with the compiled kernels from its first image."""
    everything = list(source.records)
    compiled = how[1] is not None and len(everything) >= resample.COMPILE_JOB * max(1, workers)
    tasks = [(str(r.path), *how, compiled) for r in everything]
    results = _pool_map(check_and_encode, tasks, workers, "checking" if how[1] is None else "encoding", progress)
    kept, fps, rejected = [], [], []
    try:
        for r, ((why, fp, ext), data) in zip(everything, results):
            if why:
                rejected.append({"key": r.key, "path": r.rel, "reason": why})
                continue
            kept.append(r)
            fps.append(fingerprint_of(fp))
            spool.add(r.key, ext, data)
    finally:
        results.close()  # stops the worker pool, also when spooling failed
    spool.finish()
    if rejected and strict:
        lines = [f"{x['path']} ({x['reason']})" for x in rejected[:5]]
        more = f" and {len(rejected) - 5} more" if len(rejected) > 5 else ""
        raise UserError(f"{source.image_root}: {len(rejected)} unreadable image(s): {', '.join(lines)}{more}; "
                        "nothing written (--strict)")
    if not kept:
        raise UserError(f"{source.image_root}: no readable images")
    return kept, fps, rejected


def _replace_shards(out: Path, plan: list[tuple[str, str, list[Record]]], rejected: list[dict], spool: Spool,
                    progress: bool, fold_of: dict[str, int]) -> tuple[dict[str, str], int]:
    """Write the new shards into OUT, which holds no finished set until the new _info.json lands;
    then remove the files of the previous set. Returns (sha256 per shard, bytes written)."""
    out.mkdir(parents=True, exist_ok=True)
    owned = begin_replacing(out, [filename for _, filename, _ in plan], keep=spool.name)
    sha, nbytes = write_plan(out, plan, spool, progress, fold_of)
    for name in sorted(owned - set(sha) - {REJECTED_NAME}):  # only what the old set (or a killed run) wrote
        (out / name).unlink(missing_ok=True)
    if rejected:
        atomic_write_text(out / REJECTED_NAME, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rejected))
    elif REJECTED_NAME in owned:
        (out / REJECTED_NAME).unlink(missing_ok=True)
    return sha, nbytes


def _make_info(out: Path, source: Source, splits: dict[str, list[Record]], plan: list[tuple[str, str, list[Record]]],
               sha: dict[str, str], params: dict, fingerprint: str, n_rejected: int, fold_of: dict[str, int],
               folds: int) -> dict:
    split_info = {}
    for name in splits:
        files = [(f, len(recs)) for s, f, recs in plan if s == name]
        split_info[name] = {
            "name": name, "num_samples": sum(n for _, n in files),
            "filenames": [f for f, _ in files], "shard_lengths": [n for _, n in files],
        }
        shards = [recs for s, _, recs in plan if s == name]
        if shards and shards[0] and shards[0][0].key in fold_of:
            split_info[name].update(folds=folds, fold_counts=[_fold_counts(recs, fold_of) for recs in shards])
    label_counts = {}
    for name, recs in splits.items():
        if recs[0].label is not None:
            c = Counter(r.label for r in recs)
            label_counts[name] = {str(i): c.get(i, 0) for i in range(len(source.classes))}
    return {
        "name": out.resolve().name,
        "version": __version__,
        "layout": source.layout,
        "classes": source.classes,
        "splits": split_info,
        "label_counts": label_counts,
        "sha256": sha,
        "params": params,
        "source_fingerprint": fingerprint,
        "rejected": n_rejected,
        "ignored": source.ignored,
    }


def _fold_counts(recs: list[Record], fold_of: dict[str, int]) -> dict[str, dict[str, int]]:
    """One shard's samples per fold and class: {"fold": {"class": n}} (string keys, as JSON has)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        counts[str(fold_of[r.key])][str(r.label)] += 1
    return {f: dict(sorted(c.items(), key=lambda x: int(x[0]))) for f, c in sorted(counts.items(), key=lambda x: int(x[0]))}
