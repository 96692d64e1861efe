"""Metrics equal scikit-learn's; confusion files; focal / F1 losses and class weights; every loss
on soft (Mixup/CutMix) targets, single- and multi-head."""

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
from timm.data.mixup import mixup_target

from dist_train.config import TaskSection
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


def test_confusion_picture_of_many_classes_stays_small(tmp_path: Path) -> None:
    """1,000 classes (an ImageNet fine-tune) were drawn 452 inches wide: tens of GB, then killed.
    The picture is capped at 2,400 px and names classes only up to 60 (the CSV names them all)."""
    from PIL import Image

    from dist_train.report import draw_report

    k = 1000
    cm = np.diag(np.arange(1, k + 1))
    names = [f"n{i:08d}" for i in range(k)]
    save_confusion(cm, names, tmp_path / "cm.csv", tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as im:
        assert max(im.size) <= 2400
    draw_report(tmp_path / "report.png", history=[], confusion=cm, class_names=names, mistakes=[], title="t")
    with Image.open(tmp_path / "report.png") as im:
        assert max(im.size) <= 2400 + 270


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
    # A class with no sample (a set sharded with --classes-from without it) weighs as an average
    # class: finite, and not dominating its smoothing share; the others keep their mean of 1.
    missing = class_weights_from_counts({"0": 10, "1": 0, "2": 30}, 3)
    np.testing.assert_allclose(missing.numpy(), [1.5, 1.0, 0.5], rtol=1e-6)
    assert torch.isfinite(class_weights_from_counts([0, 0], 2)).all()
    with pytest.raises(ValueError):
        class_weights_from_counts({"5": 1}, 3)


# ----------------------------------------------------------------------------- soft targets (Mixup/CutMix)
# Two samples of classes 0 and 2 mixed with lambda 0.3 (timm mixes each sample with the batch's
# mirror image): q0 = 0.3*e0 + 0.7*e2 = (0.3, 0, 0.7), q1 = 0.3*e2 + 0.7*e0 = (0.7, 0, 0.3).
# Both samples predict p = (0.5, 0.25, 0.25): -log p = (ln2, 2 ln2, 2 ln2).
# Weights (0.5, 0.5, 2) are what --class-weights auto gives for counts (40, 40, 10).
LN2 = math.log(2.0)
P3 = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
COUNTS3 = {"0": 40, "1": 40, "2": 10}
SOFT_CASES = [
    # ce: q . -log p, mean over the 2 samples: (0.3 + 1.4) ln2 and (0.7 + 0.6) ln2 -> 1.5 ln2;
    # weighted: (0.5*0.3 + 2*1.4) ln2 and (0.5*0.7 + 2*0.6) ln2 -> (2.95 + 1.55) / 2 = 2.25 ln2
    ("ce", 1.5 * LN2, 2.25 * LN2),
    # focal (gamma 2): (1-p)^2 -log p = (0.25 ln2, ., 0.5625 * 2 ln2 = 1.125 ln2);
    # (0.3*0.25 + 0.7*1.125) = 0.8625 and (0.7*0.25 + 0.3*1.125) = 0.5125 -> 0.6875 ln2;
    # weighted: (0.5*0.075 + 2*0.7875) = 1.6125 and (0.5*0.175 + 2*0.3375) = 0.7625 -> 1.1875 ln2
    ("focal", 0.6875 * LN2, 1.1875 * LN2),
    # f1: class 0 tp .5 fp .5 fn .5 -> F1 1/2; class 1 tp 0 -> F1 clamped to eps ~ 0;
    # class 2 tp .25 fp .25 fn .75 -> P 1/2, R 1/4, F1 1/3. 1 - mean; weighted: 1 - sum w F1 / sum w
    ("f1", 1 - (1 / 2 + 1 / 3) / 3, 1 - (0.5 * 1 / 2 + 2 * 1 / 3) / 3),
]


def mixed_pair(classes: list[int], num_classes: int) -> torch.Tensor:
    """timm's own Mixup target for a batch of two, lambda 0.3, no smoothing."""
    return mixup_target(torch.tensor(classes), num_classes, lam=0.3)


@pytest.mark.parametrize("loss, plain, weighted", SOFT_CASES, ids=[c[0] for c in SOFT_CASES])
def test_soft_targets_hand_values(loss: str, plain: float, weighted: float) -> None:
    """Every --loss with and without --class-weights auto on a mixed batch, through the task's
    criterion; the Mixup target is not smoothed a second time (smoothing 0.1 in the config)."""
    q = mixed_pair([0, 2], 3)
    torch.testing.assert_close(q, torch.tensor([[0.3, 0.0, 0.7], [0.7, 0.0, 0.3]]))
    info = {"label_counts": {"train": COUNTS3}}
    for weights, want in ((None, plain), ("auto", weighted)):
        crit = CLASSIFY.criterion(TaskSection(loss=loss, class_weights=weights, smoothing=0.1), info, "train", 3,
                                  torch.device("cpu"))
        assert crit(P3, q).item() == pytest.approx(want, rel=1e-5), (loss, weights)
    w = class_weights_from_counts(COUNTS3, 3)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 2.0]))
    if loss == "ce":  # torch's own definition for probability targets, weighted or not
        assert F.cross_entropy(P3, q).item() == pytest.approx(plain, rel=1e-6)
        assert F.cross_entropy(P3, q, weight=w).item() == pytest.approx(weighted, rel=1e-6)


