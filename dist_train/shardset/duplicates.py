"""Duplicates in a shard set: found from the fingerprints, merged into the split groups, stored.

The writer fingerprints every image it checks (`images.check_and_encode`), then
`find_duplicates` pairs exact duplicates (same decoded pixels) and near duplicates (pHash, or
the mirrored pHash, within `threshold` bits; flat images only exactly) and joins them with the
layout's own groups (union-find): `regroup` gives every record of a component one group, so the
train/validation split and the folds keep each component on one side.

Files in the shard set (shards/README.md):
- `_fingerprints.npz`: per written image its key, split, label, exact digest, pHash, mirrored
  pHash, flat flag and component; read back only through `read_fingerprints` (no pickle,
  shapes and dtypes checked).
- `_duplicates.csv`: every duplicate pair, closest first, with both labels and `cross_label`
  (the pairs whose labels disagree, which `python -m dist_train.suspects` lists too).
"""

from __future__ import annotations

import csv
import io
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dist_train.errors import UserError, atomic_write_bytes, atomic_write_text

from .dedup import DEFAULT_THRESHOLD, EXACT_BYTES, MAX_THRESHOLD, components, exact_pairs, group_links, near_pairs
from .format import file_sha256
from .sources import Record, Source

FINGERPRINTS_NAME = "_fingerprints.npz"
DUPLICATES_NAME = "_duplicates.csv"
CONTACT_NAME = "_duplicates.png"
GIANT_FRACTION, GIANT_MIN = 0.05, 20
CSV_COLUMNS = ["kind", "distance", "mirrored", "key_a", "split_a", "label_a", "key_b", "split_b", "label_b",
               "cross_label"]
FORMAT_VERSION = 1


@dataclass
class Fingerprints:
    """Column arrays, one row per image (the contents of `_fingerprints.npz`)."""

    key: np.ndarray  # str
    split: np.ndarray  # str
    label: np.ndarray  # int64, -1 unlabeled
    exact: np.ndarray  # uint8 (n, 16)
    phash: np.ndarray  # uint64
    mirror: np.ndarray  # uint64
    flat: np.ndarray  # bool
    group: np.ndarray  # int64: the component (row of its first member)

    def __len__(self) -> int:
        return len(self.key)


@dataclass
class Pairs:
    """Duplicate pairs (rows into a Fingerprints, or into two of them), closest first."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray  # 0 for exact
    exact: np.ndarray  # bool
    mirrored: np.ndarray  # bool: matched through the mirrored hash only
    ignored_near: int = 0  # near pairs left out because they chained too much (`find_duplicates`)
    layout_groups: int = 0  # the layout's own groups, before duplicates joined them

    def __len__(self) -> int:
        return len(self.a)


def make_fingerprints(records: Sequence[Record], fps: Sequence[tuple[bytes, int, int, bool]],
                      split: Sequence[str] | None = None) -> Fingerprints:
    n = len(records)
    return Fingerprints(
        key=np.array([r.key for r in records], dtype=str),
        split=np.array(list(split) if split is not None else [""] * n, dtype=str),
        label=np.array([-1 if r.label is None else r.label for r in records], dtype=np.int64),
        exact=np.frombuffer(b"".join(f[0] for f in fps), dtype=np.uint8).reshape(n, EXACT_BYTES),
        phash=np.array([f[1] for f in fps], dtype=np.uint64),
        mirror=np.array([f[2] for f in fps], dtype=np.uint64),
        flat=np.array([f[3] for f in fps], dtype=bool),
        group=np.arange(n, dtype=np.int64),
    )


def pairs_between(a: Fingerprints, b: Fingerprints | None, threshold: int) -> Pairs:
    """Duplicate pairs inside `a` (b None; each once, a < b) or between `a` and `b`."""
    same = b is None
    b = a if b is None else b
    ea, eb = exact_pairs_between(a.exact, None if same else b.exact)
    found = [(ea, eb, np.zeros(len(ea), np.int64), np.ones(len(ea), bool), np.zeros(len(ea), bool))]
    ia, ib = np.flatnonzero(~a.flat), np.flatnonzero(~b.flat)
    for mirrored, query in ((False, b.phash[ib]), (True, b.mirror[ib])):
        qi, xi, d = near_pairs(a.phash[ia], None if same and not mirrored else query, threshold)
        pa, pb = (ia[xi], ib[qi]) if not (same and not mirrored) else (ia[qi], ia[xi])
        if same:  # a pair within one set: once, ordered, an image never with its own mirror
            keep = pa != pb
            pa, pb, d = np.minimum(pa, pb)[keep], np.maximum(pa, pb)[keep], d[keep]
        found.append((pa, pb, d, np.zeros(len(pa), bool), np.full(len(pa), mirrored)))
    cat = [np.concatenate(col) for col in zip(*found)]
    # one row per pair: exact first, then the smaller distance, then unmirrored
    order = np.lexsort((cat[4], cat[2], ~cat[3], cat[1], cat[0]))
    cat = [c[order] for c in cat]
    first = np.ones(len(cat[0]), bool)
    first[1:] = (cat[0][1:] != cat[0][:-1]) | (cat[1][1:] != cat[1][:-1])
    cat = [c[first] for c in cat]
    order = np.lexsort((cat[1], cat[0], cat[4], cat[2], ~cat[3]))
    return Pairs(*[c[order] for c in cat])


def exact_pairs_between(x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact pairs inside x (each duplicate with the first of its digest) or every x-y match."""
    if y is None:
        return exact_pairs(x)
    void = np.dtype((np.void, EXACT_BYTES))
    kx, ky = x.view(void).reshape(-1), y.view(void).reshape(-1)
    order = np.argsort(kx, kind="stable")
    lo, hi = np.searchsorted(kx[order], ky, "left"), np.searchsorted(kx[order], ky, "right")
    n = hi - lo
    rows = np.repeat(np.arange(len(ky)), n)
    offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    return order[np.repeat(lo, n) + offsets].astype(np.int64), rows.astype(np.int64)


