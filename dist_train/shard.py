"""Shard a raw image set once into WebDataset tars: `python -m dist_train.shard --src SRC --out OUT`.

The format is the contract in shards/README.md. Design choices that matter to users:

- Safe to rerun: the same source (file list, sizes, mtimes, csv bytes) and arguments print
  "up to date" and write nothing; anything else is refused unless `--overwrite`, which always
  rebuilds (also the way to repair a set that `--inspect` found damaged).
- Never half-finished: `_info.json` is what readers look for, so an existing one is deleted
  before any shard is touched and the new one is written last; every tar goes to a temporary
  name and is renamed when complete. Shard-named files in OUT that the new set does not
  list (the previous set's, or a killed run's) are removed once the new shards are in place.
- Deterministic: tar headers carry fixed mtime/owner/mode and members go in a fixed order, so
  the same input gives byte-identical shards (checked by sha256 in `_info.json`).
- Every image is decoded once before anything is written, so a corrupt file is skipped and
  listed in `_rejected.jsonl` (or, with `--strict`, stops the run before it writes anything)
  instead of failing a training job hours later.
- Default shard count per split: max(min(64, n), ceil(n / 1000)) shards of near-equal length,
  so the train split has >= 64 shards once it has >= 64 images (8 GPUs x 8 loader workers each
  read their own) and no shard holds more than 1000 images. `--samples-per-shard S` instead
  gives ceil(n / S) near-equal shards of at most S images.
- The `train` split is shuffled (from `--seed`) at write time so each shard mixes classes and
  persons; other splits keep the source order (`test` of mask-eval: info.csv order).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import __version__
from .errors import ArgParser, UserError, atomic_write_json, atomic_write_text, cli_main
from .labels import DEFAULT_AGE_BINS, parse_age_bins
from .sources import LAYOUTS, Record, Source, load_source, split_records

INFO = "_info.json"
REJECTED = "_rejected.jsonl"
DEFAULT_OUT = Path("shards")
DEFAULT_SHARDS = 64
MAX_DEFAULT_SHARD = 1000
SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
# Temporary names of this module's files (tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")).
TMP_RE = re.compile(r"^\.([A-Za-z0-9_]+-\d{6}\.tar|_info\.json|_rejected\.jsonl)\..+\.tmp$")
# Fixed tar header fields: determinism must not depend on who ran the job, or when.
TAR_MTIME = 0
TAR_MODE = 0o444
JPEG_FORMATS = ("JPEG", "MPO")


# ---------------------------------------------------------------- image work (pool workers)


def check_image(path: str) -> str | None:
    """Decode `path` fully; None if it decodes, else the reason.

    `verify()` alone misses truncated JPEGs, so the image is loaded; JPEGs decode in draft
    (1/8 scale) mode, which still reads the whole entropy-coded stream but is several times
    faster.
    """
    try:
        with Image.open(path) as im:
            if im.format in JPEG_FORMATS:
                im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(e).__name__}: {e}"
    return None


WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(im: Image.Image, alpha: bool = False) -> Image.Image:
    """RGB (RGBA with `alpha`) copy of `im`. 16-bit images (PIL modes I;16*, and I as PIL opens
    16-bit PNGs) are scaled to 8 bits first: PIL's own convert clips them at 255, which turns
    most of a 16-bit image white."""
    if im.mode in WIDE_INT_MODES:
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray((wide >> 8).astype(np.uint8))
    return im.convert("RGBA" if alpha else "RGB")


def encode_image(task: tuple[str, int | None, int]) -> tuple[str, bytes]:
    """(path, resize, quality) -> (member extension, bytes) for one sample.

    Without resize JPEG and PNG bytes go in untouched; other formats (folder layout: bmp, webp,
    tiff, ...) are converted losslessly to PNG because the contract stores jpg or png. With
    resize the shorter side shrinks to `resize` (never enlarged) and the result is JPEG at
    `quality`; alpha is dropped since JPEG has none.
    """
    path, resize, quality = task
    with Image.open(path) as im:
        fmt = im.format
        if resize is None:
            if fmt in JPEG_FORMATS or fmt == "PNG":
                return ("jpg" if fmt in JPEG_FORMATS else "png"), Path(path).read_bytes()
            out = _to_rgb(im, alpha="A" in im.getbands() or "transparency" in im.info)
            buf = io.BytesIO()
            out.save(buf, format="PNG")
            return "png", buf.getvalue()
        w, h = im.size
        scale = resize / min(w, h)
        size = (w, h) if scale >= 1 else (max(1, round(w * scale)), max(1, round(h * scale)))
        if fmt in JPEG_FORMATS and size != (w, h):
            im.draft("RGB", size)
        rgb = _to_rgb(im)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return "jpg", buf.getvalue()


def _pool_map(fn: Any, items: Sequence[Any], workers: int, desc: str, progress: bool) -> Iterator[Any]:
    """Ordered map over `items` in `workers` processes (in-process for 1), with a progress bar."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        chunk = max(1, min(64, len(items) // (workers * 8)))
        with multiprocessing.Pool(workers) as pool:
            for result in pool.imap(fn, items, chunksize=chunk):
                yield result
                bar.update()
    finally:
        bar.close()


