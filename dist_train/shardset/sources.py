"""Raw image layouts -> one list of records, and the train/validation split.

A layout is a `Layout`: how to recognise it in a folder, how to read it into `Record`s, and
which options it records in the shard set. `folder` (one subfolder per class, classes sorted by
name, torchvision's ImageFolder convention) is built in; tasks register their own layouts with
`register_layout` when `dist_train.plugins` loads them. The folder layout's one option, `classes`
(`--classes-from SHARDS`), gives the class list instead: a hold-out set numbered like the
training set, a class without a folder (or with an empty one) counted with 0 images.
Detection tries the registered layouts first, then `folder`.

Junk that real image sets carry (macOS `._*` AppleDouble files and the `__MACOSX/` folder a Mac's
zip unpacks them into, other dot-files, Jupyter's
`.ipynb_checkpoints`, stray files) is skipped but counted by reason in `Source.ignored`, so the
user sees it instead of it silently vanishing or failing at decode time. Links out of the
source, entries reached twice and special files are skipped and counted too (`tree`). Structural problems
(missing folders, duplicated stems, unparseable csv values, key clashes) raise `UserError`
naming the offenders: they mean the labels cannot be trusted.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from dist_train import plugins
from dist_train.errors import UserError

from .tree import TREE_REASONS, SourceTree

# The extensions torchvision's ImageFolder accepts: common formats every PIL build decodes.
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Every ignore reason, always reported (zero included) so summaries have a fixed shape.
IGNORE_REASONS = ("appledouble", "dotfiles", "checkpoints", "unknown_stem", "not_image", "unlisted", *TREE_REASONS)


@dataclass(frozen=True)
class Record:
    """One source image.

    key: sample key per the shard contract (path below the image root, no extension, '.' -> '_').
    path: the file on disk.  rel: its posix path below the image root (fingerprint, metadata).
    label: class index, None when unlabeled.  meta: the sample's json metadata.
    group: the unit that must not straddle splits (e.g. a person; the key when samples stand alone).
    stratum: what the split balances (e.g. the class name).
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

    root: the resolved layout folder.  image_root: where `Record.rel` starts.
    index_file: the csv read, part of the fingerprint.  classes: index -> name.
    ignored: skipped entries counted by reason (see IGNORE_REASONS).
    labeled: False for a set that only gets predicted (all of it becomes the `test` split).
    options: the layout's resolved options, recorded in the shard set's params.
    """

    layout: str
    root: Path
    image_root: Path
    index_file: Path | None
    records: list[Record]
    classes: list[str]
    ignored: dict[str, int]
    labeled: bool = True
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """A raw layout the shard writer reads.

    detect(src): whether SRC holds this layout (may raise UserError for a near miss).
    load(src, options): the records. options(raw): the options this layout records in
    `_info.json` params, validated and with defaults (raw: what the command line gave).
    hint: what the layout looks like, for errors. named_by_layout: the default output folder is
    shards/<layout> (else shards/<folder name>).
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, dict], Source]
    hint: str
    options: Callable[[dict], dict] = lambda raw: {}
    named_by_layout: bool = False


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> None:
    """Make a layout known to the writer (and to `--layout`); registering a name again replaces it."""
    _LAYOUTS[layout.name] = layout


def layouts() -> list[Layout]:
    """Registered layouts in detection order, `folder` last (the plug-ins loaded first)."""
    plugins.load()
    return [*_LAYOUTS.values(), FOLDER]


def get_layout(name: str) -> Layout:
    found = {lay.name: lay for lay in layouts()}
    if name not in found:
        raise UserError(f"layout {name!r}: expected one of {', '.join(found)}")
    return found[name]


