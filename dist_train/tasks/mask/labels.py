"""The mask-status competition's label scheme: 18 classes = mask x gender x age group.

class = mask * 6 + gender * 3 + age_group, with mask wear 0 / incorrect 1 / not worn 2,
gender male 0 / female 1, and age groups cut by `age_bins` (default 30,60: <30, 30-59, >=60).
The age cut is a parameter because top solutions moved it (e.g. 58) to fight the rare >=60
classes; evaluation always uses the true 30/60 cut.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MASK_NAMES = ("wear", "incorrect", "not_wear")
GENDER_NAMES = ("male", "female")
DEFAULT_AGE_BINS: tuple[int, int] = (30, 60)
NUM_CLASSES = 18

# File stems in a person's folder -> mask status.
MASK_STEMS: dict[str, int] = {
    "mask1": 0,
    "mask2": 0,
    "mask3": 0,
    "mask4": 0,
    "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def parse_age_bins(spec: str | Sequence[int]) -> tuple[int, int]:
    """'30,60' or (30, 60) -> (30, 60); two increasing positive integers."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            bins = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"age bins {spec!r}: expected two integers like '30,60'") from None
    else:
        bins = tuple(int(b) for b in spec)
    if len(bins) != 2 or not 0 < bins[0] < bins[1]:
        raise ValueError(f"age bins {spec!r}: expected two increasing positive integers like '30,60'")
    return bins  # type: ignore[return-value]


def age_group(age: int, bins: Sequence[int] = DEFAULT_AGE_BINS) -> int:
    """<bins[0] -> 0, bins[0]..bins[1]-1 -> 1, >=bins[1] -> 2."""
    lo, hi = bins
    return 0 if age < lo else (1 if age < hi else 2)


def mask_status(stem: str) -> int | None:
    """File stem (no extension) -> mask status, or None for a stem not among the seven."""
    return MASK_STEMS.get(stem.lower())


def parse_gender(value: str) -> int:
    v = str(value).strip().lower()
    if v in ("male", "m", "0"):
        return 0
    if v in ("female", "f", "1"):
        return 1
    raise ValueError(f"gender {value!r}: expected 'male' or 'female'")


def parse_age(value: str | int) -> int:
    try:
        age = int(str(value).strip())
    except ValueError:
        raise ValueError(f"age {value!r}: expected a whole number of years") from None
    if not 0 <= age < 150:
        raise ValueError(f"age {value!r}: expected 0..149")
    return age


def encode(mask: int, gender: int, age_grp: int) -> int:
    if mask not in (0, 1, 2) or gender not in (0, 1) or age_grp not in (0, 1, 2):
        raise ValueError(f"label parts out of range: mask={mask} gender={gender} age={age_grp}")
    return mask * 6 + gender * 3 + age_grp


def decode(cls: int) -> tuple[int, int, int]:
    """class -> (mask, gender, age_group)."""
    if not 0 <= cls < NUM_CLASSES:
        raise ValueError(f"class {cls}: expected 0..{NUM_CLASSES - 1}")
    return cls // 6, (cls // 3) % 2, cls % 3


def age_group_names(bins: Sequence[int] = DEFAULT_AGE_BINS) -> tuple[str, str, str]:
    lo, hi = bins
    return (f"<{lo}", f"{lo}-{hi - 1}", f">={hi}")


def class_name(cls: int, bins: Sequence[int] = DEFAULT_AGE_BINS) -> str:
    """e.g. 4 -> 'wear/female/30-59'."""
    m, g, a = decode(cls)
    return f"{MASK_NAMES[m]}/{GENDER_NAMES[g]}/{age_group_names(bins)[a]}"


def class_names(bins: Sequence[int] = DEFAULT_AGE_BINS) -> list[str]:
    return [class_name(c, bins) for c in range(NUM_CLASSES)]


def label_from_meta(meta: dict, bins: Sequence[int] = DEFAULT_AGE_BINS) -> int:
    """Recompute the class from a sample's stored metadata (mask, gender, age)."""
    return encode(int(meta["mask"]), int(meta["gender"]), age_group(int(meta["age"]), bins))


MAX_RELABEL_BYTES = 64 << 20  # a row per person: far more than any real table


def load_relabel(path: str) -> dict[str, dict]:
    """Label corrections per person: CSV `id[,gender][,age][,swap_mask]`, empty cell = keep.

    The real data has persons with the wrong gender or age and with `incorrect_mask` and
    `normal` swapped; fixing them at load time needs no resharding.
    """
    import csv
    import io

    from dist_train.errors import UserError
    from dist_train.trust.files import read_capped

    data = read_capped(path, MAX_RELABEL_BYTES, hint="expected a --relabel CSV (id,gender,age,swap_mask)")
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        rows = [(reader.line_num, row) for row in reader]  # the line as an editor counts it (blank lines too)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--relabel {path}: not a readable UTF-8 CSV ({e})") from None
    if not rows or "id" not in rows[0][1]:
        raise UserError(f"--relabel {path}: expected a CSV with an 'id' column and gender/age/swap_mask columns")
    fixes: dict[str, dict] = {}
    for i, row in rows:
        fix: dict = {}
        try:
            if (row.get("gender") or "").strip():
                fix["gender"] = parse_gender(row["gender"])
            if (row.get("age") or "").strip():
                fix["age"] = parse_age(row["age"])
            if (row.get("swap_mask") or "").strip().lower() in ("1", "true", "yes"):
                fix["swap_mask"] = True
        except ValueError as e:
            raise UserError(f"--relabel {path} line {i}: {e}") from None
        fixes[str(row["id"]).strip()] = fix
    return fixes


def target_from_meta(meta: dict, cls: int | None, bins: Sequence[int] = DEFAULT_AGE_BINS,
                     fixes: dict[str, dict] | None = None) -> int:
    """Training label of a mask sample from its stored metadata, with age bins and fixes applied."""
    m = dict(meta)
    fix = (fixes or {}).get(str(m.get("person_id")), {})
    m.update({k: v for k, v in fix.items() if k in ("gender", "age")})
    if fix.get("swap_mask") and int(m["mask"]) in (1, 2):
        m["mask"] = 3 - int(m["mask"])
    return label_from_meta(m, bins)


def relabel_summary(path: str, metas: Sequence[dict], fixes: dict[str, dict], bins: Sequence[int]) -> str:
    """What `--relabel path` does to these samples: labels changed in all and per task (mask,
    gender, age group), persons of the file found, classes present before and after; a loud
    WARNING when classes disappear."""
    before = np.array([label_from_meta(m, bins) for m in metas], dtype=np.int64)
    after = np.array([target_from_meta(m, None, bins, fixes) for m in metas], dtype=np.int64)
    parts = {"mask": lambda c: c // 6, "gender": lambda c: (c // 3) % 2, "age": lambda c: c % 3}
    per_task = ", ".join(f"{name} {int((f(before) != f(after)).sum())}" for name, f in parts.items())
    found = len(set(fixes) & {str(m.get("person_id")) for m in metas})
    n_before, n_after = len(set(before.tolist())), len(set(after.tolist()))
    line = (f"--relabel {path}: {int((before != after).sum())} of {len(metas)} training labels changed "
            f"({per_task}); {found} of the file's {len(fixes)} persons are in this split; "
            f"classes present {n_before} -> {n_after}")
    lost = sorted(set(before.tolist()) - set(after.tolist()))
    if lost:
        names = ", ".join(class_name(c, bins) for c in lost)
        line += f"\nWARNING: after --relabel no training sample has class {names}: check the file"
    return line
