"""Pictures a person looks at instead of reading numbers: the run report and the contact sheet.

- `draw_report`: loss and macro-F1 curves from `metrics.jsonl`, the confusion matrix, and a grid
  of the worst mistakes (lowest probability on the true class) with true and predicted labels.
- `contact_sheet`: a few samples per class from any shard set, to eyeball the labels before
  spending GPU hours on them.
- `draw_suspects`: the most likely label errors of a cross-validation, given and predicted labels.

Images are re-read from the shards by key (streamed through webdataset, so remote shard sets
work too); only the samples that are drawn are decoded.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.transforms.v2 import functional as TF

from .data.transforms import decode_rgb
from .errors import UserError
from .infer.metrics import MAX_SIDE_IN, draw_confusion, write_png
from .shardset.format import class_names, image_bytes, is_labeled, iter_samples, label_counts, split_info
from .trust.media import DEFAULT_MAX_PIXELS, check_image_bytes
from .trust.files import MAX_JSON_BYTES, parse_json, read_capped
from .trust.schema import Dict

THUMB = 96  # thumbnail side in pixels (longer side)
# metrics.jsonl fields as the curves' legend names them: what each loss is
CURVE_LABELS = {"train_loss": "train loss (the configured --loss)", "val_loss": "val loss (plain cross-entropy)"}


# ----------------------------------------------------------------------------- thumbnails
def thumbnail(data: bytes, side: int = THUMB) -> np.ndarray:
    """Image bytes -> HWC uint8 array whose longer side is `side` (aspect kept).
    ImageRefused for an image whose header declares too many pixels (it is never decoded)."""
    check_image_bytes(data, DEFAULT_MAX_PIXELS, ("JPEG", "PNG"))
    img = decode_rgb(data)
    h, w = img.shape[-2:]
    scale = side / max(h, w)
    img = TF.resize(img, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return img.permute(1, 2, 0).numpy()


def _thumbnail_or_none(data: bytes, side: int = THUMB) -> np.ndarray | None:
    """`thumbnail`, or None (warned) for an image from a shard that is refused or does not decode."""
    try:
        return thumbnail(data, side)
    except (ValueError, RuntimeError) as e:
        warnings.warn(f"skipping an image that cannot be drawn: {e}", stacklevel=2)
        return None


def key_label(key: str, width: int) -> str:
    """A key in at most two lines of `width` characters. Its start is always kept (the person or
    folder: `000123_female_Asian_45/`), broken after a '/', '_', '-' or '.' where one is near the
    end of the first line; a key too long for two lines keeps its end as well (the file name),
    the middle cut and marked."""
    if len(key) <= width:
        return key
    cut = next((i + 1 for i in range(width - 1, width // 2, -1) if key[i] in "/_-."), width)
    first, rest = key[:cut], key[cut:]
    if len(rest) > width:
        rest = "…" + rest[-(width - 1):]
    return f"{first}\n{rest}"


def load_thumbnails(root: str, info: dict, split: str, keys: Iterable[str], side: int = THUMB) -> dict[str, np.ndarray]:
    """key -> thumbnail for the wanted keys; reading stops once all are found."""
    wanted = set(keys)
    out: dict[str, np.ndarray] = {}
    if not wanted:
        return out
    for s in iter_samples(root, info, split):
        key = s["__key__"]
        if key in wanted and (data := image_bytes(s)) is not None:
            if (thumb := _thumbnail_or_none(data, side)) is not None:
                out[key] = thumb
            wanted.discard(key)
            if not wanted:
                break
    return out


# ----------------------------------------------------------------------------- drawing helpers
def _show(ax, image: np.ndarray | None, title: str, fontsize: float = 7, color: str = "black") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if image is not None:
        ax.imshow(image)
    ax.set_title(title, fontsize=fontsize, color=color)


def read_history(run: str | Path) -> list[dict]:
    """The evaluation records of `RUN/metrics.jsonl` ([] when absent; a torn last line is skipped)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in read_capped(path, MAX_JSON_BYTES).splitlines():
        try:  # each record through the bounded parser; a torn or crafted line is skipped
            rows.append(parse_json(line, str(path), spec=Dict(), allow_nonfinite=True))
        except UserError:
            continue
    return rows


