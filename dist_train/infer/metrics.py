"""Classification metrics and the confusion-matrix picture.

Plain numpy so every entry point (training's evaluation, evaluate, predict) computes them the
same way without scikit-learn at runtime; macro F1 follows `sklearn.metrics.f1_score(
average='macro')` exactly: averaged over the labels present in targets or predictions, with
0 where precision or recall is undefined.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from dist_train.errors import atomic_write_bytes, atomic_write_text
from dist_train.shardset.format import TABLE_CLASSES  # named one by one up to it, as in the tables


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(preds: Sequence[int], targets: Sequence[int], num_classes: int) -> np.ndarray:
    """cm[true, pred] counts, shape (num_classes, num_classes)."""
    p, t = np.asarray(preds, dtype=np.int64).ravel(), np.asarray(targets, dtype=np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions for {t.size} targets")
    if p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes):
        raise ValueError(f"class index outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def summarize(preds: Sequence[int], targets: Sequence[int], num_classes: int,
              class_names: Sequence[str] | None = None) -> dict:
    """acc, macro_f1, per_class (precision/recall/f1/support), confusion."""
    p, t = np.asarray(preds, dtype=np.int64).ravel(), np.asarray(targets, dtype=np.int64).ravel()
    if t.size == 0:
        raise ValueError("summarize: no samples")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    cm = confusion_matrix(p, t, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    out: dict = {
        "num_samples": int(t.size),
        "acc": float((p == t).mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": [
            {"class": c, "name": names[c], "precision": float(precision[c]), "recall": float(recall[c]),
             "f1": float(f1[c]), "support": int(support[c])}
            for c in range(num_classes)
        ],
        "confusion": cm,
    }
    return out


MAX_SIDE_IN = 24.0  # inches (2,400 px at 100 dpi): 1,000 classes drawn 452 in wide took tens of GB


def cell_fontsize(k: int) -> float:
    """Points for the counts in a k x k matrix: as large as a cell holds three digits (12 for a
    few classes, 9.4 for 18), never under 6."""
    return float(min(12.0, max(6.0, 170.0 / max(k, 1))))


def draw_confusion(ax, cm: np.ndarray, class_names: Sequence[str], fontsize: float = 7,
                   title: str | None = None) -> object:
    """Row-normalised heatmap with counts on a matplotlib axis; returns the image for a colorbar.
    `fontsize`: the class names; the counts get `cell_fontsize`. `title`: what the matrix is of
    (e.g. "epoch 3, step 120"), above the sample count."""
    k = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    if k <= TABLE_CLASSES:
        ax.set_xticks(range(k), labels=class_names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(k), labels=class_names, fontsize=fontsize)
    named = "" if k <= TABLE_CLASSES else f" (class index; {k} classes, their names in confusion.csv)"
    ax.set_xlabel("predicted" + named)
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=cell_fontsize(k),
                            color="white" if norm[i, j] > 0.5 else "black")
    what = f"confusion matrix: {title}\n" if title else "confusion matrix "
    ax.set_title(f"{what}({int(cm.sum())} samples, rows normalised)", fontsize=11)
    return im


def save_confusion(cm: np.ndarray, class_names: Sequence[str], csv_path: str | Path, png_path: str | Path | None,
                   title: str | None = None) -> None:
    """Confusion matrix as CSV (rows true, columns predicted) and as a row-normalised heatmap PNG
    whose title says what it is of (`title`: the epoch and step, or the model and split); no PNG
    when `png_path` is None."""
    cm = np.asarray(cm)
    k = len(class_names)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true\\pred", *class_names])
    for name, row in zip(class_names, cm):
        w.writerow([name, *(int(v) for v in row)])
    atomic_write_text(csv_path, buf.getvalue())
    if png_path is None:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    side = min(max(4.0, 0.45 * k + 2.5), MAX_SIDE_IN)
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.colorbar(draw_confusion(ax, cm, class_names, fontsize=8, title=title), ax=ax, fraction=0.046, pad=0.04,
                 label="fraction of true class")
    write_png(fig, png_path, tight=True)


_GLYPHS_SAID: set[str] = set()
_OTHERS_SAID: set[tuple[type, str]] = set()
_MISSING_GLYPH = re.compile(r"Glyph (\d+) \(.*\) missing from font\(s\) (.+)\.$")


def write_png(fig, path: str | Path, dpi: int = 100, tight: bool = False) -> Path:
    """`fig` (laid out by `tight_layout` with `tight`) written to `path` as PNG, atomically.

    matplotlib warns once per character its fonts lack (Korean or Chinese class names, say), a
    line each; those become one line naming the characters and how to have them drawn."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if tight:
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    missing: dict[str, str] = {}
    for w in caught:
        if m := _MISSING_GLYPH.match(str(w.message)):
            missing.setdefault(chr(int(m.group(1))), m.group(2))
        elif (key := (w.category, str(w.message))) not in _OTHERS_SAID:  # each once, as warnings would
            _OTHERS_SAID.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing.keys() - _GLYPHS_SAID:  # once a process (catch_warnings resets warnings' own once-only registry)
        _GLYPHS_SAID.update(missing)
        chars, fonts = "".join(sorted(missing)), ", ".join(sorted(set(missing.values())))
        warnings.warn(f"labels in the pictures hold {len(chars)} character(s) matplotlib's font ({fonts}) lacks, "
                      f"drawn as boxes: {chars[:20]!r}{'...' if len(chars) > 20 else ''}; to draw them, name a "
                      f"font you have that covers them after it, e.g. `font.family: {fonts}, Noto Sans CJK KR` "
                      "in a matplotlibrc file (MATPLOTLIBRC=its folder)", UserWarning, stacklevel=2)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
