"""Metrics equal scikit-learn's; confusion files; focal / F1 losses and class weights."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_recall_fscore_support

from dist_train.infer.metrics import confusion_matrix, save_confusion, summarize
from dist_train.tasks import CLASSIFY
from dist_train.tasks.losses import class_weights_from_counts, f1_loss, focal_loss
from dist_train.tasks.mask import TASK as MASK
from dist_train.tasks.mask import labels as L


@pytest.mark.parametrize("seed", range(6))
def test_summarize_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 18
    n = int(rng.integers(5, 200))
    # classes missing from targets, from predictions, or from both
    targets = rng.choice([0, 1, 2, 5, 7, 11, 12], size=n)
    preds = np.where(rng.random(n) < 0.5, targets, rng.choice([0, 3, 5, 9, 12, 17], size=n))
    stats = {**summarize(preds, targets, k), **MASK.extra_metrics(preds, targets)}
    assert stats["macro_f1"] == pytest.approx(f1_score(targets, preds, average="macro", zero_division=0), abs=1e-12)
    assert stats["macro_f1"] == pytest.approx(f1_score(targets, preds, average="macro"), abs=1e-12)
    assert stats["acc"] == pytest.approx(float((preds == targets).mean()))
    p, r, f, s = precision_recall_fscore_support(targets, preds, labels=list(range(k)), zero_division=0)
    per = stats["per_class"]
    assert [c["support"] for c in per] == s.tolist()
    np.testing.assert_allclose([c["precision"] for c in per], p)
    np.testing.assert_allclose([c["recall"] for c in per], r)
    np.testing.assert_allclose([c["f1"] for c in per], f)
    np.testing.assert_array_equal(stats["confusion"], sk_confusion(targets, preds, labels=list(range(k))))
    dt = np.array([L.decode(int(c)) for c in targets])
    dp = np.array([L.decode(int(c)) for c in preds])
    for i, task in enumerate(("mask", "gender", "age")):
        assert stats[f"{task}_acc"] == pytest.approx(float((dt[:, i] == dp[:, i]).mean()))


def test_summarize_hand_values() -> None:
    stats = summarize([0, 0, 1, 2], [0, 1, 1, 1], 4, class_names=["a", "b", "c", "d"])
    # class a: P 1/2 R 1 F 2/3; b: P 1 R 1/3 F 1/2; c: P 0 R 0 F 0; d absent everywhere (not averaged)
    assert stats["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert stats["acc"] == 0.5 and stats["num_samples"] == 4
    assert [c["name"] for c in stats["per_class"]] == ["a", "b", "c", "d"]
    assert "mask_acc" not in stats and CLASSIFY.extra_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])) == {}
    # mask tasks: 0 = wear/male/<30, 17 = not_wear/female/>=60, 3 = wear/female/<30
    t = MASK.extra_metrics(np.array([3, 17]), np.array([0, 17]))
    assert (t["mask_acc"], t["gender_acc"], t["age_acc"]) == (1.0, 0.5, 1.0)


def test_confusion_matrix_and_errors() -> None:
    cm = confusion_matrix([1, 1, 0], [0, 1, 0], 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError):
        confusion_matrix([3], [0], 3)
    with pytest.raises(ValueError):
        summarize([], [], 3)


def test_save_confusion_files(tmp_path: Path) -> None:
    names = ["cat", "dog", "bird/x"]
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    save_confusion(cm, names, tmp_path / "cm.csv", tmp_path / "cm.png")
    rows = list(csv.reader((tmp_path / "cm.csv").open()))
    assert rows[0] == ["true\\pred", *names]
    assert rows[2] == ["dog", "2", "3", "0"]
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.csv", "cm.png"]  # no temp files left


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_gamma0_equals_cross_entropy(weighted: bool, smoothing: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    w = torch.rand(5, generator=g) + 0.5 if weighted else None
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0, weight=w, smoothing=smoothing),
                               F.cross_entropy(logits, y, weight=w, label_smoothing=smoothing))
    soft = torch.softmax(torch.randn(16, 5, generator=g), 1)
    torch.testing.assert_close(focal_loss(logits, soft, gamma=0.0, weight=w, smoothing=smoothing),
                               F.cross_entropy(logits, soft, weight=w, label_smoothing=smoothing))


def test_focal_hand_value() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = (0.75, 0.25) and (0.5, 0.5)
    y = torch.tensor([0, 1])
    want = (-(0.25 ** 2) * math.log(0.75) - (0.5 ** 2) * math.log(0.5)) / 2
    assert focal_loss(logits, y, gamma=2.0).item() == pytest.approx(want, rel=1e-6)
    assert focal_loss(logits, y, gamma=2.0).item() < F.cross_entropy(logits, y).item()


def test_f1_loss_hand_value() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(4.0)]])
    # p = (0.75, 0.25), (0.5, 0.5), (0.2, 0.8); y = 0, 1, 1
    y = torch.tensor([0, 1, 1])
    # class 0: tp .75, fp .7, fn .25 -> P .75/1.45, R .75; class 1: tp 1.3, fp .25, fn .7 -> P 1.3/1.55, R 1.3/2
    p0, r0 = 0.75 / 1.45, 0.75
    p1, r1 = 1.3 / 1.55, 1.3 / 2.0
    f0, f1 = 2 * p0 * r0 / (p0 + r0), 2 * p1 * r1 / (p1 + r1)
    assert f1_loss(logits, y, 2).item() == pytest.approx(1 - (f0 + f1) / 2, rel=1e-5)
    perfect = torch.tensor([[20.0, -20.0], [-20.0, 20.0]])
    assert f1_loss(perfect, torch.tensor([0, 1]), 2).item() == pytest.approx(0.0, abs=1e-5)
    logits.requires_grad_(True)
    f1_loss(logits, y, 2).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_class_weights_from_counts() -> None:
    w = class_weights_from_counts({"0": 10, "1": 30, "2": 60}, 3)
    inv = np.array([1 / 10, 1 / 30, 1 / 60])
    np.testing.assert_allclose(w.numpy(), inv / inv.mean(), rtol=1e-6)
    assert w.mean().item() == pytest.approx(1.0)
    np.testing.assert_allclose(class_weights_from_counts([10, 30, 60], 3).numpy(), w.numpy())
    missing = class_weights_from_counts({"0": 4}, 2)  # class 1 unseen: weighted as one sample
    np.testing.assert_allclose(missing.numpy(), np.array([0.25, 1.0]) / 0.625, rtol=1e-6)
    with pytest.raises(ValueError):
        class_weights_from_counts({"5": 1}, 3)