def check_threshold(threshold: int) -> int:
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise UserError(f"--dup-threshold {threshold}: expected 0..{MAX_THRESHOLD} bits of 64 "
                        f"(default {DEFAULT_THRESHOLD})")
    return threshold


def group_duplicates(source: Source, records: list[Record], fps: Sequence[tuple], threshold: int
                     ) -> tuple[Source, Fingerprints, Pairs]:
    """The source with only `records` (the readable ones), regrouped; their fingerprints; the pairs."""
    fp = make_fingerprints(records, fps)
    pairs, regrouped = find_duplicates(records, fp, threshold)
    return replace(source, records=regrouped), fp, pairs


def find_duplicates(records: Sequence[Record], fp: Fingerprints, threshold: int) -> tuple[Pairs, list[Record]]:
    """The duplicate pairs, and the records regrouped so that every component of duplicates and
    layout groups shares one group (`fp.group` is filled in).

    Near pairs chain (a~b~c...): when they would put more than GIANT_FRACTION of the images
    (and over twice the largest layout group, and over GIANT_MIN) into one component, the images are too alike for
    the perceptual hash at this threshold (templated or synthetic pictures) and only the exact
    pairs are kept, with a warning: one giant group would leave nothing to validate on.
    """
    n, layout = len(records), group_links([r.group for r in records])
    pairs = pairs_between(fp, None, threshold)
    comp, layout_comp = components(n, [layout, (pairs.a, pairs.b)]), components(n, [layout])
    largest_layout = int(np.bincount(layout_comp).max()) if n else 0
    largest = int(np.bincount(comp).max()) if n else 0
    if largest > max(2 * largest_layout, GIANT_FRACTION * n, GIANT_MIN) and (~pairs.exact).any():
        near = int((~pairs.exact).sum())
        pairs = Pairs(*(x[pairs.exact] for x in (pairs.a, pairs.b, pairs.distance, pairs.exact, pairs.mirrored)))
        pairs.ignored_near = near
        print(f"warning: {near} near-duplicate pairs (<= {threshold} bits) would chain {largest} of {n} images into "
              "one group: the images are too alike for the perceptual hash; only exact duplicates group the split "
              "(a lower --dup-threshold may separate them)", file=sys.stderr)
        comp = components(n, [layout, (pairs.a, pairs.b)])
    fp.group = comp
    pairs.layout_groups = len(np.unique(layout_comp))
    regrouped = [r if comp[i] == i or records[comp[i]].group == r.group else replace(r, group=records[comp[i]].group)
                 for i, r in enumerate(records)]
    return pairs, regrouped


