"""evaluate: its files, metrics equal to scikit-learn's on the same predictions, the pictures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from dist_train import evaluate
from dist_train.shardset.format import load_info
from dist_train.tasks.mask import labels as L
from dist_train.report import contact_sheet
from test_predict import eval_shards, read_rows, run_predict, three_class_run, trained_run  # noqa: F401 (fixtures)


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side


def test_evaluate_files_and_metrics_equal_sklearn(trained_run, mask_shards, tmp_path):  # noqa: F811
    metrics = evaluate.main(["--run", str(trained_run), "--data", str(mask_shards), "--workers", "0"])
    out = trained_run / "eval-validation"
    for name in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "errors.csv", "report.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == metrics

    # The same model's predictions, from predict: ans and stored label per sample.
    _, rows = read_rows(run_predict("--run", str(trained_run), "--data", str(mask_shards),
                                    "--out", str(tmp_path / "p.csv"), "--split", "validation"))
    y_pred = np.array([int(r[1]) for r in rows])
    y_true = np.array([int(r[3]) for r in rows])
    assert metrics["num_samples"] == len(rows)
    assert metrics["acc"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    for i, task in enumerate(("mask_acc", "gender_acc", "age_acc")):
        part = lambda y: np.array([L.decode(int(c))[i] for c in y])  # noqa: E731
        assert metrics[task] == pytest.approx(skm.accuracy_score(part(y_true), part(y_pred)))

    labels = list(range(L.NUM_CLASSES))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    with (out / "per_class.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [row["name"] for row in table] == L.class_names()
    np.testing.assert_allclose([float(row["precision"]) for row in table], p, atol=1e-6)
    np.testing.assert_allclose([float(row["recall"]) for row in table], r, atol=1e-6)
    np.testing.assert_allclose([float(row["f1"]) for row in table], f, atol=1e-6)
    assert [int(row["support"]) for row in table] == s.tolist()

    _, cm_rows = read_rows(out / "confusion.csv")
    np.testing.assert_array_equal([[int(v) for v in row[1:]] for row in cm_rows],
                                  skm.confusion_matrix(y_true, y_pred, labels=labels))

    header, errors = read_rows(out / "errors.csv")
    assert errors  # a random model errs: the checks below are not vacuous
    assert header[:5] == ["key", "true", "true_name", "pred", "pred_name"]
    wrong = {r[0]: (int(r[3]), int(r[1])) for r in rows if r[1] != r[3]}
    assert {e[0]: (int(e[1]), int(e[3])) for e in errors} == wrong
    p_true = [float(e[5]) for e in errors]
    assert p_true == sorted(p_true)  # worst first
    assert_png(out / "report.png", 600)
    assert_png(out / "confusion.png")


def test_evaluate_refuses_unlabeled_split(trained_run, eval_shards, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(trained_run), "--data", str(eval_shards), "--split", "test", "--workers", "0",
                       "--out", str(tmp_path / "ev")])
    assert e.value.code == 2
    assert "has no labels" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_a_set_numbering_its_classes_differently_is_refused(three_class_run, tmp_path, capsys):  # noqa: F811
    """A hold-out folder sharded with one class folder renamed (or one more and one less) has the
    model's class count but other indices: evaluated, every label would be silently shifted."""
    from dist_train import predict
    from dist_train.shardset.writer import write_shards

    for c, name in enumerate(["aaa", "class0", "class1"]):  # class0 is class 1 here, 0 in the model
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (80 * c, 10 * i, 0)).save(tmp_path / "src" / name / f"{i}.png")
    write_shards(tmp_path / "src", tmp_path / "set", layout="folder", as_split="holdout", workers=1, progress=False)
    for main, out in ((evaluate.main, ["--out", str(tmp_path / "ev")]), (predict.main, ["--out", str(tmp_path / "p.csv")])):
        with pytest.raises(SystemExit) as e:
            main(["--run", str(three_class_run), "--data", str(tmp_path / "set"), "--split", "holdout", "--workers", "0",
                  *out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "numbers its classes differently from the model: 'class0' is class 1 there and 0 in the model" in err
    assert not (tmp_path / "ev").exists() and not (tmp_path / "p.csv").exists()


def test_contact_sheets(mask_shards, eval_shards, tmp_path):  # noqa: F811
    labeled = contact_sheet(mask_shards, load_info(str(mask_shards)), tmp_path / "sheet.png", per_class=2)
    assert_png(labeled, 300)
    with Image.open(labeled) as im:
        tall = im.size[1]
    assert tall > 18 * 100  # one row per class
    unlabeled = contact_sheet(eval_shards, load_info(str(eval_shards)), tmp_path / "eval.png", per_class=3)
    assert_png(unlabeled)


def test_contact_sheet_of_many_classes_draws_a_spread_of_them(mask_shards, tmp_path, monkeypatch):  # noqa: F811
    """One row per class made 1,000 classes a 200,000-px-tall picture: past MAX_GRID_CLASSES the
    rows are that many classes spread evenly over the list, first and last included."""
    from dist_train import report

    info = load_info(str(mask_shards))
    assert report._grid_classes(info, True) == list(range(18))  # 18 <= 48: every class
    monkeypatch.setattr(report, "MAX_GRID_CLASSES", 6)
    assert report._grid_classes(info, True) == [0, 3, 7, 10, 14, 17]
    with Image.open(contact_sheet(mask_shards, info, tmp_path / "sheet.png", per_class=2)) as im:
        assert 6 * 150 < im.size[1] < 7 * 200 + 100


def test_each_tta_gets_its_own_folder(tmp_path, mask_shards):
    from test_cv_outputs import fake_cv

    run = fake_cv(tmp_path / "cv", mask_shards, ["none"]) / "fold-0"  # a random test_resnet run folder
    assert evaluate.eval_folder("validation", "none") == "eval-validation"
    assert evaluate.eval_folder("validation", "hflip, five-crop") == "eval-validation-tta-hflip+five-crop"
    assert evaluate.eval_folder("test", "scales:0.9/1.1") == "eval-test-tta-scales-0.9-1.1"
    plain = evaluate.main(["--run", str(run), "--data", str(mask_shards), "--workers", "0", "--worst", "0"])
    flipped = evaluate.main(["--run", str(run), "--data", str(mask_shards), "--workers", "0", "--worst", "0",
                             "--tta", "hflip"])
    assert json.loads((run / "eval-validation" / "metrics.json").read_text()) == plain  # not overwritten
    assert json.loads((run / "eval-validation-tta-hflip" / "metrics.json").read_text()) == flipped
    assert flipped["tta"] == "hflip" and plain["tta"] == "none"


def test_a_cv_folder_or_a_run_without_best_says_what_exists(tmp_path, capsys):
    cv = tmp_path / "cv"
    (cv / "fold-0").mkdir(parents=True)
    (cv / "fold-0" / "config.yaml").write_text("data: shards\n")
    empty = tmp_path / "run"
    (empty / "checkpoints" / "step-00000010").mkdir(parents=True)
    (empty / "checkpoints" / "step-00000010" / "model.safetensors").write_bytes(b"")
    (empty / "checkpoints" / "step-00000020").mkdir()  # no weights in it: not suggested
    for run, says in [(cv, f"--run {cv}: a cross-validation folder (fold-k/ runs), not one run: pass one fold's run "
                           f"(--run {cv}/fold-0), or score all folds with python -m dist_train.oof {cv}"),
                      (empty, f"pass --checkpoint {empty}/checkpoints/step-00000010 to use its newest checkpoint"),
                      (tmp_path / "cv" / "fold-0", "and it has no checkpoints/step-*/ either: train it first")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--run", str(run), "--data", str(tmp_path), "--workers", "0"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert "checkpoints/step-...\n" not in err


def test_picture_labels_keep_the_start_of_keys_and_confusion_says_what_it_is_of():
    from matplotlib.figure import Figure

    from dist_train.infer.metrics import cell_fontsize, draw_confusion
    from dist_train.report import key_label

    assert key_label("000123_female_Asian_45/incorrect_mask", 24) == "000123_female_Asian_45/\nincorrect_mask"
    assert key_label("short/key", 24) == "short/key"
    long = "a" * 30 + "/" + "b" * 40 + "/photo.jpg"
    first, second = key_label(long, 24).split("\n")
    assert first == "a" * 24 and second == "…" + long[-23:] and second.endswith("/photo.jpg")
    ax = Figure().add_subplot()
    draw_confusion(ax, np.eye(3, dtype=int) * 5, ["a", "b", "c"], title="validation, epoch 2, step 40")
    assert ax.get_title() == "confusion matrix: validation, epoch 2, step 40\n(15 samples, rows normalised)"
    assert cell_fontsize(3) == 12 and 9 <= cell_fontsize(18) <= 10 and cell_fontsize(30) == 6


def test_a_holdout_set_without_one_class_sharded_with_classes_from(three_class_run, folder_shards, tmp_path,  # noqa: F811
                                                                   capsys):
    """The model's classes are class0..2 (folder_shards'); the hold-out set has folders class0 and
    class2 only. Sharded with --classes-from the training set, its class2 images are class 2 (not
    1), so evaluate and predict --data take it; class1 has support 0 and stays out of macro F1
    unless predicted; --inspect --grid draw its empty row."""
    from dist_train import predict, shard

    for c, name in ((0, "class0"), (2, "class2")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (100 * c, 30 * i, 50)).save(tmp_path / "src" / name / f"{i}.png")
    data = tmp_path / "set"
    shard.main(["--src", str(tmp_path / "src"), "--out", str(data), "--classes-from", str(folder_shards),
                "--as-split", "holdout", "--workers", "1", "--quiet"])
    shard.main(["--inspect", str(data), "--grid", str(tmp_path / "grid.png")])
    assert_png(tmp_path / "grid.png", 200)
    capsys.readouterr()

    metrics = evaluate.main(["--run", str(three_class_run), "--data", str(data), "--split", "holdout",
                             "--workers", "0", "--out", str(tmp_path / "ev"), "--worst", "2"])
    out = capsys.readouterr().out
    p = predict.main(["--run", str(three_class_run), "--data", str(data), "--split", "holdout", "--workers", "0",
                      "--out", str(tmp_path / "p.csv")])
    header, rows = read_rows(p)
    assert header == ["key", "ans", "class", "label"]
    assert sorted((r[0], r[3]) for r in rows) == [("class0/0", "0"), ("class0/1", "0"), ("class2/0", "2"),
                                                  ("class2/1", "2")]
    y_true, y_pred = np.array([int(r[3]) for r in rows]), np.array([int(r[1]) for r in rows])
    assert metrics["num_samples"] == 4
    assert metrics["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    with (tmp_path / "ev" / "per_class.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["name"], int(r["support"])) for r in table] == [("class0", 2), ("class1", 0), ("class2", 2)]
    line = next(x for x in out.splitlines() if x.startswith("class1 "))
    n1 = int((y_pred == 1).sum())
    assert line.endswith(f"not in this split: predicted {n1} time{'s' * (n1 != 1)}, F1 0 in macro F1" if n1
                         else "not in this split: left out of macro F1"), line


def test_per_class_table_says_which_classes_the_split_lacks():
    from dist_train.infer.metrics import summarize

    stats = summarize([0, 1, 0, 0], [0, 0, 0, 3], 4, ["a", "b", "c", "d"])  # b, c: no sample; b predicted once
    lines = {x.split()[0]: x for x in evaluate.per_class_table(stats).splitlines()}
    assert lines["b"].endswith("not in this split: predicted 1 time, F1 0 in macro F1")
    assert lines["c"].endswith("not in this split: left out of macro F1")
    assert "not in this split" not in lines["a"] + lines["d"]
    assert stats["macro_f1"] == pytest.approx(skm.f1_score([0, 0, 0, 3], [0, 1, 0, 0], average="macro", zero_division=0))


def test_many_classes_print_the_lowest_f1_and_a_count_summary():
    """Past 60 classes the printed table is the 20 lowest-F1 classes (per_class.csv holds all) and
    the shard summary gives min/median/max per split and the 10 smallest classes, not 1,000 lines."""
    from dist_train.infer.metrics import summarize
    from dist_train.shardset.format import summary

    k = 61
    names = [f"c{i:02d}" for i in range(k)]
    y_true = list(range(k)) * 2
    y_pred = [(t + 1) % k if t % 3 == 0 else t for t in y_true]  # every third class always wrong
    lines = evaluate.per_class_table(summarize(y_pred, y_true, k, names)).splitlines()
    assert "(20 of 61 classes: the lowest F1; all in per_class.csv)" in lines[0]
    assert [x.split()[0] for x in lines[1:21]] == [f"c{i:02d}" for i in range(0, 60, 3)]  # F1 0 first
    assert lines[21].startswith("accuracy")
    info = {"layout": "folder", "classes": names, "splits": {"train": {"num_samples": 10, "filenames": ["a.tar"]}},
            "label_counts": {"train": {str(i): 3 + i for i in range(k)}}}
    text = summary("s", info)
    assert "61 classes" in text and "train: min 3, median 33, max 63" in text and "fewest in train: c00 3, c01 4," in text
    assert len(text.splitlines()) < 12
