"""Raw image layouts -> one list of records, and the train/validation split.

Three layouts, auto-detected (`layout=` overrides):

- `mask`: `train.csv` (`id,gender,race,age,path`) + `images/<path>/{mask1..5,incorrect_mask,normal}.ext`.
  SRC may be that folder or its parent holding `train/`.
- `mask-eval`: `info.csv` (`ImageID,ans`) + `images/<ImageID>`; unlabeled, kept in info.csv order
  because predictions must be written back in that order. SRC may be the parent holding `eval/`.
- `folder`: one subfolder per class, classes sorted by name (torchvision ImageFolder convention).

Junk that real image sets carry (macOS `._*` AppleDouble files, other dot-files, Jupyter's
`.ipynb_checkpoints`, stray files) is skipped but counted by reason in `Source.ignored`, so the
user sees it instead of it silently vanishing or failing at decode time. Structural problems
(missing folders, duplicated stems, unparseable csv values, key clashes) raise `UserError`
naming the offenders: they mean the labels cannot be trusted.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UserError
from .labels import (
    DEFAULT_AGE_BINS,
    IMAGE_EXTENSIONS,
    age_group,
    class_names,
    encode,
    mask_status,
    parse_age,
    parse_gender,
)

LAYOUTS = ("mask", "mask-eval", "folder")
MASK_COLUMNS = ("id", "gender", "race", "age", "path")
EVAL_COLUMNS = ("ImageID", "ans")
# The extensions torchvision's ImageFolder accepts: common formats every PIL build decodes.
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Every ignore reason, always reported (zero included) so summaries have a fixed shape.
IGNORE_REASONS = ("appledouble", "dotfiles", "checkpoints", "unknown_stem", "not_image", "unlisted")


@dataclass(frozen=True)
class Record:
    """One source image.

    key: sample key per the shard contract (path below the image root, no extension, '.' -> '_').
    path: the file on disk.  rel: its posix path below the image root (fingerprint, metadata).
    label: class index, None when unlabeled (mask-eval).  meta: the sample's json metadata.
    group: the unit that must not straddle splits (person id for mask, the key otherwise).
    stratum: what the split balances (`gender/age_group` for mask, class name for folder).
    """

    key: str
    path: Path
    rel: str
    label: int | None
    meta: dict = field(hash=False)
    group: str
    stratum: str


@dataclass
class Source:
    """A loaded raw image set.

    root: the resolved layout folder (the one holding train.csv / info.csv / class folders).
    image_root: where `Record.rel` starts.  index_file: the csv read, part of the fingerprint.
    classes: index -> name.  ignored: skipped entries counted by reason (see IGNORE_REASONS).
    """

    layout: str
    root: Path
    image_root: Path
    index_file: Path | None
    records: list[Record]
    classes: list[str]
    ignored: dict[str, int]

    @property
    def labeled(self) -> bool:
        return self.layout != "mask-eval"


def make_key(rel: str) -> str:
    """'000001_female_Asian_45/mask1.jpg' -> '000001_female_Asian_45/mask1' (contract key rule)."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return stem.replace(".", "_")


