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

import io
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.transforms.v2 import functional as TF

from .data.transforms import decode_rgb
from .errors import UserError, atomic_write_bytes
from .infer.metrics import draw_confusion
from .shardset.format import class_names, image_bytes, is_labeled, iter_samples, label_counts, split_info
from .trust.files import MAX_JSON_BYTES, parse_json, read_capped
from .trust.schema import Dict

THUMB = 96  # thumbnail side in pixels (longer side)


# ----------------------------------------------------------------------------- thumbnails
def thumbnail(data: bytes, side: int = THUMB) -> np.ndarray:
    """Image bytes -> HWC uint8 array whose longer side is `side` (aspect kept)."""
    img = decode_rgb(data)
    h, w = img.shape[-2:]
    scale = side / max(h, w)
    img = TF.resize(img, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return img.permute(1, 2, 0).numpy()


def _short(text: str, n: int) -> str:
    """Keep the end of a long key (the file name part), marking the cut."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


def load_thumbnails(root: str, info: dict, split: str, keys: Iterable[str], side: int = THUMB) -> dict[str, np.ndarray]:
    """key -> thumbnail for the wanted keys; reading stops once all are found."""
    wanted = set(keys)
    out: dict[str, np.ndarray] = {}
    if not wanted:
        return out
    for s in iter_samples(root, info, split):
        key = s["__key__"]
        if key in wanted and (data := image_bytes(s)) is not None:
            out[key] = thumbnail(data, side)
            if len(out) == len(wanted):
                break
    return out


# ----------------------------------------------------------------------------- drawing helpers
def _save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


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
            ax.plot(xs, ys, marker="o", markersize=3, label=field)
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
    top_h = max(6.0, 0.3 * k + 3.0)
    rows = math.ceil(len(mistakes) / cols) if mistakes else 1
    fig = Figure(figsize=(16, top_h + 2.3 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, 2.3 * rows])
    grid = top.add_gridspec(2, 2, width_ratios=[1, 1.3])
    _curve(top.add_subplot(grid[0, 0]), history, ("train_loss", "val_loss"), "loss")
    _curve(top.add_subplot(grid[1, 0]), history, ("val_macro_f1", "val_acc"), "validation")
    draw_confusion(top.add_subplot(grid[:, 1]), np.asarray(confusion), class_names, fontsize=6)
    if mistakes:
        bottom.suptitle(f"worst {len(mistakes)} mistakes (lowest probability on the true class)", fontsize=10)
        axes = bottom.subplots(rows, cols, squeeze=False).ravel()
        for ax, m in zip(axes, mistakes):
            _show(ax, m.get("image"), f"{_short(m['key'], 30)}\ntrue {class_names[m['true']]} ({m['prob_true']:.2f})\n"
                                      f"pred {class_names[m['pred']]} ({m['prob_pred']:.2f})", fontsize=6.5,
                  color="darkred")
        for ax in axes[len(mistakes):]:
            ax.set_axis_off()
    else:
        bottom.text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=12)
    return _save(fig, out_png)


def _default_split(info: dict) -> str:
    """The first labeled split (train, then validation, ...), else the first split."""
    splits = list(info.get("splits", {}))
    if not splits:
        raise UserError("shard set has no splits")
    labeled = [s for s in splits if is_labeled(info, s)]
    return "train" if "train" in labeled else (labeled or splits)[0]


def contact_sheet(root: str | Path, info: dict, out_png: str | Path, per_class: int = 4,
                  split: str | None = None) -> Path:
    """A grid with one row per class and up to `per_class` samples each, labelled with the class
    name; an unlabeled split gives a few rows of its first samples. Stops reading once full."""
    if per_class < 1:
        raise UserError(f"per class {per_class}: expected a positive integer")
    split = split or _default_split(info)
    split_info(info, split)
    names = class_names(info)
    labeled = is_labeled(info, split)
    n_rows = len(names) if labeled else 4
    cells: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(n_rows)]
    needed = n_rows * per_class
    counts = label_counts(info, split) or {}
    if labeled:  # classes without samples can never be filled; don't read the whole split for them
        needed = sum(min(per_class, int(counts.get(str(c), per_class))) for c in range(n_rows))
    filled = 0
    for s in iter_samples(str(root), info, split):
        if filled >= needed:
            break
        data = image_bytes(s)
        if data is None:
            continue
        if labeled:
            if "cls" not in s:
                continue
            row = int(s["cls"])
            if not 0 <= row < n_rows:
                continue
        else:
            row = filled // per_class
        if len(cells[row]) < per_class:
            cells[row].append((s["__key__"], thumbnail(data)))
            filled += 1

    fig = Figure(figsize=(1.6 * per_class + 2.2, 1.75 * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{Path(str(root)).name} / {split}: {per_class} per class" if labeled
                 else f"{Path(str(root)).name} / {split} (unlabeled): first samples")
    axes = fig.subplots(n_rows, per_class, squeeze=False)
    for r in range(n_rows):
        for c in range(per_class):
            ax = axes[r, c]
            key, img = cells[r][c] if c < len(cells[r]) else ("", None)
            _show(ax, img, _short(key, 24), fontsize=5.5)
            if img is None and c == 0:
                ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        if labeled:
            axes[r, 0].set_ylabel(names[r], fontsize=7, rotation=0, ha="right", va="center")
    return _save(fig, out_png)


def draw_suspects(out_png: str | Path, items: Sequence[dict], title: str, cols: int = 8) -> Path:
    """A grid of suspects, most suspect first. `items`: dicts with `key`, `label` and `pred`
    (class names), `p_label`, `p_pred` and `image` (HWC uint8 thumbnail, or None if not found)."""
    rows = max(1, math.ceil(len(items) / cols))
    fig = Figure(figsize=(1.9 * cols, 2.1 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for n, (ax, it) in enumerate(zip(axes, items), start=1):
        _show(ax, it.get("image"), f"{n}. {_short(it['key'], 26)}\ngiven {it['label']} ({it['p_label']:.2f})\n"
                                   f"pred {it['pred']} ({it['p_pred']:.2f})", fontsize=6, color="darkred")
        if it.get("image") is None:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    for ax in axes[len(items):]:
        ax.set_axis_off()
    return _save(fig, out_png)