def counts(fp: Fingerprints, pairs: Pairs) -> dict[str, int]:
    """What the shard step prints and records in `_info.json`."""
    cross = cross_label(fp, fp, pairs)
    return {"exact_pairs": int(pairs.exact.sum()), "near_pairs": int((~pairs.exact).sum()),
            "near_pairs_ignored": pairs.ignored_near, "images_in_pairs": len(np.union1d(pairs.a, pairs.b)),
            "groups_before": pairs.layout_groups, "groups": len(np.unique(fp.group)),
            "cross_label_pairs": int(cross.sum())}


def cross_label(fa: Fingerprints, fb: Fingerprints, pairs: Pairs) -> np.ndarray:
    la, lb = fa.label[pairs.a], fb.label[pairs.b]
    return (la >= 0) & (lb >= 0) & (la != lb)


def pairs_csv(fa: Fingerprints, fb: Fingerprints, pairs: Pairs, classes: Sequence[str] | None = None) -> str:
    """`_duplicates.csv` text (CSV_COLUMNS): labels as class names when `classes` is given."""
    def name(label: int) -> str:
        return "" if label < 0 else classes[label] if classes and label < len(classes) else str(label)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    cross = cross_label(fa, fb, pairs)
    for k in range(len(pairs)):
        i, j = int(pairs.a[k]), int(pairs.b[k])
        w.writerow(["exact" if pairs.exact[k] else "near", int(pairs.distance[k]), int(pairs.mirrored[k]),
                    fa.key[i], fa.split[i], name(int(fa.label[i])), fb.key[j], fb.split[j], name(int(fb.label[j])),
                    int(cross[k])])
    return buf.getvalue()


CONTACT_PAIRS = 24  # pairs drawn in the contact sheet, closest first


def store(out: Path, fp: Fingerprints, pairs: Pairs, source: Source, splits: dict[str, list[Record]],
          threshold: int, draw_pairs: Callable | None = None) -> dict:
    """Write `_fingerprints.npz` and `_duplicates.csv` (none without pairs) into OUT, print the
    counts, draw the closest pairs; returns the `_info.json` entry."""
    split_of = {r.key: name for name, recs in splits.items() for r in recs}
    fp.split = np.array([split_of.get(k, "") for k in fp.key.tolist()], dtype=str)
    write_fingerprints(out / FINGERPRINTS_NAME, fp, threshold)
    # a previous set's _duplicates.csv/.png went with its shards (outdir.SIDE_NAMES, writer._replace_shards)
    found = counts(fp, pairs)
    if len(pairs):
        write_pairs(out / DUPLICATES_NAME, fp, pairs, source.classes)
    print(f"duplicates: {found['exact_pairs']} exact and {found['near_pairs']} near pair(s) (<= {threshold} bits), "
          f"{found['images_in_pairs']} images; {found['groups_before']} groups -> {found['groups']}; "
          f"{found['cross_label_pairs']} pair(s) with different labels"
          + (f": {out / DUPLICATES_NAME}" if len(pairs) else ""))
    if len(pairs) and draw_pairs is not None:
        paths = {r.key: r.path for r in source.records}
        shown = [(paths[fp.key[i]], paths[fp.key[j]], pair_caption(fp, pairs, k, source.classes))
                 for k, (i, j) in enumerate(zip(pairs.a[:CONTACT_PAIRS], pairs.b[:CONTACT_PAIRS]))]
        draw_pairs(out / CONTACT_NAME, shown, f"{len(pairs)} duplicate pairs, closest first (of {out})")
        print(f"duplicates: contact sheet of the closest {len(shown)}: {out / CONTACT_NAME}")
    return {"file": FINGERPRINTS_NAME, "sha256": file_sha256(out / FINGERPRINTS_NAME), "threshold": threshold, **found}


def pair_caption(fa: Fingerprints, pairs: Pairs, k: int, classes: Sequence[str] | None = None,
             fb: Fingerprints | None = None) -> str:
    fb = fa if fb is None else fb
    i, j = int(pairs.a[k]), int(pairs.b[k])
    how = "exact" if pairs.exact[k] else f"{int(pairs.distance[k])} bits" + (" mirrored" if pairs.mirrored[k] else "")

    def lab(f: Fingerprints, x: int) -> str:
        v = int(f.label[x])
        return "" if v < 0 else f" [{classes[v] if classes and v < len(classes) else v}]"

    return f"{how}\n{fa.split[i]}:{fa.key[i]}{lab(fa, i)}\n{fb.split[j]}:{fb.key[j]}{lab(fb, j)}"