def make_key(rel: str) -> str:
    """'person_7/photo.1.jpg' -> 'person_7/photo_1' (contract key rule)."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return stem.replace(".", "_")


def offenders(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def junk_reason(p: Path) -> str | None:
    """Why an entry is skipped regardless of layout, or None if it is a candidate."""
    name = p.name
    if name.startswith("._") or name == "__MACOSX":  # the folder a zip made on a Mac unpacks them into
        return "appledouble"
    if name == ".ipynb_checkpoints" and p.is_dir():
        return "checkpoints"
    if name.startswith("."):
        return "dotfiles"
    return None


def new_ignored() -> dict[str, int]:
    return {r: 0 for r in IGNORE_REASONS}


def find_dir(src: Path, name: str, sub: str) -> Path | None:
    """The folder holding file `name`: SRC itself or SRC/sub (a dataset's parent folder)."""
    for d in (src, src / sub):
        if (d / name).is_file():
            return d
    return None


def resolve_dir(src: Path, name: str, sub: str) -> Path:
    """SRC or SRC/sub, whichever holds `name` (else the one that looks intended, for the error)."""
    found = find_dir(src, name, sub)
    if found:
        return found
    return src / sub if (src / sub).is_dir() and not (src / "images").is_dir() else src


def count_top_junk(image_root: Path, listed: set[str], ignored: dict[str, int]) -> None:
    """Count what sits in an image folder but is not named by the index csv."""
    for p in image_root.iterdir():
        if p.name in listed:
            continue
        ignored[junk_reason(p) or "unlisted"] += 1


def _expected() -> str:
    hints = [f"{lay.hint} ({lay.name})" for lay in layouts()]
    return ", ".join(hints[:-1]) + " or " + hints[-1] if len(hints) > 1 else hints[0]


def detect_layout(src: str | Path) -> str:
    """Tell the layout from what SRC holds; UserError when it matches none."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a folder; expected a raw image set: {_expected()}")
    for lay in layouts():
        if lay.detect(src):
            return lay.name
    raise UserError(f"{src}: empty or unrecognised; expected {_expected()}")


def load_source(src: str | Path, layout: str | None = None, options: dict | None = None) -> Source:
    """Read SRC in `layout` (auto-detected when None) with the layout's resolved `options`."""
    src = Path(src)
    lay = get_layout(layout) if layout is not None else None
    if not src.is_dir():
        raise UserError(f"{src}: not a folder; expected a raw image set")
    lay = lay or get_layout(detect_layout(src))
    if (options or {}).get("classes") is not None and lay is not FOLDER:
        raise UserError(f"--classes-from: {src} is a {lay.name}-layout set; a class list from another shard set "
                        "applies to the folder layout (one subfolder per class) only")
    resolved = lay.options(options or {})
    source = lay.load(src, resolved)
    source.options = resolved
    if not source.records:
        raise UserError(f"{source.root}: no images found ({lay.name} layout)")
    _check_unique_keys(source.records, source.image_root)
    return source


# ----------------------------------------------------------------------------- folder
def walk_images(folder: Path, ignored: dict[str, int], tree: SourceTree) -> Iterable[Path]:
    """Image files below `folder` in sorted order, junk, links out and repeats counted and skipped
    (also how `predict --images` reads a folder)."""
    for p in sorted(folder.iterdir()):
        reason = junk_reason(p)
        if reason is None and not p.is_dir() and p.suffix.lower() not in FOLDER_EXTENSIONS:
            reason = "not_image"
        if reason:
            ignored[reason] += 1
            continue
        kind = tree.kind(p)
        if kind == "dir":
            yield from walk_images(p, ignored, tree)
        elif kind == "file":
            yield p


def _detect_folder(src: Path) -> bool:
    return any(p.is_dir() and junk_reason(p) is None for p in src.iterdir())


def _class_dirs(src: Path, ignored: dict[str, int], tree: SourceTree) -> list[Path]:
    class_dirs = []
    for p in sorted(src.iterdir()):
        reason = junk_reason(p)
        if reason is None and p.is_dir():
            if tree.kind(p) == "dir":  # a link out of SRC, or to a class already seen, is no class
                class_dirs.append(p)
        else:
            ignored[reason or "unlisted"] += 1
    if not class_dirs:
        raise UserError(f"{src}: no class subfolders; the folder layout expects one subfolder per class")
    return class_dirs


def _folder_options(raw: dict) -> dict:
    """`classes`: the class list to number the folders by (`--classes-from`), recorded only when given
    (a set sharded without it keeps the params it always had)."""
    given = raw.get("classes")
    if given is None:
        return {}
    if not given or not all(isinstance(c, str) and c for c in given) or len(set(given)) != len(given):
        raise UserError(f"--classes-from: expected a list of distinct class names, not {given!r}")
    return {"classes": list(given)}


def _given_classes(src: Path, class_dirs: list[Path], given: list[str]) -> list[str]:
    """The class list of --classes-from, every class folder of SRC one of its names."""
    unknown = [d.name for d in class_dirs if d.name not in set(given)]
    if unknown:
        raise UserError(f"{src}: class folder(s) {offenders(unknown)} not among the {len(given)} classes of "
                        f"--classes-from ({offenders(given, 20)}); expected folders named after those classes "
                        "(a class without a folder is fine: it gets 0 images)")
    return list(given)


def _load_folder(src: Path, options: dict) -> Source:
    ignored = new_ignored()
    tree = SourceTree(src, ignored)
    class_dirs = _class_dirs(src, ignored, tree)
    given = options.get("classes")
    if given is None:
        _refuse_split_folders(src, class_dirs)
        classes = [d.name for d in class_dirs]
    else:
        classes = _given_classes(src, class_dirs, given)
    index = {name: i for i, name in enumerate(classes)}
    records, empty = [], []
    for d in class_dirs:
        files = list(walk_images(d, ignored, tree))
        if not files:
            empty.append(d.name)
        for p in files:
            rel = p.relative_to(src).as_posix()
            key = make_key(rel)
            records.append(
                Record(key=key, path=p, rel=rel, label=index[d.name],
                       meta={"path": rel, "class_name": d.name}, group=key, stratum=d.name)
            )
    if empty and given is None:  # with a given class list an empty folder is a class with 0 images
        raise UserError(
            f"{src}: class folders with no images (expected {'/'.join(FOLDER_EXTENSIONS)}): {offenders(empty)}"
        )
    return Source("folder", src, src, None, records, classes, ignored)


# Folder names that mean a split, not a class (data/train/<class>/, data/val/<class>/).
SPLIT_FOLDER_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev"})


def _refuse_split_folders(src: Path, class_dirs: list[Path]) -> None:
    """SRC/train/<class>/, SRC/val/<class>/ given as SRC would train a 'train'-vs-'val' classifier:
    refused when every would-be class is named like a split and holds class-like subfolders."""
    if not all(d.name.lower() in SPLIT_FOLDER_NAMES for d in class_dirs):
        return
    if not all(any(c.is_dir() and junk_reason(c) is None for c in d.iterdir()) for d in class_dirs):
        return
    names = ", ".join(d.name for d in class_dirs)
    train = next((d for d in class_dirs if d.name.lower() in ("train", "training")), class_dirs[0])
    raise UserError(f"{src}: its subfolders ({names}) are splits holding class folders, not classes; expected one "
                    f"subfolder per class: shard the training split (--src {train}) and each other one as "
                    "its own set (--as-split NAME), or rename the folders if they really are your classes")


FOLDER = Layout("folder", _detect_folder, _load_folder, "one subfolder per class", _folder_options)


def _check_unique_keys(records: Sequence[Record], image_root: Path) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for r in records:
        if r.key in seen:
            clashes.append(f"{seen[r.key]} vs {r.rel} -> {r.key}")
        else:
            seen[r.key] = r.rel
    if clashes:
        raise UserError(f"{image_root}: sample keys clash (path without extension, '.' -> '_'): {offenders(clashes)}; "
                        "expected one image per name once the extension is dropped (rename one of each pair)")


# ----------------------------------------------------------------------------- split
def split_records(source: Source, val_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Split into `train`/`validation` by group, stratified, deterministic from `seed`.

    Whole groups move together and every stratum with at least two groups gets at least one
    validation group; a stratum of one group stays in train, where it is worth more. An
    unlabeled source is all `test`. Each split keeps the source order; `val_fraction` 0 gives
    train only.
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


def assign_folds(records: Sequence[Record], folds: int, seed: int) -> dict[str, int]:
    """key -> fold 0..folds-1: whole groups per fold, each stratum spread evenly, deterministic.

    Within each stratum (in sorted order) the groups, shuffled by `seed` and then taken largest
    first, each go to the fold holding the fewest of that stratum's samples so far, ties to the
    fold with the fewest samples overall, then the lowest index (greedy balancing): with equal
    groups (a person's 7 photos) every fold gets floor or ceil of a stratum's groups.
    """
    if folds < 2:
        raise UserError(f"--folds {folds}: expected 2 or more")
    size: dict[str, int] = defaultdict(int)
    strata: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if r.group not in size:
            strata[r.stratum].append(r.group)
        size[r.group] += 1
    if len(size) < folds:
        raise UserError(f"--folds {folds}: only {len(size)} groups (persons / images) to spread over them")
    rng = random.Random(seed)
    total, fold_of = [0] * folds, {}
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        rng.shuffle(groups)
        here = [0] * folds
        for g in sorted(groups, key=lambda g: -size[g]):  # stable: equal sizes keep the shuffled order
            f = min(range(folds), key=lambda i: (here[i], total[i], i))
            fold_of[g] = f
            here[f] += size[g]
            total[f] += size[g]
    return {r.key: fold_of[r.group] for r in records}