# ---------------------------------------------------------------- layout of the shard set


def shard_sizes(n: int, samples_per_shard: int | None) -> list[int]:
    """Near-equal shard lengths for n samples (rule in the module docstring)."""
    if n == 0:
        return []
    if samples_per_shard is None:
        k = max(min(DEFAULT_SHARDS, n), math.ceil(n / MAX_DEFAULT_SHARD))
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


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_info(out: Path) -> dict | None:
    """OUT's _info.json, None if absent."""
    path = out / INFO
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); pass --overwrite to replace the shard set") from None


def _differences(old: dict, params: dict, fingerprint: str, out: Path) -> list[str]:
    old_params = old.get("params", {})
    diffs = [f"{k} {old_params.get(k)!r} -> {v!r}" for k, v in params.items() if old_params.get(k) != v]
    if old.get("source_fingerprint") != fingerprint:
        diffs.append("source files changed")
    missing = [f for f in old.get("sha256", {}) if not (out / f).is_file()]
    if missing:
        diffs.append(f"shards missing: {', '.join(missing[:3])}")
    return diffs


def _validate(val_fraction: float, resize: int | None, quality: int, samples_per_shard: int | None,
              workers: int | None, as_split: str | None) -> None:
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


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask under taskset/Slurm), not the whole host's:
    the default shard workers, the trainer's CPU threads and the benchmarks' worker counts."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_out(source: Source) -> Path:
    """shards/<layout> for the competition's layouts (train and eval side by side), else shards/<folder name>."""
    return DEFAULT_OUT / (source.root.name if source.layout == "folder" else source.layout)


# ---------------------------------------------------------------- writer