def _curve(ax, history: list[dict], fields: Sequence[str], ylabel: str) -> None:
    drawn = False
    for field in fields:
        pts = [(r["step"], r[field]) for r in history
               if isinstance(r.get(field), (int, float)) and isinstance(r.get("step"), (int, float))
               and math.isfinite(r[field])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=CURVE_LABELS.get(field, field))
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl records", ha="center", va="center", transform=ax.transAxes)


# ----------------------------------------------------------------------------- the pictures
def draw_report(out_png: str | Path, *, history: list[dict], confusion: np.ndarray, class_names: Sequence[str],
                mistakes: Sequence[dict], title: str, cols: int = 8) -> Path:
    """report.png: curves (top left), confusion matrix (top right), worst mistakes (bottom).

    `mistakes`: dicts with `key`, `true`, `pred` (class indices), `prob_true`, `prob_pred` and
    `image` (HWC uint8 thumbnail or None), worst first.
    """
    k = len(class_names)
    top_h = min(max(6.0, 0.3 * k + 3.0), MAX_SIDE_IN)
    rows = math.ceil(len(mistakes) / cols) if mistakes else 1
    fig = Figure(figsize=(16, top_h + 2.7 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=13)
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, 2.7 * rows])
    grid = top.add_gridspec(2, 2, width_ratios=[1, 1.3])
    _curve(top.add_subplot(grid[0, 0]), history, ("train_loss", "val_loss"), "loss")
    _curve(top.add_subplot(grid[1, 0]), history, ("val_macro_f1", "val_acc"), "validation")
    draw_confusion(top.add_subplot(grid[:, 1]), np.asarray(confusion), class_names, fontsize=8)
    if mistakes:
        bottom.suptitle(f"worst {len(mistakes)} mistakes (lowest probability on the true class)", fontsize=12)
        axes = bottom.subplots(rows, cols, squeeze=False).ravel()
        for ax, m in zip(axes, mistakes):
            _show(ax, m.get("image"), f"{key_label(m['key'], 30)}\ntrue {class_names[m['true']]} "
                                      f"({m['prob_true']:.2f})\npred {class_names[m['pred']]} ({m['prob_pred']:.2f})",
                  fontsize=7.5, color="darkred")
        for ax in axes[len(mistakes):]:
            ax.set_axis_off()
    else:
        bottom.text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=12)
    return write_png(fig, out_png)


def _default_split(info: dict) -> str:
    """The first labeled split (train, then validation, ...), else the first split."""
    splits = list(info.get("splits", {}))
    if not splits:
        raise UserError("shard set has no splits")
    labeled = [s for s in splits if is_labeled(info, s)]
    return "train" if "train" in labeled else (labeled or splits)[0]


MAX_GRID_CLASSES = 48  # rows a contact sheet draws: 1,000 classes made a 200,000-px-tall picture


def _grid_classes(info: dict, labeled: bool) -> list[int]:
    """The classes a contact sheet draws, a row each: all, or MAX_GRID_CLASSES spread evenly over
    the class list; [] for an unlabeled split."""
    k = len(class_names(info)) if labeled else 0
    if k <= MAX_GRID_CLASSES:
        return list(range(k))
    return sorted({int(round(i * (k - 1) / (MAX_GRID_CLASSES - 1))) for i in range(MAX_GRID_CLASSES)})


