"""The competition's raw layouts, registered with the shard writer by the mask task.

- `mask`: `train.csv` (`id,gender,race,age,path`) + `images/<path>/{mask1..5,incorrect_mask,normal}.ext`.
  SRC may be that folder or its parent holding `train/`. Records are grouped by person (the
  split never puts one person on both sides) and stratified by gender x age group.
- `mask-eval`: `info.csv` (`ImageID,ans`) + `images/<ImageID>`; unlabeled, kept in info.csv order
  because predictions must be written back in that order. SRC may be the parent holding `eval/`.

Both record the age cut (`age_bins`) the labels were computed with.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from dist_train.errors import UserError
from dist_train.shardset.sources import (
    Layout,
    Record,
    Source,
    count_top_junk,
    find_dir,
    junk_reason,
    make_key,
    new_ignored,
    offenders,
    resolve_dir,
)
from dist_train.shardset.tree import SourceTree
from dist_train.trust.tables import index_path, read_table

from .labels import (
    DEFAULT_AGE_BINS,
    IMAGE_EXTENSIONS,
    MASK_STEMS,
    age_group,
    class_names,
    encode,
    mask_status,
    parse_age,
    parse_age_bins,
    parse_gender,
)

MASK_COLUMNS = ("id", "gender", "race", "age", "path")
EVAL_COLUMNS = ("ImageID", "ans")
# A csv of another labeled set found where the competition's index goes: what that user needs instead.
OTHER_SETS = (" (the mask competition's index; any other labeled image set: one subfolder per class, "
              "the folder layout)")


def layout_options(raw: dict) -> dict:
    """The recorded options: the age cut of the labels (`--age-bins`, default 30,60)."""
    try:
        return {"age_bins": list(parse_age_bins(raw.get("age_bins") or DEFAULT_AGE_BINS))}
    except ValueError as e:
        raise UserError(f"--age-bins: {e}") from None


def _near_miss(src: Path) -> None:
    """images/ without either csv: say which csv each layout needs instead of 'unrecognised'."""
    for d in (src, src / "train", src / "eval"):
        if (d / "images").is_dir():
            raise UserError(
                f"{d}: has images/ but no train.csv (mask layout, columns {','.join(MASK_COLUMNS)}) "
                f"or info.csv (mask-eval layout, columns {','.join(EVAL_COLUMNS)})"
            )


def _detect_mask(src: Path) -> bool:
    return find_dir(src, "train.csv", "train") is not None


def _detect_mask_eval(src: Path) -> bool:
    if find_dir(src, "info.csv", "eval") is not None:
        return True
    _near_miss(src)  # checked last among the mask layouts, before the folder layout
    return False


def _person_images(folder: Path, rel: str, ignored: dict[str, int], dups: list[str],
                   tree: SourceTree) -> dict[str, Path]:
    """A person's photos by lower-case stem; junk, non-images, unknown stems, links out of images/,
    repeats and special files counted, a stem seen twice (mask1.jpg + mask1.png) added to `dups`."""
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        reason = junk_reason(p)
        if reason is None and p.is_dir():
            reason = "unlisted"
        elif reason is None and p.suffix.lower() not in IMAGE_EXTENSIONS:
            reason = "not_image"
        elif reason is None and mask_status(p.stem) is None:
            reason = "unknown_stem"
        if reason:
            ignored[reason] += 1
            continue
        if tree.kind(p) != "file":  # counted by the tree
            continue
        stem = p.stem.lower()
        if stem in by_stem:
            dups.append(f"{rel}/{{{by_stem[stem].name},{p.name}}}")
            continue
        by_stem[stem] = p
    return by_stem


def _index_paths(index: Path, rows: list[tuple[int, dict[str, str]]], column: str,
                 image_root: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows with `column` made canonical (`a/`, `./a` -> `a`: one image, one key); every path must
    name something below images/: relative, no '..', not empty."""
    out, bad = [], []
    for line, row in rows:
        rel = index_path(row[column])
        if rel is None:
            bad.append(f"line {line}: {row[column]!r}" if row[column] else f"line {line}: (empty)")
        out.append((line, {**row, column: rel}))
    if bad:
        raise UserError(f"{index}: paths that do not stay under {image_root}: {offenders(bad)}; expected a "
                        "relative name without '..'")
    return out