def write_shards(
    src: str | Path,
    out: str | Path | None = None,
    *,
    layout: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    resize: int | None = None,
    quality: int = 95,
    samples_per_shard: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    as_split: str | None = None,
    age_bins: str | Sequence[int] = DEFAULT_AGE_BINS,
    progress: bool = True,
) -> dict:
    """Shard SRC into OUT (default: see `default_out`); returns the `_info.json` dict.

    When OUT already holds the same set, prints "up to date" and returns its info unchanged.
    """
    start = time.perf_counter()
    _validate(val_fraction, resize, quality, samples_per_shard, workers, as_split)
    try:
        bins = parse_age_bins(age_bins)
    except ValueError as e:
        raise UserError(f"--age-bins: {e}") from None
    source = load_source(src, layout, bins)
    out = Path(out) if out is not None else default_out(source)
    params = {
        "layout": source.layout, "val_fraction": val_fraction, "seed": seed, "resize": resize,
        "quality": quality, "samples_per_shard": samples_per_shard, "as_split": as_split,
        "age_bins": list(bins),
    }
    fingerprint = source_fingerprint(source)

    old = None if overwrite else _read_info(out)
    if old is not None:
        diffs = _differences(old, params, fingerprint, out)
        if not diffs:
            print(f"{out}: up to date ({_count(old)} images, {len(old.get('sha256', {}))} shards)")
            return old
        raise UserError(f"{out}: holds a shard set made differently ({'; '.join(diffs)}); pass --overwrite to replace it")

    splits = {as_split: list(source.records)} if as_split else split_records(source, val_fraction, seed)
    workers = workers or usable_cpus()
    everything = [r for recs in splits.values() for r in recs]
    reasons = list(_pool_map(check_image, [str(r.path) for r in everything], workers, "checking", progress))
    rejected = [{"key": r.key, "path": r.rel, "reason": why} for r, why in zip(everything, reasons) if why]
    if rejected and strict:
        lines = [f"{x['path']} ({x['reason']})" for x in rejected[:5]]
        more = f" and {len(rejected) - 5} more" if len(rejected) > 5 else ""
        raise UserError(f"{source.image_root}: {len(rejected)} unreadable image(s): {', '.join(lines)}{more}; nothing written (--strict)")
    bad = {x["key"] for x in rejected}
    splits = {name: [r for r in recs if r.key not in bad] for name, recs in splits.items()}
    splits = {name: recs for name, recs in splits.items() if recs}
    if not splits:
        raise UserError(f"{source.image_root}: no readable images")
    if "train" in splits:
        random.Random(seed).shuffle(splits["train"])

    plan: list[tuple[str, str, list[Record]]] = []
    for name, recs in splits.items():
        pos = 0
        for i, size in enumerate(shard_sizes(len(recs), samples_per_shard)):
            plan.append((name, f"{name}-{i:06d}.tar", recs[pos:pos + size]))
            pos += size

    out.mkdir(parents=True, exist_ok=True)
    # From here on OUT is no finished set until the new _info.json lands.
    (out / INFO).unlink(missing_ok=True)
    for p in out.iterdir():
        if TMP_RE.match(p.name):  # left by a killed run
            p.unlink()
    sha, nbytes = _write_plan(out, plan, resize, quality, workers, progress)
    keep = set(sha)
    for p in out.iterdir():
        if SHARD_RE.match(p.name) and p.name not in keep:
            p.unlink()
    if rejected:
        atomic_write_text(out / REJECTED, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rejected))
    else:
        (out / REJECTED).unlink(missing_ok=True)

    info = _make_info(out, source, splits, plan, sha, params, fingerprint, len(rejected))
    atomic_write_json(out / INFO, info)
    elapsed = time.perf_counter() - start
    print(summary(out, info))
    print(f"{nbytes / 1e6:.1f} MB written in {elapsed:.1f}s, {len(everything) / max(elapsed, 1e-9):.0f} images/s")
    return info


def _write_plan(out: Path, plan: list[tuple[str, str, list[Record]]], resize: int | None, quality: int,
                workers: int, progress: bool) -> tuple[dict[str, str], int]:
    """Write every shard (temp name -> rename); returns sha256 per file and total bytes."""
    tasks = [(str(r.path), resize, quality) for _, _, recs in plan for r in recs]
    results = _pool_map(encode_image, tasks, workers, "writing", progress)
    sha: dict[str, str] = {}
    total = 0
    try:
        for _, filename, recs in plan:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=out)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as f:
                    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                        for r in recs:
                            ext, data = next(results)
                            _tar_member(tar, f"{r.key}.{ext}", data)
                            if r.label is not None:
                                _tar_member(tar, f"{r.key}.cls", str(r.label).encode())
                            _tar_member(tar, f"{r.key}.json", json.dumps(r.meta, ensure_ascii=False).encode())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, out / filename)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            sha[filename] = _sha256(out / filename)
            total += (out / filename).stat().st_size
    finally:
        results.close()  # stops the worker pool, also when a write failed
    return sha, total


def _make_info(out: Path, source: Source, splits: dict[str, list[Record]], plan: list[tuple[str, str, list[Record]]],
               sha: dict[str, str], params: dict, fingerprint: str, n_rejected: int) -> dict:
    split_info = {}
    for name in splits:
        files = [(f, len(recs)) for s, f, recs in plan if s == name]
        split_info[name] = {
            "name": name, "num_samples": sum(n for _, n in files),
            "filenames": [f for f, _ in files], "shard_lengths": [n for _, n in files],
        }
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


# ---------------------------------------------------------------- reading back


def _count(info: dict) -> int:
    return sum(s["num_samples"] for s in info.get("splits", {}).values())


