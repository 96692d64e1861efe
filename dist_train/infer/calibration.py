"""Calibration for macro F1: one additive log-probability offset per class.

Argmax of the probabilities maximises accuracy, not macro F1: rare classes are under-predicted,
and every class weighs the same in macro F1. Adding an offset b_c to log p_c before the argmax
trades a little accuracy on the common classes for recall on the rare ones. The offsets are
fitted by coordinate ascent over a grid (one class at a time, every offset of the grid tried,
a few passes), which needs nothing but the labeled probabilities (out-of-fold or validation).

Offsets fitted and scored on the same samples overstate the gain, so the fit is also
cross-fitted: for each fold, offsets fitted on the other folds are applied to it, and the macro F1
of those held-out answers is the honest estimate. The final offsets are fitted on everything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dist_train.errors import UserError, atomic_write_json
from dist_train.trust.files import read_json
from dist_train.trust.schema import Dict, Float, List, Str, Where
from dist_train.trust.shardinfo import MAX_CLASSES

from .files import Predictions

FORMAT = "dist_train.calibration/1"
METHOD = "additive log-probability offsets per class, coordinate ascent on macro F1 over a grid"


@dataclass(frozen=True)
class Grid:
    """The offsets tried for each class: -max_offset..max_offset in steps of `step`."""

    max_offset: float = 3.0
    step: float = 0.1
    passes: int = 3

    def values(self) -> np.ndarray:
        n = int(round(self.max_offset / self.step))
        return np.round(np.arange(-n, n + 1) * self.step, 10)


def macro_f1(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Macro F1 as `metrics.summarize` (sklearn's): over the classes present in targets or predictions."""
    cm = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, -1)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    denom = support + predicted
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean())


def log_probs(prob: np.ndarray) -> np.ndarray:
    """log p with zeros kept finite (a class a model rules out can still be moved by an offset)."""
    return np.log(np.clip(np.asarray(prob, dtype=np.float64), 1e-30, None))


