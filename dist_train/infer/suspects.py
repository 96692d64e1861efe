"""Label-noise suspects: labeled samples ranked by how unlikely the out-of-fold models find
their given label.

Score = 1 - p(given label) under the fold model that never trained on the sample (cleanlab's
"self-confidence" ranking). Beside the rank, each sample gets confident learning's verdict
(Northcutt et al., 2021): with t_j the mean p(j) over the samples labeled j, a sample is
counted in class j when p(j) >= t_j (the most probable such j); `issue` = 1 when that class is
not its given label. The count of issues is the estimate of how many labels are wrong; the rank
says which to look at first. A task may add its own tables (`Task.suspects`: e.g. corrections
for whole groups of samples, in the format its training reads back).

Weak models contradict most labels, so two guards: `judge_models` (the CLI refuses models whose
OOF accuracy is not at least MIN_GAIN above always answering the most common label), and a cap:
at most `max_fraction` of the samples are flagged and of a table's groups proposed (the most
suspect first).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dist_train.errors import atomic_write_text
from dist_train.tasks.base import SuspectTable, Task

from .files import OutOfFold, Predictions

MAX_FRACTION = 0.1  # at most this share of the samples flagged, of a table's groups proposed
MIN_GAIN = 0.1  # OOF accuracy needed above the majority-class rate

COLUMNS = ["rank", "key", "fold", "label", "label_name", "pred", "pred_name", "p_label", "p_pred", "score", "issue"]


@dataclass
class Suspects:
    """Every labeled sample, most suspect first (indices into the OOF rows), and the task's tables."""

    order: np.ndarray
    score: np.ndarray  # 1 - p(given label), per OOF row
    issue: np.ndarray  # bool: confident learning counts the sample in another class (capped), per OOF row
    thresholds: np.ndarray  # t_j per class (nan for a class nobody is labeled with)
    tables: list[SuspectTable]  # capped to max_fraction of their units
    flagged: int = 0  # issues before the cap


@dataclass(frozen=True)
class Quality:
    """How well the fold models predict the given labels, against the majority-class baseline."""

    accuracy: float  # OOF accuracy on the given labels
    majority: float  # accuracy of always answering the most common given label
    majority_class: str
    needed: float  # majority + MIN_GAIN (capped at 1)

    @property
    def ok(self) -> bool:
        return self.accuracy >= self.needed

    def line(self) -> str:
        return (f"OOF accuracy {self.accuracy:.3f} vs {self.majority:.3f} for always answering the most common "
                f"label {self.majority_class!r} (needs >= {self.needed:.3f})")


def judge_models(p: Predictions, min_gain: float = MIN_GAIN) -> Quality:
    """The rule: the models may judge labels when their OOF accuracy is at least `min_gain`
    above the majority-class rate (below it they mostly disagree with the labels by ignorance)."""
    labels = np.asarray(p.label, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(p.classes))
    majority = float(counts.max() / len(labels))
    acc = float((p.prob.argmax(axis=1) == labels).mean())
    return Quality(acc, majority, p.classes[int(counts.argmax())], min(1.0, majority + min_gain))


def cap(n: int, max_fraction: float) -> int:
    """How many of n may be proposed: ceil(max_fraction x n)."""
    return math.ceil(max_fraction * n - 1e-9)


def _capped_table(t: SuspectTable, max_fraction: float) -> SuspectTable:
    keep = cap(t.units, max_fraction)
    if not t.units or len(t.rows) <= keep:
        return t
    note = f"; capped to the {keep} most suspect ({max_fraction:g} of {t.units}; --max-fraction)"
    return replace(t, rows=t.rows[:keep], summary=t.summary + note)


def confident_issues(prob: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning's off-diagonal of the confident joint: (issue per sample, t_j per class)."""
    k = prob.shape[1]
    t = np.array([prob[labels == j, j].mean() if (labels == j).any() else np.nan for j in range(k)])
    above = prob >= np.where(np.isnan(t), np.inf, t)[None, :]
    masked = np.where(above, prob, -np.inf)
    confident = above.any(axis=1)
    return confident & (masked.argmax(axis=1) != labels), t


def find_suspects(oof: OutOfFold, task: Task, max_fraction: float = MAX_FRACTION) -> Suspects:
    """Rank, flag (at most `max_fraction` of the samples: the most suspect of the flagged) and
    the task's tables (each at most `max_fraction` of its units)."""
    p = oof.preds
    labels = np.asarray(p.label, dtype=np.int64)
    p_label = p.prob[np.arange(len(labels)), labels]
    score = 1.0 - p_label
    order = np.lexsort((np.arange(len(labels)), -score))  # most suspect first, ties in file order
    issue, t = confident_issues(p.prob, labels)
    flagged = int(issue.sum())
    if flagged > cap(len(labels), max_fraction):
        keep = order[issue[order]][:cap(len(labels), max_fraction)]
        issue = np.zeros_like(issue)
        issue[keep] = True
    tables = [_capped_table(tb, max_fraction) for tb in task.suspects(p.ids, oof.meta, p.prob, labels, p.classes)]
    return Suspects(order, score, issue, t, tables, flagged)


def sample_rows(oof: OutOfFold, s: Suspects, top: int) -> list[list]:
    """The rows of suspects.csv (COLUMNS), the `top` most suspect (all for top 0)."""
    p = oof.preds
    pred = p.prob.argmax(axis=1)
    rows = []
    for rank, i in enumerate(s.order[:top] if top else s.order, start=1):
        lab, pr = int(p.label[i]), int(pred[i])
        rows.append([rank, p.ids[i], int(oof.fold[i]), lab, p.classes[lab], pr, p.classes[pr],
                     f"{p.prob[i, lab]:.4f}", f"{p.prob[i, pr]:.4f}", f"{s.score[i]:.4f}", int(s.issue[i])])
    return rows


def table_path(out: str | Path, name: str) -> Path:
    """suspects.csv -> suspects.NAME.csv beside it."""
    return Path(out).with_suffix(f".{name}.csv")


def write_table(path: str | Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(path, buf.getvalue())