def _offenders(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _junk_reason(p: Path) -> str | None:
    """Why an entry is skipped regardless of layout, or None if it is a candidate."""
    name = p.name
    if name.startswith("._"):
        return "appledouble"
    if name == ".ipynb_checkpoints" and p.is_dir():
        return "checkpoints"
    if name.startswith("."):
        return "dotfiles"
    return None


def _new_ignored() -> dict[str, int]:
    return {r: 0 for r in IGNORE_REASONS}


def _find(src: Path, name: str, sub: str) -> Path | None:
    """The folder holding `name`: SRC itself or SRC/sub (the competition's parent folder)."""
    for d in (src, src / sub):
        if (d / name).is_file():
            return d
    return None


def detect_layout(src: str | Path) -> str:
    """Tell the layout from what SRC holds; UserError when it matches none."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a folder; expected a raw image set (train.csv + images/, info.csv + images/, or class subfolders)")
    if _find(src, "train.csv", "train"):
        return "mask"
    if _find(src, "info.csv", "eval"):
        return "mask-eval"
    for d in (src, src / "train", src / "eval"):
        if (d / "images").is_dir():
            raise UserError(
                f"{d}: has images/ but no train.csv (mask layout, columns {','.join(MASK_COLUMNS)}) "
                f"or info.csv (mask-eval layout, columns {','.join(EVAL_COLUMNS)})"
            )
    if any(p.is_dir() and _junk_reason(p) is None for p in src.iterdir()):
        return "folder"
    raise UserError(
        f"{src}: empty or unrecognised; expected train.csv + images/ (mask), "
        "info.csv + images/ (mask-eval) or one subfolder per class (folder)"
    )


def load_source(src: str | Path, layout: str | None = None, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> Source:
    """Read SRC in `layout` (auto-detected when None); labels use `age_bins`."""
    src = Path(src)
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if not src.is_dir():
        raise UserError(f"{src}: not a folder; expected a raw image set")
    layout = layout or detect_layout(src)
    if layout == "mask":
        source = _load_mask(src, tuple(age_bins))
    elif layout == "mask-eval":
        source = _load_mask_eval(src, tuple(age_bins))
    else:
        source = _load_folder(src)
    if not source.records:
        raise UserError(f"{source.root}: no images found ({layout} layout)")
    _check_unique_keys(source.records)
    return source


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows as str dicts (ids keep their leading zeros); UserError on a missing file or column."""
    if not path.is_file():
        raise UserError(f"{path}: not found; expected a csv with columns {','.join(columns)}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {','.join(missing)}; expected {','.join(columns)}")
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _resolve(src: Path, csv_name: str, sub: str) -> Path:
    """SRC or SRC/sub, whichever holds `csv_name` (else the one that looks intended, for the error)."""
    found = _find(src, csv_name, sub)
    if found:
        return found
    return src / sub if (src / sub).is_dir() and not (src / "images").is_dir() else src


def _count_top_junk(image_root: Path, listed: set[str], ignored: dict[str, int]) -> None:
    """Count what sits in images/ but is not named by the csv."""
    for p in image_root.iterdir():
        if p.name in listed:
            continue
        ignored[_junk_reason(p) or "unlisted"] += 1


def _load_mask(src: Path, bins: tuple[int, int]) -> Source:
    root = _resolve(src, "train.csv", "train")
    index = root / "train.csv"
    rows = _read_csv(index, MASK_COLUMNS)
    image_root = root / "images"
    if not image_root.is_dir():
        raise UserError(f"{image_root}: not found; the mask layout expects images/<path>/ next to train.csv")

    bad_values, missing, people = [], [], []
    for line, row in enumerate(rows, start=2):
        try:
            people.append((row, parse_gender(row["gender"]), parse_age(row["age"])))
        except ValueError as e:
            bad_values.append(f"line {line} ({row['path']}): {e}")
        if not row["path"] or not (image_root / row["path"]).is_dir():
            missing.append(f"line {line}: {row['path'] or '(empty path)'}")
    if bad_values:
        raise UserError(f"{index}: unparseable values: {_offenders(bad_values)}")
    if missing:
        raise UserError(f"{index}: rows whose folder is missing under {image_root}: {_offenders(missing)}")

    ignored = _new_ignored()
    _count_top_junk(image_root, {r["path"] for r in rows}, ignored)
    records: list[Record] = []
    dups, empty = [], []
    for row, gender, age in people:
        folder = image_root / row["path"]
        by_stem: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            reason = _junk_reason(p)
            if reason is None and p.is_dir():
                reason = "unlisted"
            elif reason is None and p.suffix.lower() not in IMAGE_EXTENSIONS:
                reason = "not_image"
            elif reason is None and mask_status(p.stem) is None:
                reason = "unknown_stem"
            if reason:
                ignored[reason] += 1
                continue
            stem = p.stem.lower()
            if stem in by_stem:
                dups.append(f"{row['path']}/{{{by_stem[stem].name},{p.name}}}")
                continue
            by_stem[stem] = p
        if not by_stem:
            empty.append(row["path"])
        for p in by_stem.values():
            mask = mask_status(p.stem)
            rel = f"{row['path']}/{p.name}"
            meta = {"person_id": row["id"], "gender": gender, "race": row["race"], "age": age, "mask": mask, "path": rel}
            records.append(
                Record(
                    key=make_key(rel), path=p, rel=rel, label=encode(mask, gender, age_group(age, bins)),
                    meta=meta, group=row["id"], stratum=f"{gender}/{age_group(age, bins)}",
                )
            )
    if dups:
        raise UserError(f"{image_root}: the same stem twice in a folder: {_offenders(dups)}")
    if empty:
        raise UserError(
            f"{image_root}: folders with no images (expected mask1..mask5, incorrect_mask, normal "
            f"as {'/'.join(IMAGE_EXTENSIONS)}): {_offenders(empty)}"
        )
    return Source("mask", root, image_root, index, records, class_names(bins), ignored)


def _load_mask_eval(src: Path, bins: tuple[int, int]) -> Source:
    root = _resolve(src, "info.csv", "eval")
    index = root / "info.csv"
    rows = _read_csv(index, EVAL_COLUMNS)
    image_root = root / "images"
    if not image_root.is_dir():
        raise UserError(f"{image_root}: not found; the mask-eval layout expects images/ next to info.csv")
    missing = [f"line {i + 2}: {r['ImageID'] or '(empty)'}" for i, r in enumerate(rows) if not r["ImageID"] or not (image_root / r["ImageID"]).is_file()]
    if missing:
        raise UserError(f"{index}: images missing under {image_root}: {_offenders(missing)}")
    ignored = _new_ignored()
    _count_top_junk(image_root, {r["ImageID"] for r in rows}, ignored)
    records = []
    for i, row in enumerate(rows):
        rel = row["ImageID"]
        key = make_key(rel)
        records.append(
            Record(key=key, path=image_root / rel, rel=rel, label=None,
                   meta={"image_id": rel, "index": i}, group=key, stratum="")
        )
    return Source("mask-eval", root, image_root, index, records, class_names(bins), ignored)


def _walk_images(folder: Path, ignored: dict[str, int]) -> Iterable[Path]:
    """Image files below `folder` in sorted order, junk counted and skipped."""
    for p in sorted(folder.iterdir()):
        reason = _junk_reason(p)
        if reason is None and p.is_dir():
            yield from _walk_images(p, ignored)
            continue
        if reason is None and p.suffix.lower() not in FOLDER_EXTENSIONS:
            reason = "not_image"
        if reason:
            ignored[reason] += 1
            continue
        yield p


def _load_folder(src: Path) -> Source:
    ignored = _new_ignored()
    class_dirs = []
    for p in sorted(src.iterdir()):
        reason = _junk_reason(p)
        if reason is None and p.is_dir():
            class_dirs.append(p)
        else:
            ignored[reason or "unlisted"] += 1
    if not class_dirs:
        raise UserError(f"{src}: no class subfolders; the folder layout expects one subfolder per class")
    classes = [d.name for d in class_dirs]
    records, empty = [], []
    for idx, d in enumerate(class_dirs):
        files = list(_walk_images(d, ignored))
        if not files:
            empty.append(d.name)
        for p in files:
            rel = p.relative_to(src).as_posix()
            key = make_key(rel)
            records.append(
                Record(key=key, path=p, rel=rel, label=idx,
                       meta={"path": rel, "class_name": d.name}, group=key, stratum=d.name)
            )
    if empty:
        raise UserError(
            f"{src}: class folders with no images (expected {'/'.join(FOLDER_EXTENSIONS)}): {_offenders(empty)}"
        )
    return Source("folder", src, src, None, records, classes, ignored)


def _check_unique_keys(records: Sequence[Record]) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for r in records:
        if r.key in seen:
            clashes.append(f"{seen[r.key]} vs {r.rel} -> {r.key}")
        else:
            seen[r.key] = r.rel
    if clashes:
        raise UserError(f"sample keys clash (path without extension, '.' -> '_'): {_offenders(clashes)}")


def split_records(source: Source, val_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Split into `train`/`validation` by group, stratified, deterministic from `seed`.

    Mask: whole persons move together and every (gender, age group) stratum with at least two
    persons gets at least one validation person; a stratum of one person stays in train, where
    it is worth more. Folder: per-class stratified. mask-eval: everything is `test`.
    Each split keeps the source order; `val_fraction` 0 gives train only.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val fraction {val_fraction}: expected 0 <= fraction < 1")
    if not source.labeled:
        return {"test": list(source.records)}
    if val_fraction == 0:
        return {"train": list(source.records)}
    strata: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for r in source.records:
        if r.group not in seen:
            seen.add(r.group)
            strata[r.stratum].append(r.group)
    rng = random.Random(seed)
    val: set[str] = set()
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        rng.shuffle(groups)
        n = len(groups)
        k = min(max(int(n * val_fraction + 0.5), 1), n - 1) if n >= 2 else 0
        val.update(groups[:k])
    return {
        "train": [r for r in source.records if r.group not in val],
        "validation": [r for r in source.records if r.group in val],
    }