def _load_mask(src: Path, options: dict) -> Source:
    bins = tuple(options["age_bins"])
    root = resolve_dir(src, "train.csv", "train")
    index = root / "train.csv"
    table = read_table(index, MASK_COLUMNS, OTHER_SETS)
    image_root = root / "images"
    if not image_root.is_dir():
        raise UserError(f"{image_root}: not found; the mask layout expects images/<path>/ next to train.csv")
    rows = _index_paths(index, table, "path", image_root)
    ignored = new_ignored()
    tree = SourceTree(image_root, ignored)
    bad_values, missing, people = [], [], []
    for line, row in rows:
        try:
            people.append((row, parse_gender(row["gender"]), parse_age(row["age"])))
        except ValueError as e:
            bad_values.append(f"line {line} ({row['path']}): {e}")
        if not (image_root / row["path"]).is_dir() or tree.kind(image_root / row["path"]) != "dir":
            missing.append(f"line {line}: {row['path']}")
    if bad_values:
        raise UserError(f"{index}: unparseable values: {offenders(bad_values)}")
    if missing:
        raise UserError(f"{index}: rows whose folder is missing under {image_root} (or leads out of it, or is "
                        f"listed twice): {offenders(missing)}")

    count_top_junk(image_root, {r["path"].split("/")[0] for _, r in rows}, ignored)
    records: list[Record] = []
    dups, empty = [], []
    short = []
    for row, gender, age in people:
        by_stem = _person_images(image_root / row["path"], row["path"], ignored, dups, tree)
        if not by_stem:
            empty.append(row["path"])
        elif len(by_stem) < len(MASK_STEMS):
            short.append(f"{row['path']} (no {', '.join(sorted(set(MASK_STEMS) - set(by_stem)))})")
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
        raise UserError(f"{image_root}: the same stem twice in a folder: {offenders(dups)}")
    if empty:
        raise UserError(
            f"{image_root}: folders with no images (expected mask1..mask5, incorrect_mask, normal "
            f"as {'/'.join(IMAGE_EXTENSIONS)}): {offenders(empty)}"
        )
    if short:  # the competition's persons have all seven: a partial copy, most likely
        warnings.warn(f"{image_root}: {len(short)} person folder(s) without all 7 photos, sharded as they are: "
                      f"{offenders(short)}", stacklevel=2)
    return Source("mask", root, image_root, index, records, class_names(bins), ignored)


def _load_mask_eval(src: Path, options: dict) -> Source:
    bins = tuple(options["age_bins"])
    root = resolve_dir(src, "info.csv", "eval")
    index = root / "info.csv"
    table = read_table(index, EVAL_COLUMNS, OTHER_SETS)
    image_root = root / "images"
    if not image_root.is_dir():
        raise UserError(f"{image_root}: not found; the mask-eval layout expects images/ next to info.csv")
    lines = _index_paths(index, table, "ImageID", image_root)
    rows = [r for _, r in lines]
    given = [r["ImageID"] for _, r in table]  # the submission echoes info.csv's own ImageIDs
    ignored = new_ignored()
    tree = SourceTree(image_root, ignored)
    missing = [f"line {line}: {r['ImageID']}" for line, r in lines
               if not (image_root / r["ImageID"]).is_file() or tree.kind(image_root / r["ImageID"]) != "file"]
    if missing:
        raise UserError(f"{index}: images missing under {image_root} (or not regular files in it, or listed "
                        f"twice): {offenders(missing)}")
    count_top_junk(image_root, {r["ImageID"].split("/")[0] for r in rows}, ignored)
    records = []
    for i, (row, image_id) in enumerate(zip(rows, given)):
        rel = row["ImageID"]
        key = make_key(rel)
        records.append(
            Record(key=key, path=image_root / rel, rel=rel, label=None,
                   meta={"image_id": image_id, "index": i}, group=key, stratum="")
        )
    return Source("mask-eval", root, image_root, index, records, class_names(bins), ignored, labeled=False)


MASK = Layout("mask", _detect_mask, _load_mask, "train.csv + images/", layout_options, named_by_layout=True)
MASK_EVAL = Layout("mask-eval", _detect_mask_eval, _load_mask_eval, "info.csv + images/", layout_options,
                   named_by_layout=True)
