"""Prediction files: the CSV (one row per sample) and the probability file for soft votes."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dist_train.errors import UserError, atomic_write_bytes, atomic_write_text
from dist_train.tasks.base import RowIds

KEY_COLUMN = "key"
ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # an id column's header


@dataclass
class Predictions:
    """What a prediction file holds: ids, answers, and optionally labels and probabilities.

    With the id column `key` the file is `key,ans,class[,label]`; with any other id column (a
    task's submission format) it is just `ID,ans`.
    """

    id_column: str
    ids: list[str]
    ans: np.ndarray  # int class per row
    classes: list[str]
    label: np.ndarray | None = None  # true class per row, when known
    prob: np.ndarray | None = None  # (rows, classes)


def predictions_for(res: dict, rows: RowIds, classes: Sequence[str]) -> Predictions:
    """The file's rows from inference results (`run_inference`) in the order the task gives."""
    prob = res["prob"][rows.order]
    target = res["target"][rows.order]
    label = target if rows.column == KEY_COLUMN and len(target) and (target >= 0).all() else None
    return Predictions(rows.column, list(rows.ids), prob.argmax(axis=1), list(classes), label, prob)


def write_csv(path: str | Path, p: Predictions) -> None:
    """`ID,ans` or `key,ans,class[,label]`, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if p.id_column != KEY_COLUMN:
        w.writerow([p.id_column, "ans"])
        w.writerows(zip(p.ids, (int(a) for a in p.ans)))
    else:
        w.writerow(["key", "ans", "class"] + (["label"] if p.label is not None else []))
        for i, (k, a) in enumerate(zip(p.ids, p.ans)):
            w.writerow([k, int(a), p.classes[int(a)]] + ([int(p.label[i])] if p.label is not None else []))
    atomic_write_text(path, buf.getvalue())


def probs_path(csv_path: str | Path) -> Path:
    """sub.csv -> sub.probs.npz beside it."""
    return Path(csv_path).with_suffix(".probs.npz")


def save_probs(path: str | Path, p: Predictions) -> None:
    """npz: id_column, ids, classes, prob (rows x classes, float32)[, label]; loads without pickle."""
    if p.prob is None:
        raise ValueError("save_probs: no probabilities")
    arrays = {"id_column": np.array(p.id_column), "ids": np.array(p.ids, dtype=str),
              "classes": np.array(p.classes, dtype=str), "prob": p.prob.astype(np.float32)}
    if p.label is not None:
        arrays["label"] = np.asarray(p.label, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_probs(path: str | Path) -> Predictions:
    try:
        with np.load(path, allow_pickle=False) as z:
            prob = z["prob"].astype(np.float64)
            p = Predictions(str(z["id_column"]), z["ids"].tolist(), prob.argmax(axis=1), z["classes"].tolist(),
                            z["label"] if "label" in z else None, prob)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a probability file written by --save-probs ({type(e).__name__}: {e})") from None
    if not ID_RE.match(p.id_column) or prob.shape != (len(p.ids), len(p.classes)):
        raise UserError(f"{path}: inconsistent probability file ({len(p.ids)} ids, {len(p.classes)} classes, "
                        f"prob {prob.shape})")
    return p


def save_oof(path: str | Path, p: Predictions, fold: Sequence[int], meta: Sequence[str], data: str, split: str) -> None:
    """Out-of-fold probabilities: a `save_probs` file (so ensemble and calibrate read it) plus,
    per row, the fold it was held out in and its stored JSON metadata, and the shard set it
    came from (`data`, `split`), which suspect grids read the images back from."""
    if p.prob is None or p.label is None:
        raise ValueError("save_oof: needs probabilities and labels")
    arrays = {"id_column": np.array(p.id_column), "ids": np.array(p.ids, dtype=str),
              "classes": np.array(p.classes, dtype=str), "prob": p.prob.astype(np.float32),
              "label": np.asarray(p.label, dtype=np.int64), "fold": np.asarray(fold, dtype=np.int64),
              "meta": np.array(list(meta), dtype=str), "data": np.array(str(data)), "split": np.array(str(split))}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_oof_csv(path: str | Path, p: Predictions) -> None:
    """`key,ans,class,label,prob`: prob is the predicted class's probability."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "ans", "class", "label", "prob"])
    for i, (k, a) in enumerate(zip(p.ids, p.ans)):
        w.writerow([k, int(a), p.classes[int(a)], int(p.label[i]), f"{float(p.prob[i, int(a)]):.6f}"])
    atomic_write_text(path, buf.getvalue())