def answers(logp: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return (logp + offsets).argmax(axis=1)


def _best_offset(logp: np.ndarray, target: np.ndarray, offsets: np.ndarray, c: int, grid: np.ndarray,
                 current: float) -> float:
    """Class c's offset on the grid with the highest macro F1, the others fixed. Only a strict
    gain moves it; among equal scores the smallest |offset| wins (shrinks toward no change)."""
    n, k = logp.shape
    s = logp + offsets
    s[:, c] = -np.inf
    other = s.argmax(axis=1)
    m = s[np.arange(n), other]
    v = logp[:, c]
    scores = np.empty(len(grid))
    for i, d in enumerate(grid):  # exactly argmax's choice, ties to the lower index included
        wins = (v + d > m) | ((v + d == m) & (c < other))
        scores[i] = macro_f1(np.where(wins, c, other), target, k)
    best = scores.max()
    if best <= current + 1e-12:
        return float(offsets[c])
    tied = np.flatnonzero(scores >= best - 1e-12)
    return float(grid[tied[np.argmin(np.abs(grid[tied]))]])


def fit_offsets(logp: np.ndarray, target: np.ndarray, grid: Grid) -> np.ndarray:
    """Coordinate ascent: each pass visits the classes in order; stops early when a pass changes nothing."""
    k = logp.shape[1]
    offsets = np.zeros(k)
    values = grid.values()
    score = macro_f1(answers(logp, offsets), target, k)
    for _ in range(grid.passes):
        changed = False
        for c in range(k):
            new = _best_offset(logp, target, offsets, c, values, score)
            if new != offsets[c]:
                offsets[c] = new
                score = macro_f1(answers(logp, offsets), target, k)
                changed = True
        if not changed:
            break
    return offsets


def stratified_folds(target: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Deterministic folds for a file without a `fold` array: each class dealt round-robin over
    the k folds in a seeded random order, so every fold holds its share of the rare classes."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(target), dtype=np.int64)
    start = 0
    for c in np.unique(target):
        idx = rng.permutation(np.flatnonzero(target == c))
        fold[idx] = (start + np.arange(len(idx))) % k
        start += len(idx)
    return fold


def cross_fit(logp: np.ndarray, target: np.ndarray, fold: np.ndarray, grid: Grid) -> tuple[np.ndarray, list[list[float]]]:
    """Held-out answers: each fold's samples answered with offsets fitted on the other folds."""
    pred = np.empty(len(target), dtype=np.int64)
    per_fold = []
    for f in np.unique(fold):
        held = fold == f
        off = fit_offsets(logp[~held], target[~held], grid)
        pred[held] = answers(logp[held], off)
        per_fold.append([float(x) for x in off])
    return pred, per_fold


def _per_class(pred_before: np.ndarray, pred_after: np.ndarray, target: np.ndarray, classes: Sequence[str],
               offsets: np.ndarray) -> list[dict]:
    out = []
    for c, name in enumerate(classes):
        row = {"class": c, "name": name, "offset": float(offsets[c]), "support": int((target == c).sum())}
        for tag, pred in (("before", pred_before), ("after", pred_after)):
            tp, npred = int(((pred == c) & (target == c)).sum()), int((pred == c).sum())
            row[f"predicted_{tag}"] = npred
            row[f"f1_{tag}"] = 2 * tp / (row["support"] + npred) if row["support"] + npred else 0.0
        out.append(row)
    return out


def calibrate(preds: Predictions, fold: np.ndarray | None, grid: Grid, folds: int = 5, seed: int = 0,
              source: str = "") -> dict:
    """Fit the offsets on `preds` (labels required) and score them in-sample and cross-fitted.
    `fold`: the file's folds (an OOF file); None: `folds` stratified splits drawn from `seed`."""
    if preds.label is None or preds.prob is None:
        raise UserError(f"{source}: no labels in the probability file; calibration needs labeled samples "
                        "(an out-of-fold file, or predict --save-probs on a labeled split)")
    target = np.asarray(preds.label, dtype=np.int64)
    k = len(preds.classes)
    if fold is None:
        if folds < 2 or len(target) < 2 * folds:
            raise UserError(f"--folds {folds}: expected 2 or more, with at least 2 samples per fold "
                            f"({len(target)} samples)")
        fold, folds_from = stratified_folds(target, folds, seed), f"{folds} stratified splits, seed {seed}"
    else:
        if len(np.unique(fold)) < 2:
            raise UserError(f"{source}: the fold array holds one fold; cross-fitting needs 2 or more")
        folds_from = "the file's fold array"
    logp = log_probs(preds.prob)
    offsets = fit_offsets(logp, target, grid)
    before, after = answers(logp, np.zeros(k)), answers(logp, offsets)
    held, per_fold = cross_fit(logp, target, fold, grid)
    f1 = {name: macro_f1(p, target, k) for name, p in (("before", before), ("after", after), ("cross", held))}
    return {
        "format": FORMAT, "method": METHOD, "grid": dataclasses.asdict(grid), "source": source,
        "samples": int(len(target)), "classes": list(preds.classes), "offsets": [float(x) for x in offsets],
        "macro_f1": {"before": f1["before"], "after": f1["after"], "gain": f1["after"] - f1["before"]},
        "cross_fitted": {"before": f1["before"], "after": f1["cross"], "gain": f1["cross"] - f1["before"],
                         "folds": len(per_fold), "folds_from": folds_from, "fold_offsets": per_fold},
        "accuracy": {"before": float((before == target).mean()), "after": float((after == target).mean()),
                     "cross_fitted": float((held == target).mean())},
        "per_class": _per_class(before, after, target, preds.classes, offsets),
    }


def save_calibration(path: str | Path, result: dict) -> None:
    atomic_write_json(path, result)


CALIBRATION = Dict(fields={"classes": List(Str(max_len=1024), MAX_CLASSES, 1), "offsets": List(Float(), MAX_CLASSES, 1)},
                   required=("classes", "offsets"))


def _same_count(obj: dict) -> tuple[str, str] | None:
    n = len(obj["classes"])
    return None if len(obj["offsets"]) == n else ("offsets", f"one offset per class ({n})")


def load_calibration(path: str | Path, flag: str = "--calibration") -> tuple[list[str], np.ndarray]:
    """(classes, offsets) of a calibration.json; anything else is one line naming the file."""
    hint = "expected a calibration.json from python -m dist_train.calibrate"
    try:
        obj = read_json(path, Where(CALIBRATION, _same_count), hint=hint, max_bytes=16 << 20)
    except UserError as e:
        raise UserError(f"{flag} {e}") from None
    classes, offsets = obj["classes"], obj["offsets"]
    return classes, np.asarray(offsets, dtype=np.float64)


def check_classes(path: str | Path, cal_classes: Sequence[str], classes: Sequence[str], what: str,
                  flag: str = "--calibration") -> None:
    """The calibration must be for exactly these classes, in this order."""
    classes = [str(c) for c in classes]
    if list(cal_classes) == classes:
        return
    if len(cal_classes) != len(classes):
        why = f"{len(cal_classes)} classes, {what} has {len(classes)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(cal_classes, classes)) if a != b)
        why = f"class {i} is {cal_classes[i]!r}, {what} has {classes[i]!r}"
    raise UserError(f"{flag} {path}: {why}; expected a calibration fitted on {what}'s classes")


def apply_offsets(p: Predictions, offsets: np.ndarray) -> Predictions:
    """Answers argmax(log p + offset); probabilities renormalised: softmax(log p + offset)."""
    if p.prob is None:
        raise ValueError("apply_offsets: no probabilities")
    s = log_probs(p.prob) + np.asarray(offsets, dtype=np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    prob = e / e.sum(axis=1, keepdims=True)
    return dataclasses.replace(p, ans=s.argmax(axis=1), prob=prob)
