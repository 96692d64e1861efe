"""Label-noise suspects per person, written as a `--relabel` file.

The competition's label errors come per person: a wrong gender or age in train.csv mislabels
all 7 photos, and an `incorrect_mask` / `normal` pair saved under each other's names swaps two.
From the out-of-fold probabilities (18 classes, marginalised to mask, gender and age group):

- gender: the fold models give the other gender on most (> half) of the person's photos;
- age: they give another age group on most photos; the suggested age is the age nearest the
  recorded one among the ages the given labels put in the models' group (so any --age-bins
  cut the labels were made with is respected);
- swap: the photo stored as `normal` is predicted `incorrect` and the one stored as
  `incorrect_mask` is predicted `not_wear` (or, where the given labels are already swapped by an
  earlier --relabel, the reverse: swap_mask 0).

Rows: `id,gender,age,swap_mask` as `labels.load_relabel` reads them (an empty cell keeps the
stored value), plus `photos,score,reason` for the reviewer; score = the mean probability the
models give the suggested value (the largest of the person's suggestions), most suspect first.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from dist_train.tasks.base import SuspectTable

from . import labels as L

HEADER = ["id", "gender", "age", "swap_mask", "photos", "score", "reason"]


def _ages_by_group(metas: Sequence[dict], age_grp: np.ndarray) -> dict[int, np.ndarray]:
    """group -> the recorded ages the given labels mostly put in it."""
    votes: dict[int, Counter] = defaultdict(Counter)
    for m, a in zip(metas, age_grp):
        if isinstance(m.get("age"), int):
            votes[m["age"]][int(a)] += 1
    out: dict[int, list[int]] = defaultdict(list)
    for age, c in votes.items():
        out[c.most_common(1)[0][0]].append(age)
    return {g: np.array(sorted(v)) for g, v in out.items()}


def _majority_fix(p_part: np.ndarray, given: int) -> tuple[int, int, float] | None:
    """(suggested value, photos disagreeing, mean p of it) when most photos disagree with `given`."""
    disagree = int((p_part.argmax(axis=1) != given).sum())
    if 2 * disagree <= len(p_part):
        return None
    mean = p_part.mean(axis=0)
    mean[given] = -1.0
    new = int(mean.argmax())
    return new, disagree, float(p_part[:, new].mean())


def _swap_fix(idx: np.ndarray, metas: Sequence[dict], p_mask: np.ndarray, mask: np.ndarray) -> tuple[str, float] | None:
    """swap_mask ('1' or '0') and its score when the models see the stored pair the other way round."""
    stored = {int(metas[i].get("mask", -1)): i for i in idx}
    if 1 not in stored or 2 not in stored:
        return None
    inc, nor = stored[1], stored[2]
    pred_inc, pred_nor = int(p_mask[inc].argmax()), int(p_mask[nor].argmax())
    given_swapped = int(mask[nor]) == 1
    if not given_swapped and pred_nor == 1 and pred_inc == 2:
        return "1", float((p_mask[nor, 1] + p_mask[inc, 2]) / 2)
    if given_swapped and pred_nor == 2 and pred_inc == 1:
        return "0", float((p_mask[nor, 2] + p_mask[inc, 1]) / 2)
    return None


def _person_row(pid: str, idx: np.ndarray, metas: Sequence[dict], parts: dict, ages: dict[int, np.ndarray]) -> list | None:
    n, row, scores, why = len(idx), [pid, "", "", ""], [], []
    g_given = Counter(parts["gender"][idx].tolist()).most_common(1)[0][0]
    if fix := _majority_fix(parts["p_gender"][idx], g_given):
        row[1] = L.GENDER_NAMES[fix[0]]
        scores.append(fix[2])
        why.append(f"gender {L.GENDER_NAMES[g_given]}->{row[1]} on {fix[1]}/{n} photos (mean p {fix[2]:.2f})")
    a_given = Counter(parts["age"][idx].tolist()).most_common(1)[0][0]
    age = metas[idx[0]].get("age")
    fix = _majority_fix(parts["p_age"][idx], a_given)
    if fix and isinstance(age, int) and len(ages.get(fix[0], ())):
        candidates = ages[fix[0]]
        row[2] = int(candidates[np.argmin(np.abs(candidates - age))])
        scores.append(fix[2])
        why.append(f"age {age}->{row[2]}: another age group on {fix[1]}/{n} photos (mean p {fix[2]:.2f})")
    if swap := _swap_fix(idx, metas, parts["p_mask"], parts["mask"]):
        row[3] = swap[0]
        scores.append(swap[1])
        why.append(f"incorrect_mask/normal {'swapped' if swap[0] == '1' else 'swap undone'} (mean p {swap[1]:.2f})")
    if not scores:
        return None
    return row + [n, f"{max(scores):.4f}", "; ".join(why)]


def person_suspects(metas: Sequence[dict], prob: np.ndarray, labels: np.ndarray) -> SuspectTable:
    """The per-person relabel table (see the module docstring); samples without a person_id are skipped."""
    p = np.asarray(prob, dtype=np.float64).reshape(-1, 3, 2, 3)  # class = mask*6 + gender*3 + age group
    labels = np.asarray(labels, dtype=np.int64)
    parts = {"mask": labels // 6, "gender": (labels // 3) % 2, "age": labels % 3,
             "p_mask": p.sum(axis=(2, 3)), "p_gender": p.sum(axis=(1, 3)), "p_age": p.sum(axis=(1, 2))}
    persons: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(metas):
        if m.get("person_id") is not None:
            persons[str(m["person_id"])].append(i)
    ages = _ages_by_group(metas, parts["age"])
    rows = [r for pid, idx in persons.items() if (r := _person_row(pid, np.array(idx), metas, parts, ages))]
    rows.sort(key=lambda r: (-float(r[5]), r[0]))
    counts = [sum(1 for r in rows if r[c] != "") for c in (1, 2, 3)]
    summary = (f"{len(rows)} of {len(persons)} persons with suggested corrections (gender {counts[0]}, "
               f"age {counts[1]}, mask swap {counts[2]})")
    return SuspectTable("relabel", HEADER, rows, summary, units=len(persons))