@pytest.mark.parametrize("loss", ["ce", "focal", "f1"])
def test_hard_targets_equal_their_unmixed_soft_targets(loss: str) -> None:
    """Mixup at lambda 1 is no mixing: hard targets smoothed by the loss give the same value as
    timm's smoothed one-hot targets (smoothed once, by Mixup)."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    crit = CLASSIFY.criterion(TaskSection(loss=loss, smoothing=0.1), {}, "train", 5, torch.device("cpu"))
    torch.testing.assert_close(crit(logits, y), crit(logits, mixup_target(y, 5, lam=1.0, smoothing=0.1)))
    assert not torch.allclose(crit(logits, y), crit(logits, F.one_hot(y, 5).float()))  # smoothing applied


# --head multi: classes 5 = (mask 0, gender 1, age 2) and 13 = (mask 2, gender 0, age 1), mixed
# with lambda 0.3. Marginals: sample 0 mask (.3, 0, .7), gender (.7, .3), age (0, .7, .3);
# sample 1 mask (.7, 0, .3), gender (.3, .7), age (0, .3, .7). Heads predict mask (.5, .25, .25),
# gender (.5, .5), age (.25, .25, .5): the mask head is the 3-class case above, the age head the
# same case with classes permuted, gender gives ln2 (ce), 0.25 ln2 (focal), F1 1/2 per class.
# Counts m x g x a = (40, 40, 10) x (1, 1) x (1, 1, 1): mask weights (.5, .5, 2), the others 1.
MULTI_CASES = [
    ("ce", (1.5 + 1 + 1.5) * LN2, (2.25 + 1 + 1.5) * LN2),
    ("focal", (0.6875 + 0.25 + 0.6875) * LN2, (1.1875 + 0.25 + 0.6875) * LN2),
    ("f1", 2 * SOFT_CASES[2][1] + 0.5, SOFT_CASES[2][2] + 0.5 + SOFT_CASES[2][1]),
]


@pytest.mark.parametrize("loss, plain, weighted", MULTI_CASES, ids=[c[0] for c in MULTI_CASES])
def test_multi_head_soft_targets_hand_values(loss: str, plain: float, weighted: float) -> None:
    from dist_train.tasks.mask.model import combine_heads, split_targets

    q = mixed_pair([5, 13], 18)
    mask, gender, age = split_targets(q)
    torch.testing.assert_close(mask, torch.tensor([[0.3, 0.0, 0.7], [0.7, 0.0, 0.3]]))
    torch.testing.assert_close(gender, torch.tensor([[0.7, 0.3], [0.3, 0.7]]))
    torch.testing.assert_close(age, torch.tensor([[0.0, 0.7, 0.3], [0.0, 0.3, 0.7]]))
    heads = [torch.log(torch.tensor([p, p])) for p in ([0.5, 0.25, 0.25], [0.5, 0.5], [0.25, 0.25, 0.5])]
    out18 = combine_heads(*heads)  # the model's 18-class output, what the criterion sees
    counts = {str(m * 6 + g * 3 + a): (40, 40, 10)[m] for m in range(3) for g in range(2) for a in range(3)}
    info = {"layout": "mask", "label_counts": {"train": counts}}
    for weights, want in ((None, plain), ("auto", weighted)):
        crit = MASK.criterion(TaskSection(head="multi", loss=loss, class_weights=weights, smoothing=0.1), info,
                              "train", 18, torch.device("cpu"))
        assert crit(out18, q).item() == pytest.approx(want, rel=1e-5), (loss, weights)


def test_characters_the_font_lacks_are_one_warning_naming_them(tmp_path: Path, monkeypatch) -> None:
    """matplotlib warns once per missing glyph (Korean class names: a line each); the pictures
    say it once a process, with the characters and how to have them drawn."""
    import warnings

    import matplotlib

    from dist_train.infer import metrics

    monkeypatch.setattr(metrics, "_GLYPHS_SAID", set())
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_confusion(np.array([[3, 1], [0, 2]]), ["마스크", "노마스크"], tmp_path / "c.csv", tmp_path / "c.png")
        save_confusion(np.array([[3, 1], [0, 2]]), ["마스크", "노마스크"], tmp_path / "c.csv", tmp_path / "c.png")
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "'노마스크'" in lines[0] and "font.family" in lines[0], lines
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
