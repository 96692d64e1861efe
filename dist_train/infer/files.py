"""Prediction files: the CSV (one row per sample), the probability file for soft votes, and the
out-of-fold (OOF) file of a cross-validation: a probability file plus where each sample came from."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dist_train.errors import UserError, atomic_write_bytes, atomic_write_text
from dist_train.trust.arrays import ArraySpec, Declared, load_npz
from dist_train.trust.files import parse_json
from dist_train.trust.schema import Dict
from dist_train.trust.shardinfo import MAX_CLASSES
from dist_train.tasks.base import RowIds

KEY_COLUMN = "key"
PATH_COLUMN = "path"  # predict --images: rows named by image file, with class names like `key` rows
MAX_META_BYTES = 1 << 20
ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # an id column's header


@dataclass
class Predictions:
    """What a prediction file holds: ids, answers, and optionally labels and probabilities.

    With the id column `key` the file is `key,ans,class[,label]`, with `path` (image files)
    `path,ans,class`; with any other id column (a task's submission format) it is just `ID,ans`.
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
    """`ID,ans` or `key|path,ans,class[,label]`, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if p.id_column not in (KEY_COLUMN, PATH_COLUMN):
        w.writerow([p.id_column, "ans"])
        w.writerows(zip(p.ids, (int(a) for a in p.ans)))
    else:
        w.writerow([p.id_column, "ans", "class"] + (["label"] if p.label is not None else []))
        for i, (k, a) in enumerate(zip(p.ids, p.ans)):
            w.writerow([k, int(a), p.classes[int(a)]] + ([int(p.label[i])] if p.label is not None else []))
    atomic_write_text(path, buf.getvalue())


def probs_path(csv_path: str | Path) -> Path:
    """sub.csv -> sub.probs.npz beside it."""
    return Path(csv_path).with_suffix(".probs.npz")


def _prob_arrays(p: Predictions) -> dict[str, np.ndarray]:
    if p.prob is None:
        raise ValueError("save_probs: no probabilities")
    arrays = {"id_column": np.array(p.id_column), "ids": np.array(p.ids, dtype=str),
              "classes": np.array(p.classes, dtype=str), "prob": p.prob.astype(np.float32)}
    if p.label is not None:
        arrays["label"] = np.asarray(p.label, dtype=np.int64)
    return arrays


def _save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_probs(path: str | Path, p: Predictions) -> None:
    """npz: id_column, ids, classes, prob (rows x classes, float32)[, label]; loads without pickle."""
    _save_npz(path, _prob_arrays(p))


MAX_ROWS = 100_000_000
MAX_PROB_ELEMENTS = 1 << 28  # rows x classes: 1 GiB as float32
PROB_ARRAYS = {
    "id_column": ArraySpec("U", 0, 4 * 256), "ids": ArraySpec("U", 1, 4 * 1024, MAX_ROWS),
    "classes": ArraySpec("U", 1, 4 * 1024, MAX_CLASSES), "prob": ArraySpec("f", 2, 8, MAX_PROB_ELEMENTS),
    "label": ArraySpec("iu", 1, 8, MAX_ROWS),
}
PROB_HINT = "expected a probability file written by --save-probs"


def _prob_shapes(d: dict[str, Declared]) -> str | None:
    """Declared shapes agree: prob is (ids, classes); labels, folds and metas one per id."""
    n, c = d["ids"].shape[0], d["classes"].shape[0]
    if d["prob"].shape != (n, c):
        return f"prob is {d['prob'].shape}, expected ({n}, {c}): one row per id, one column per class"
    bad = next((k for k in ("label", "fold", "meta") if k in d and d[k].shape != (n,)), None)
    return None if bad is None else f"{bad} is {d[bad].shape}, expected ({n},): one per id"


def _predictions(path: str | Path, z: dict[str, np.ndarray]) -> Predictions:
    prob = z["prob"].astype(np.float64)
    if not np.isfinite(prob).all():
        raise UserError(f"{path}: prob holds non-finite values; {PROB_HINT}")
    p = Predictions(str(z["id_column"]), z["ids"].tolist(), prob.argmax(axis=1), z["classes"].tolist(),
                    z.get("label"), prob)
    if not ID_RE.match(p.id_column):
        raise UserError(f"{path}: id_column {p.id_column!r} is not a column name; {PROB_HINT}")
    return p


def load_probs(path: str | Path) -> Predictions:
    """A probability file, every array's shape and dtype checked before it is read (`trust.arrays`)."""
    z = load_npz(path, PROB_ARRAYS, ("id_column", "ids", "classes", "prob"), rule=_prob_shapes, hint=PROB_HINT)
    return _predictions(path, z)


# ----------------------------------------------------------------------------- out-of-fold file
OOF_EXTRAS = ("fold", "meta", "data", "split")
OOF_WRITER = "python -m dist_train.oof"


@dataclass
class OutOfFold:
    """`CV/oof.probs.npz`: every labeled sample once, predicted by the fold model that never
    trained on it. `preds` as `load_probs` reads it (keys, classes, prob, the given `label`);
    `fold`: the fold each sample was held out in; `meta`: its stored JSON metadata; `data` and
    `split`: the shard set and split the samples live in (to find their images again)."""

    preds: Predictions
    fold: np.ndarray  # int64 (rows,)
    meta: list[dict]
    data: str
    split: str


def _meta_text(m: dict | str | bytes) -> str:
    if isinstance(m, bytes):
        return m.decode("utf-8")
    return m if isinstance(m, str) else json.dumps(m, sort_keys=True)


def save_oof(path: str | Path, preds: Predictions, fold: Sequence[int] | np.ndarray,
             meta: Sequence[dict | str | bytes], data: str, split: str) -> None:
    """The probability file of `save_probs` (labels required, ids the sample keys) plus `fold`
    (int64), `meta` (one JSON text per sample, as the shards store it), `data`, `split`."""
    n = len(preds.ids)
    fold = np.asarray(fold, dtype=np.int64)
    if preds.id_column != KEY_COLUMN or preds.label is None or fold.shape != (n,) or len(meta) != n:
        raise ValueError(f"save_oof: expected key ids with labels and {n} folds and metas; got ids "
                         f"{preds.id_column!r}, labels {preds.label is not None}, {fold.size} folds, {len(meta)} metas")
    arrays = _prob_arrays(preds)
    arrays.update(fold=fold, meta=np.array([_meta_text(m) for m in meta], dtype=str),
                  data=np.array(str(data)), split=np.array(str(split)))
    _save_npz(path, arrays)


OOF_ARRAYS = {**PROB_ARRAYS, "fold": ArraySpec("iu", 1, 8, MAX_ROWS), "meta": ArraySpec("U", 1, 4 * 65536, MAX_ROWS),
              "data": ArraySpec("U", 0, 4 * 4096), "split": ArraySpec("U", 0, 4 * 128)}


def load_oof(path: str | Path) -> OutOfFold:
    """Read and check an OOF file; anything missing or inconsistent is one line naming it. `data`
    is the address as stored: use it through `trust.files.stored_address`."""
    hint = f"expected CV/oof.probs.npz written by {OOF_WRITER}"
    z = load_npz(path, OOF_ARRAYS, ("id_column", "ids", "classes", "prob"), rule=_prob_shapes, hint=hint)
    missing = [k for k in OOF_EXTRAS if k not in z]
    if missing:
        raise UserError(f"{path}: not an out-of-fold file (no {', '.join(missing)}); {hint}")
    preds = _predictions(path, z)
    fold, metas, data, split = z["fold"], z["meta"].tolist(), str(z["data"]), str(z["split"])
    n = len(preds.ids)
    if preds.id_column != KEY_COLUMN or preds.label is None:
        raise UserError(f"{path}: an out-of-fold file needs sample keys and labels (ids are {preds.id_column!r}, "
                        f"labels {'present' if preds.label is not None else 'missing'})")
    if not n or preds.label.min() < 0 or preds.label.max() >= len(preds.classes):
        raise UserError(f"{path}: expected at least one sample, each labeled 0..{len(preds.classes) - 1}")
    if (fold < 0).any():
        raise UserError(f"{path}: folds must be integers 0..K-1")
    meta = [parse_json(m, f"{path}: meta of sample {preds.ids[i]!r}", spec=Dict(), max_bytes=MAX_META_BYTES)
            for i, m in enumerate(metas)]
    return OutOfFold(preds, fold.astype(np.int64), meta, data, split)


def read_folds(path: str | Path) -> np.ndarray | None:
    """The `fold` array of a probability file, None when it has none (a plain --save-probs file)."""
    z = load_npz(path, {"ids": PROB_ARRAYS["ids"], "fold": OOF_ARRAYS["fold"]}, ("ids",), rule=_fold_shape,
                 hint=PROB_HINT)
    return z["fold"].astype(np.int64) if "fold" in z else None


def _fold_shape(d: dict[str, Declared]) -> str | None:
    n = d["ids"].shape[0]
    return None if "fold" not in d or d["fold"].shape == (n,) else f"fold is {d['fold'].shape}, expected ({n},)"


def write_oof_csv(path: str | Path, p: Predictions) -> None:
    """`key,ans,class,label,prob`: prob is the predicted class's probability."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "ans", "class", "label", "prob"])
    for i, (k, a) in enumerate(zip(p.ids, p.ans)):
        w.writerow([k, int(a), p.classes[int(a)], int(p.label[i]), f"{float(p.prob[i, int(a)]):.6f}"])
    atomic_write_text(path, buf.getvalue())