def contact_sheet(root: str | Path, info: dict, out_png: str | Path, per_class: int = 4,
                  split: str | None = None) -> Path:
    """A grid with one row per class (at most MAX_GRID_CLASSES, spread over the list) and up to
    `per_class` samples each, labelled with the class name; an unlabeled split gives a few rows
    of its first samples. Stops reading once full."""
    if per_class < 1:
        raise UserError(f"per class {per_class}: expected a positive integer")
    split = split or _default_split(info)
    split_info(info, split)
    names = class_names(info)
    labeled = is_labeled(info, split)
    classes = _grid_classes(info, labeled)
    row_of = {c: r for r, c in enumerate(classes)}
    n_rows = len(classes) if labeled else 4
    cells: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(n_rows)]
    counts = label_counts(info, split) or {}
    # classes without samples can never be filled; don't read the whole split for them
    needed = sum(min(per_class, int(counts.get(str(c), per_class))) for c in classes) if labeled else 4 * per_class
    filled = 0
    for s in iter_samples(str(root), info, split):
        if filled >= needed:
            break
        data = image_bytes(s)
        if data is None or (labeled and "cls" not in s):
            continue
        row = row_of.get(int(s["cls"])) if labeled else filled // per_class
        if row is not None and len(cells[row]) < per_class and (thumb := _thumbnail_or_none(data)) is not None:
            cells[row].append((s["__key__"], thumb))
            filled += 1

    fig = Figure(figsize=(1.7 * per_class + 2.2, 2.0 * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    some = f" ({len(classes)} of {len(names)} classes, spread over the list)" if len(classes) < len(names) else ""
    fig.suptitle(f"{Path(str(root)).name} / {split}: {per_class} per class{some}" if labeled
                 else f"{Path(str(root)).name} / {split} (unlabeled): first samples")
    axes = fig.subplots(n_rows, per_class, squeeze=False)
    for r in range(n_rows):
        for c in range(per_class):
            ax = axes[r, c]
            key, img = cells[r][c] if c < len(cells[r]) else ("", None)
            _show(ax, img, key_label(key, 24), fontsize=8.5)
            if img is None and c == 0:
                ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        if labeled:
            axes[r, 0].set_ylabel(names[classes[r]], fontsize=9, rotation=0, ha="right", va="center")
    return write_png(fig, out_png)


def draw_suspects(out_png: str | Path, items: Sequence[dict], title: str, cols: int = 8) -> Path:
    """A grid of suspects, most suspect first. `items`: dicts with `key`, `label` and `pred`
    (class names), `p_label`, `p_pred` and `image` (HWC uint8 thumbnail, or None if not found)."""
    rows = max(1, math.ceil(len(items) / cols))
    fig = Figure(figsize=(2.1 * cols, 2.6 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=14)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for n, (ax, it) in enumerate(zip(axes, items), start=1):
        _show(ax, it.get("image"), f"{n}. {key_label(it['key'], 28)}\ngiven {it['label']} ({it['p_label']:.2f})\n"
                                   f"pred {it['pred']} ({it['p_pred']:.2f})", fontsize=8, color="darkred")
        if it.get("image") is None:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    for ax in axes[len(items):]:
        ax.set_axis_off()
    return write_png(fig, out_png)


def draw_training_report(run: str | Path, data: str, info: dict, split: str, shown: dict,
                         class_names: Sequence[str], worst: int = 16) -> Path:
    """RUN/report.png at the end of training: the curves of RUN/metrics.jsonl, and the confusion
    matrix and worst mistakes of `shown` (the Evaluator's best evaluation of the run, else its
    last: epoch, step, weights, key, target, prob, confusion, acc, macro_f1)."""
    target, prob = np.asarray(shown["target"]), np.asarray(shown["prob"])
    pred = prob.argmax(axis=1) if len(prob) else np.zeros(0, dtype=np.int64)
    p_true = prob[np.arange(len(target)), target] if len(target) else np.zeros(0)
    wrong = np.flatnonzero(pred != target)
    order = wrong[np.argsort(p_true[wrong], kind="stable")][:worst]
    mistakes = [{"key": shown["key"][i], "true": int(target[i]), "pred": int(pred[i]), "prob_true": float(p_true[i]),
                 "prob_pred": float(prob[i, pred[i]])} for i in order]
    thumbs = load_thumbnails(data, info, split, [m["key"] for m in mistakes])
    for m in mistakes:
        m["image"] = thumbs.get(m["key"])
    which = "best" if shown["best"] else "last"
    weights = " (EMA weights)" if shown["weights"] == "ema" else ""
    title = (f"{Path(run).name}: {which} evaluation, epoch {shown['epoch']} step {shown['step']}{weights}, on {split} "
             f"({len(target)} samples): accuracy {shown['acc']:.4f}, macro F1 {shown['macro_f1']:.4f}")
    return draw_report(Path(run) / "report.png", history=read_history(run), confusion=shown["confusion"],
                       class_names=class_names, mistakes=mistakes, title=title)
