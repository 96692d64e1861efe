"""Ensembles: identical inputs give the input back (soft and hard), votes by hand, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_train import ensemble
from dist_train.infer import files as predict  # the prediction files
from test_predict import eval_shards, read_rows, run_predict, trained_run  # noqa: F401 (fixtures)


def ens(*args: str) -> Path:
    return ensemble.main(list(args))


@pytest.mark.parametrize("fmt", ["mask-eval", "keys"])
def test_identical_inputs_give_the_input_back(fmt, trained_run, eval_shards, mask_shards, tmp_path):  # noqa: F811
    data = eval_shards if fmt == "mask-eval" else mask_shards
    one = run_predict("--run", str(trained_run), "--data", str(data), "--out", str(tmp_path / "one.csv"), "--save-probs")
    probs = predict.probs_path(one)
    soft = ens("--out", str(tmp_path / "soft.csv"), "--save-probs", str(probs), str(probs), str(probs))
    hard = ens("--out", str(tmp_path / "hard.csv"), str(one), str(one))
    assert soft.read_text() == one.read_text()
    assert hard.read_text() == one.read_text()
    a, b = predict.load_probs(probs), predict.load_probs(predict.probs_path(soft))
    assert a.ids == b.ids and a.classes == b.classes
    np.testing.assert_allclose(a.prob, b.prob, atol=1e-6)


def write_probs(path: Path, ids: list[str], prob: list[list[float]]) -> Path:
    p = np.asarray(prob)
    predict.save_probs(path, predict.Predictions("key", ids, p.argmax(1), ["a", "b", "c"], None, p))
    return path


def test_soft_vote_averages_probabilities(tmp_path):
    ids = ["x", "y"]
    a = write_probs(tmp_path / "a.probs.npz", ids, [[0.6, 0.4, 0.0], [0.1, 0.1, 0.8]])
    b = write_probs(tmp_path / "b.probs.npz", ids, [[0.0, 0.45, 0.55], [0.2, 0.1, 0.7]])
    out = ens("--out", str(tmp_path / "s.csv"), str(a), str(b))
    # Row x: mean (0.3, 0.425, 0.275) -> b, an answer neither model gave alone.
    assert read_rows(out) == (["key", "ans", "class"], [["x", "1", "b"], ["y", "2", "c"]])


def write_csv(path: Path, answers: list[int]) -> Path:
    path.write_text("ImageID,ans\n" + "".join(f"img{i}.jpg,{a}\n" for i, a in enumerate(answers)))
    return path


def test_hard_vote_majority_and_ties(tmp_path):
    a = write_csv(tmp_path / "a.csv", [1, 1, 5, 7])
    b = write_csv(tmp_path / "b.csv", [2, 3, 5, 8])
    c = write_csv(tmp_path / "c.csv", [2, 4, 6, 8])
    out = ens("--out", str(tmp_path / "h.csv"), str(a), str(b), str(c))
    # row 0: 2 wins 2:1; row 1: 1-3-4 all tie -> first file; row 2: 5; row 3: 8 wins 2:1
    assert [r[1] for r in read_rows(out)[1]] == ["2", "1", "5", "8"]
    two = ens("--out", str(tmp_path / "h2.csv"), str(b), str(a))
    assert [r[1] for r in read_rows(two)[1]] == ["2", "3", "5", "8"]  # two files disagree -> first wins


def test_mismatched_inputs_are_refused(tmp_path, capsys):
    a = write_csv(tmp_path / "a.csv", [1, 2, 3])
    short = write_csv(tmp_path / "short.csv", [1, 2])
    other = tmp_path / "other.csv"
    other.write_text("ImageID,ans\nimg0.jpg,1\nimgX.jpg,2\nimg2.jpg,3\n")
    p1 = write_probs(tmp_path / "p1.probs.npz", ["x", "y"], [[1, 0, 0], [0, 1, 0]])
    p2 = write_probs(tmp_path / "p2.probs.npz", ["y", "x"], [[1, 0, 0], [0, 1, 0]])
    cases = [
        ([a, short], "2 ids"),
        ([a, other], "row 2"),
        ([p1, p2], "same ids in the same order"),
        ([a, p1], "mix of probability files and CSVs"),
        ([a, tmp_path / "missing.csv"], "no such file"),
    ]
    for inputs, message in cases:
        with pytest.raises(SystemExit) as e:
            ens("--out", str(tmp_path / "out.csv"), *map(str, inputs))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out.csv").exists()


def write_oof(path: Path, label: list[int], seed: int) -> Path:
    """An OOF file of 6 samples (2 persons' worth per fold), 3 classes."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(3), size=len(label))
    ids = [f"p{i // 2}/m{i % 2}" for i in range(len(label))]
    predict.save_oof(path, predict.Predictions("key", ids, p.argmax(1), ["a", "b", "c"], np.array(label), p),
                     np.arange(len(label)) // 2 % 3, [{"person_id": f"p{i // 2}"} for i in range(len(label))],
                     "shards/x", "train")
    return path


def test_an_ensemble_of_oof_files_keeps_their_folds_and_refuses_other_labels(tmp_path, capsys):
    """Soft-voting two CVs' OOF files (to calibrate the ensemble) keeps the fold array, so calibrate
    cross-fits over the persons' folds, not over sample-level splits that put a person's photos on
    both sides; inputs whose labels differ (one CV trained with --age-bins or --relabel) are refused
    instead of taking the first file's labels."""
    from dist_train import calibrate

    label = [0, 0, 1, 1, 2, 2]
    a, b = write_oof(tmp_path / "a.probs.npz", label, 0), write_oof(tmp_path / "b.probs.npz", label, 1)
    out = ens("--out", str(tmp_path / "ab.csv"), "--save-probs", str(a), str(b))
    oof = predict.load_oof(predict.probs_path(out))
    np.testing.assert_array_equal(oof.fold, predict.load_oof(a).fold)
    assert oof.data == "shards/x" and oof.split == "train" and oof.meta[0] == {"person_id": "p0"}
    np.testing.assert_array_equal(oof.preds.label, label)
    r = calibrate.main([str(predict.probs_path(out)), "--out", str(tmp_path / "cal.json")])
    assert r["cross_fitted"]["folds_from"] == "the file's fold array"

    other = write_oof(tmp_path / "c.probs.npz", [0, 0, 1, 2, 2, 2], 2)
    with pytest.raises(SystemExit) as e:
        ens("--out", str(tmp_path / "ac.csv"), str(a), str(other))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{other}: row 4 ('p1/m1') is labeled 2, {a} has 1: ensemble inputs must carry the same labels" in err
    assert not (tmp_path / "ac.csv").exists()
