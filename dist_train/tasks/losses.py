"""Losses for imbalanced classes: focal, soft macro-F1, inverse-frequency class weights.

Each takes hard (N,) class targets or soft (N, C) probabilities (Mixup/CutMix, label smoothing
already applied), so every loss works with every augmentation; `make_loss` picks one by name.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None,
               smoothing: float = 0.0) -> torch.Tensor:
    """Focal loss: cross-entropy with each class's log-probability scaled by (1 - p)^gamma.

    Reduction, class weights, label smoothing and soft (N, C) targets follow
    `F.cross_entropy` term for term, so gamma=0 gives exactly cross-entropy.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    flp = (1.0 - logp.exp()).pow(gamma) * logp
    num_classes = logits.shape[1]
    w = torch.ones(num_classes, device=logits.device) if weight is None else weight.to(logits.device).float()
    if targets.ndim == 2:  # probabilities (e.g. from Mixup): weighted sum per sample, mean over the batch
        q = targets.float() * (1.0 - smoothing) + smoothing / num_classes
        return -(q * flp * w).sum(dim=1).mean()
    nll = F.nll_loss(flp, targets, weight=w)
    if smoothing == 0.0:
        return nll
    smooth = -(flp * w).sum(dim=1).sum() / num_classes / w[targets].sum()
    return (1.0 - smoothing) * nll + smoothing * smooth


def f1_loss(logits: torch.Tensor, targets: torch.Tensor, num_classes: int, eps: float = 1e-7,
            weight: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """1 - soft macro F1 of the batch (softmax probabilities as fractional counts).

    Per class: tp = sum p*y, fp = sum p*(1-y), fn = sum (1-p)*y; precision and recall from them,
    F1 = 2PR / (P + R + eps) clamped to [eps, 1 - eps]; mean over all classes — the form this
    competition's top solutions used alongside cross-entropy. `weight`: the weighted mean
    sum w_c F1_c / sum w_c instead. `smoothing` turns y into y*(1-s) + s/C, as for the others.
    """
    y = targets.float() if targets.ndim == 2 else F.one_hot(targets, num_classes).float()
    y = y * (1.0 - smoothing) + smoothing / num_classes
    p = F.softmax(logits.float(), dim=1)
    tp = (y * p).sum(dim=0)
    fp = ((1 - y) * p).sum(dim=0)
    fn = (y * (1 - p)).sum(dim=0)
    precision = tp / (tp + fp + eps)
    recall = tp / (tp + fn + eps)
    f1 = (2 * precision * recall / (precision + recall + eps)).clamp(min=eps, max=1 - eps)
    if weight is None:
        return 1 - f1.mean()
    w = weight.to(f1.device).float()
    return 1 - (w * f1).sum() / w.sum()


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets (N,) or (N, C)) -> loss


def make_loss(name: str, num_classes: int, weight: torch.Tensor | None = None, smoothing: float = 0.0) -> Loss:
    """The `--loss` ce|focal|f1 for hard or soft targets, with optional class weights.

    Hard (N,) targets get `smoothing`; soft (N, C) targets are used as given, because timm's
    Mixup has already smoothed them with the same value. Weights follow `F.cross_entropy` on
    probabilities: -sum_c w_c q_c log p_c per sample, mean over the batch (f1: see f1_loss).
    """
    if name not in ("ce", "focal", "f1"):
        raise ValueError(f"unknown loss {name!r}: expected ce, focal or f1")

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        s = smoothing if targets.ndim == 1 else 0.0
        if name == "focal":
            return focal_loss(logits, targets, weight=weight, smoothing=s)
        if name == "f1":
            return f1_loss(logits, targets, num_classes, weight=weight, smoothing=s)
        y = targets if targets.ndim == 1 else targets.float()  # cross_entropy wants one dtype for both
        return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=s)

    return loss


def class_weights_from_counts(counts: Mapping[str | int, int] | Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, those of the classes with samples normalised to mean 1
    (`_info.json` label_counts has string keys).

    A class with no samples (e.g. a set sharded with `--classes-from` that lacks one) gets weight
    1, an average class's: nothing to divide by, and a large weight would let its share of the
    label smoothing / Mixup targets outweigh the true classes'.
    """
    n = np.zeros(num_classes, dtype=np.float64)
    items = counts.items() if isinstance(counts, Mapping) else enumerate(counts)
    for k, v in items:
        c = int(k)
        if not 0 <= c < num_classes:
            raise ValueError(f"label count for class {k} outside 0..{num_classes - 1}")
        n[c] = float(v)
    seen = n > 0
    inv = np.ones(num_classes, dtype=np.float64)
    if seen.any():
        inv[seen] = 1.0 / n[seen]
        inv[seen] /= inv[seen].mean()
    return torch.tensor(inv, dtype=torch.float32)