MAX_CSV_BYTES = 1 << 30


def cross_label_pairs(root: str | Path, keys: set[str]) -> list[dict[str, str]]:
    """The rows of a local shard set's `_duplicates.csv` whose labels differ and whose images are
    both among `keys` (e.g. a cross-validation's samples); [] when the set has no such file."""
    path = Path(root) / DUPLICATES_NAME
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_CSV_BYTES:
        raise UserError(f"{path}: larger than {MAX_CSV_BYTES} bytes; expected the shard step's duplicate list")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != CSV_COLUMNS:
            raise UserError(f"{path}: columns {reader.fieldnames}; expected {','.join(CSV_COLUMNS)}")
        return [r for r in reader if r["cross_label"] == "1" and r["key_a"] in keys and r["key_b"] in keys]


# ----------------------------------------------------------------------------- the npz file
def write_fingerprints(path: Path, fp: Fingerprints, threshold: int) -> None:
    buf = io.BytesIO()
    np.savez(buf, version=np.int64(FORMAT_VERSION), threshold=np.int64(threshold), key=fp.key, split=fp.split,
             label=fp.label, exact=fp.exact, phash=fp.phash, mirror=fp.mirror, flat=fp.flat, group=fp.group)
    atomic_write_bytes(path, buf.getvalue())


def write_pairs(path: Path, fp: Fingerprints, pairs: Pairs, classes: Sequence[str]) -> None:
    atomic_write_text(path, pairs_csv(fp, fp, pairs, classes))


_SCHEMA = {"key": ("U", 1), "split": ("U", 1), "label": ("i", 1), "exact": ("u", 2), "phash": ("u", 1),
           "mirror": ("u", 1), "flat": ("b", 1), "group": ("i", 1)}
MAX_KEY_CHARS = 4096


def read_fingerprints(path: str | Path) -> tuple[Fingerprints, int]:
    """(fingerprints, threshold) from a `_fingerprints.npz` someone else may have written: no
    pickle, every array's kind, rank and length checked; anything else is one UserError line."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a fingerprint file ({type(e).__name__}: {e}); expected {FINGERPRINTS_NAME} "
                        "written by python -m dist_train.shard") from None
    missing = [k for k in (*_SCHEMA, "version", "threshold") if k not in arrays]
    if missing:
        raise UserError(f"{path}: missing array(s) {', '.join(missing)}; expected {FINGERPRINTS_NAME} of format "
                        f"{FORMAT_VERSION}")
    if arrays["version"].shape != () or int(arrays["version"]) != FORMAT_VERSION:
        raise UserError(f"{path}: format version {arrays['version']!r}; expected {FORMAT_VERSION}")
    n = len(arrays["key"]) if arrays["key"].ndim == 1 else -1
    for name, (kind, ndim) in _SCHEMA.items():
        a = arrays[name]
        if a.dtype.kind != kind or a.ndim != ndim or len(a) != n or (name == "exact" and a.shape[1:] != (EXACT_BYTES,)):
            raise UserError(f"{path}: array {name!r} is {a.dtype}{list(a.shape)}; expected kind {kind!r}, "
                            f"{ndim} dimension(s), {max(n, 0)} rows")
    if arrays["key"].dtype.itemsize > 4 * MAX_KEY_CHARS or (n and (arrays["group"].min() < 0 or arrays["group"].max() >= n)):
        raise UserError(f"{path}: keys longer than {MAX_KEY_CHARS} characters or groups out of range")
    threshold = int(arrays["threshold"]) if arrays["threshold"].shape == () else -1
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise UserError(f"{path}: threshold {arrays['threshold']!r}; expected 0..{MAX_THRESHOLD}")
    fields = {name: arrays[name] for name in _SCHEMA}
    fields["exact"] = fields["exact"].astype(np.uint8)
    fields["phash"], fields["mirror"] = fields["phash"].astype(np.uint64), fields["mirror"].astype(np.uint64)
    return Fingerprints(**fields), threshold