def summary(out: Path, info: dict) -> str:
    """Human summary of a shard set: images per split and class, shards, rejected, ignored."""
    splits = info["splits"]
    lines = [f"{out}: {info['layout']} layout, {_count(info)} images, {sum(len(s['filenames']) for s in splits.values())} shards"]
    width = max(len(n) for n in splits)
    for name, s in splits.items():
        lines.append(f"  {name:<{width}}  {s['num_samples']:>8} images  {len(s['filenames']):>5} shards")
    counts = info.get("label_counts", {})
    if counts:
        names = list(counts)
        cw = max(len(c) for c in info["classes"])
        lines.append("  " + " " * cw + "".join(f"  {n:>10}" for n in names))
        for i, cls in enumerate(info["classes"]):
            lines.append(f"  {cls:<{cw}}" + "".join(f"  {counts[n].get(str(i), 0):>10}" for n in names))
    rej = info.get("rejected", 0)
    lines.append(f"  rejected: {rej}" + (f" (see {out / REJECTED})" if rej else ""))
    ignored = info.get("ignored", {})
    lines.append("  ignored: " + ", ".join(f"{k} {v}" for k, v in ignored.items()))
    return "\n".join(lines)


def inspect(out: str | Path) -> tuple[dict, bool]:
    """Print the summary of the shard set in OUT and verify every shard's sha256.

    Returns (info, all shards present and matching).
    """
    out = Path(out)
    info = _read_info(out)
    if info is None:
        raise UserError(f"{out}: no {INFO}; not a finished shard set (run python -m dist_train.shard --src ... --out {out})")
    print(summary(out, info))
    total, ok = 0, True
    for filename, expected in info.get("sha256", {}).items():
        path = out / filename
        if not path.is_file():
            print(f"  MISSING  {filename}")
            ok = False
            continue
        total += path.stat().st_size
        if _sha256(path) != expected:
            print(f"  MISMATCH {filename}: sha256 differs from {INFO}")
            ok = False
    print(f"  {total / 1e6:.1f} MB; checksums " + ("ok" if ok else "FAILED"))
    return info, ok


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m dist_train.shard",
                description="Shard a raw image set once into WebDataset tars (format: shards/README.md).")
    p.add_argument("--src", type=Path, help="raw image set (mask: train.csv + images/, mask-eval: info.csv + images/, folder: class subfolders)")
    p.add_argument("--out", type=Path, help="output folder (default: shards/<layout>, or shards/<folder name> for the folder layout)")
    p.add_argument("--layout", help=f"one of {', '.join(LAYOUTS)} (default: detected)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of persons (mask) / images per class (folder) in validation (default 0.2; 0: no validation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the train shard order (default 0)")
    p.add_argument("--resize", type=int, metavar="SIDE", help="shrink the shorter side to SIDE (never enlarge), store JPEG")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality with --resize (default 95)")
    p.add_argument("--samples-per-shard", type=int, help="max images per shard (default: >= 64 shards per split, <= 1000 images each)")
    p.add_argument("--workers", type=int, help="decode/resize processes (default: all cores)")
    p.add_argument("--age-bins", default="30,60", help="age group cuts of the mask labels and the split's strata (default 30,60)")
    p.add_argument("--overwrite", action="store_true", help="rebuild OUT even if it holds a set made from another source or arguments, or an up-to-date one")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable image instead of skipping it")
    p.add_argument("--as-split", metavar="NAME", help="put every image into one split NAME (no train/validation split; labels kept)")
    p.add_argument("--inspect", type=Path, metavar="OUT", help="print the summary of an existing shard set and verify its checksums")
    p.add_argument("--grid", type=Path, metavar="PNG", help="with --inspect: draw a contact sheet of a few samples per class")
    p.add_argument("--grid-split", metavar="SPLIT", help="split drawn by --grid (default: train, else the first labeled one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.inspect is not None:
        if args.src is not None:
            raise UserError("--inspect OUT reads an existing shard set; it takes no --src")
        info, ok = inspect(args.inspect)
        if args.grid is not None:
            from .report import contact_sheet  # drawing lives with the other pictures; only this flag needs it

            print(f"contact sheet: {contact_sheet(args.inspect, info, args.grid, split=args.grid_split)}")
        if not ok:
            raise SystemExit(1)
        return
    if args.grid is not None:
        raise UserError("--grid PNG draws an existing shard set: use it with --inspect OUT")
    if args.src is None:
        raise UserError("--src SRC is required (or --inspect OUT)")
    write_shards(
        args.src, args.out, layout=args.layout, val_fraction=args.val_fraction, seed=args.seed,
        resize=args.resize, quality=args.quality, samples_per_shard=args.samples_per_shard,
        workers=args.workers, overwrite=args.overwrite, strict=args.strict, as_split=args.as_split,
        age_bins=args.age_bins, progress=not args.quiet,
    )


if __name__ == "__main__":
    main()
