"""Calibration for macro F1: offsets that lift an under-predicted rare class, in-sample and
cross-fitted, deterministic; the OOF file contract; predict/ensemble --calibration; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dist_train import calibrate as calibrate_cli
from dist_train import ensemble
from dist_train.infer import files
from dist_train.infer.calibration import Grid, apply_offsets, calibrate, macro_f1
from dist_train.infer.metrics import summarize
from dist_train.tasks.mask import labels as L
from test_predict import run_predict, trained_run  # noqa: F401 (fixtures)

CLASSES = ["common", "middle", "small", "rare"]


def biased_probs(n: int = 3000, seed: int = 0, rare_weight: float = 0.1) -> files.Predictions:
    """Bayes posteriors of 4 Gaussian classes (priors 50/30/15/5%), then the rare class's
    probability cut by `rare_weight` and renormalised: a model that under-predicts it."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.5, 0.3, 0.15, 0.05])
    mu = np.eye(4) * 2.5
    y = rng.choice(4, size=n, p=prior)
    x = mu[y] + rng.normal(size=(n, 4))
    ll = -0.5 * ((x[:, None, :] - mu[None]) ** 2).sum(-1) + np.log(prior) + np.log([1, 1, 1, rare_weight])
    p = np.exp(ll - ll.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return files.Predictions("key", [f"s{i:05d}" for i in range(n)], p.argmax(1), CLASSES, y, p)


def one_line_exit_2(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as e:
        fn(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_macro_f1_matches_summarize():
    rng = np.random.default_rng(1)
    for k in (2, 5, 18):
        t, p = rng.integers(0, k, 500), rng.integers(0, k - 1, 500)  # a class never predicted
        assert macro_f1(p, t, k) == pytest.approx(summarize(p, t, k)["macro_f1"], abs=1e-12)


def test_calibration_lifts_the_under_predicted_class_in_sample_and_cross_fitted():
    preds = biased_probs()
    assert (preds.ans == 3).sum() < 0.5 * (preds.label == 3).sum()  # the rare class is under-predicted
    r = calibrate(preds, None, Grid(), folds=5, seed=0, source="synthetic")
    assert r["macro_f1"]["after"] > r["macro_f1"]["before"] + 0.02
    assert r["cross_fitted"]["after"] > r["cross_fitted"]["before"] + 0.01
    assert r["cross_fitted"]["after"] <= r["macro_f1"]["after"]  # the honest estimate is the lower one
    off = np.array(r["offsets"])
    assert off[3] - off[:3].max() > 1.0  # the rare class gets the largest push
    rare = r["per_class"][3]
    assert rare["predicted_after"] > rare["predicted_before"] and rare["f1_after"] > rare["f1_before"]
    assert r["cross_fitted"]["folds"] == 5 and len(r["cross_fitted"]["fold_offsets"]) == 5
    assert calibrate(preds, None, Grid(), folds=5, seed=0, source="synthetic") == r  # deterministic


def test_a_well_calibrated_argmax_is_left_alone():
    """Balanced classes, symmetric posteriors: no offset can gain in-sample beyond noise, and the
    cross-fitted gain does not pretend there is one."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 1500)
    logits = rng.normal(size=(1500, 3)) + 3 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = calibrate(files.Predictions("key", [str(i) for i in range(1500)], p.argmax(1), list("abc"), y, p),
                  None, Grid(), source="balanced")
    assert r["macro_f1"]["gain"] < 0.01 and r["cross_fitted"]["gain"] < 0.005


def test_oof_file_round_trip_and_its_folds_drive_the_cross_fit(tmp_path, capsys):
    preds = biased_probs(n=2000)
    fold = np.arange(2000) % 4
    metas = [{"i": i} for i in range(2000)]
    files.save_oof(tmp_path / "oof.probs.npz", preds, fold, metas, "/shards/x", "train")
    oof = files.load_oof(tmp_path / "oof.probs.npz")
    assert oof.preds.ids == preds.ids and oof.preds.classes == CLASSES
    np.testing.assert_array_equal(oof.preds.label, preds.label)
    np.testing.assert_allclose(oof.preds.prob, preds.prob, atol=1e-6)
    np.testing.assert_array_equal(oof.fold, fold)
    assert oof.meta == metas and (oof.data, oof.split) == ("/shards/x", "train")
    assert files.load_probs(tmp_path / "oof.probs.npz").ids == preds.ids  # still a probability file

    out = tmp_path / "cv" / "calibration.json"
    r = calibrate_cli.main([str(tmp_path / "oof.probs.npz"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "in-sample" in printed and "cross-fitted" in printed and "optimistic" in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(r))
    assert saved["classes"] == CLASSES and len(saved["offsets"]) == 4 and saved["method"]
    assert saved["cross_fitted"]["folds"] == 4 and saved["cross_fitted"]["folds_from"] == "the file's fold array"
    assert saved["macro_f1"]["after"] > saved["macro_f1"]["before"]
    assert saved["cross_fitted"]["after"] > saved["cross_fitted"]["before"]


def test_oof_reader_refuses_what_is_not_one(tmp_path, capsys):
    preds = biased_probs(n=50)
    files.save_probs(tmp_path / "plain.probs.npz", preds)
    with pytest.raises(files.UserError, match="not an out-of-fold file .no fold, meta, data, split"):
        files.load_oof(tmp_path / "plain.probs.npz")
    files.save_probs(tmp_path / "nolabel.probs.npz", files.Predictions("key", preds.ids, preds.ans, CLASSES, None,
                                                                       preds.prob))
    err = one_line_exit_2(capsys, calibrate_cli.main, str(tmp_path / "nolabel.probs.npz"), "--out",
                          str(tmp_path / "c.json"))
    assert "no labels" in err
    for args, message in [([str(tmp_path / "missing.npz")], "no such file"),
                          ([str(tmp_path / "plain.probs.npz"), "--step", "0"], "--step 0"),
                          ([str(tmp_path / "plain.probs.npz"), "--folds", "30"], "--folds 30")]:
        assert message in one_line_exit_2(capsys, calibrate_cli.main, *args, "--out", str(tmp_path / "c.json"))
    assert not (tmp_path / "c.json").exists()


def test_apply_offsets_renormalises():
    preds = biased_probs(n=200)
    off = np.array([0.0, 0.5, -0.2, 2.0])
    cal = apply_offsets(preds, off)
    s = np.log(preds.prob) + off
    np.testing.assert_array_equal(cal.ans, s.argmax(1))
    np.testing.assert_allclose(cal.prob, np.exp(s) / np.exp(s).sum(1, keepdims=True), rtol=1e-9)
    assert (cal.ans == 3).sum() > (preds.ans == 3).sum()


def write_calibration(path: Path, classes: list[str], offsets: list[float]) -> Path:
    path.write_text(json.dumps({"classes": classes, "offsets": offsets}))
    return path


def test_predict_with_calibration(trained_run, mask_shards, tmp_path, capsys):  # noqa: F811
    plain = run_predict("--run", str(trained_run), "--data", str(mask_shards), "--out", str(tmp_path / "p.csv"),
                        "--save-probs")
    base = files.load_probs(files.probs_path(plain))
    top = np.bincount(base.ans, minlength=L.NUM_CLASSES).argmax()
    offsets = np.zeros(L.NUM_CLASSES)
    offsets[top] = -0.5  # the class the random model answers most often gives way to others
    offsets[(top + 7) % L.NUM_CLASSES] = 0.3
    cal = write_calibration(tmp_path / "cal.json", L.class_names(), offsets.tolist())
    out = run_predict("--run", str(trained_run), "--data", str(mask_shards), "--out", str(tmp_path / "c.csv"),
                      "--save-probs", "--calibration", str(cal))
    assert "calibrated by" in capsys.readouterr().out
    got = files.load_probs(files.probs_path(out))
    assert got.ids == base.ids
    s = np.log(base.prob) + offsets
    np.testing.assert_array_equal(got.ans, s.argmax(1))
    assert (got.ans != base.ans).any()
    np.testing.assert_allclose(got.prob, np.exp(s) / np.exp(s).sum(1, keepdims=True), atol=1e-6)
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [int(r[1]) for r in rows] == got.ans.tolist()

    bad = write_calibration(tmp_path / "bad.json", CLASSES, [0.0] * 4)
    for cal_file, message in [(bad, "4 classes, model"), (tmp_path / "none.json", "cannot read")]:
        err = one_line_exit_2(capsys, lambda a: run_predict(*a), "--run", str(trained_run), "--data",
                              str(mask_shards), "--out", str(tmp_path / "x.csv"), "--calibration", str(cal_file))
        assert message in err
    renamed = write_calibration(tmp_path / "renamed.json", ["x"] + L.class_names()[1:], [0.0] * 18)
    err = one_line_exit_2(capsys, lambda a: run_predict(*a), "--run", str(trained_run), "--data", str(mask_shards),
                          "--out", str(tmp_path / "x.csv"), "--calibration", str(renamed))
    assert "class 0 is 'x'" in err
    assert not (tmp_path / "x.csv").exists()


def test_ensemble_with_calibration(tmp_path, capsys):
    preds = biased_probs(n=300)
    for name in ("a", "b"):
        files.save_probs(tmp_path / f"{name}.probs.npz", preds)
    off = [0.0, 0.0, 0.0, 2.0]
    cal = write_calibration(tmp_path / "cal.json", CLASSES, off)
    ensemble.main(["--out", str(tmp_path / "e.csv"), "--save-probs", "--calibration", str(cal),
                   str(tmp_path / "a.probs.npz"), str(tmp_path / "b.probs.npz")])
    got = files.load_probs(tmp_path / "e.probs.npz")
    np.testing.assert_array_equal(got.ans, apply_offsets(preds, np.array(off)).ans)
    assert f"soft vote over 2 files, calibrated by {cal}" in capsys.readouterr().out  # the line says so
    files.write_csv(tmp_path / "a.csv", preds)
    err = one_line_exit_2(capsys, ensemble.main, "--out", str(tmp_path / "h.csv"), "--calibration", str(cal),
                          str(tmp_path / "a.csv"), str(tmp_path / "a.csv"))
    assert "--calibration needs probability files" in err
