"""Label-noise suspects: planted label errors rank at the top; the mask task's per-person table
(a flipped gender, a wrong age, a swapped incorrect_mask/normal pair) feeds back through
--relabel to the true labels; the grid is drawn from the shards; bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_train import suspects as suspects_cli
from dist_train.infer import files
from dist_train.infer.suspects import confident_issues, find_suspects, judge_models, write_table
from dist_train.shardset.format import iter_samples, load_info
from dist_train.tasks import CLASSIFY
from dist_train.tasks.mask import TASK as MASK_TASK
from dist_train.tasks.mask import labels as L


def model_probs(true: np.ndarray, k: int, margin: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities of a model that learned the true labels: noisy logits, `margin` on the true class."""
    logits = rng.normal(size=(len(true), k)) + margin * np.eye(k)[true]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def oof_of(prob: np.ndarray, given: np.ndarray, classes: list[str], metas: list[dict], keys: list[str] | None = None,
           data: str = "/nowhere", split: str = "train") -> files.OutOfFold:
    keys = keys or [f"s{i:05d}" for i in range(len(given))]
    preds = files.Predictions("key", keys, prob.argmax(1), classes, given, prob)
    return files.OutOfFold(preds, np.arange(len(given)) % 5, metas, data, split)


def test_flipped_labels_rank_at_the_top():
    rng = np.random.default_rng(0)
    n, k, n_flip = 1000, 5, 50
    true = rng.integers(0, k, n)
    prob = model_probs(true, k, margin=3.0, rng=rng)  # the model itself is wrong on some samples too
    given = true.copy()
    flipped = rng.choice(n, n_flip, replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, k, n_flip)) % k
    s = find_suspects(oof_of(prob, given, list("abcde"), [{}] * n), CLASSIFY)
    assert s.tables == []  # plain classification: per sample only
    top = set(s.order[:n_flip].tolist())
    assert len(top & set(flipped.tolist())) >= 0.9 * n_flip
    # confident learning is the cautious count: most planted errors, few clean samples
    assert s.issue[flipped].mean() >= 0.6
    assert s.issue[flipped].sum() >= 0.9 * s.issue.sum()
    assert np.all(np.diff(s.score[s.order]) <= 0)


def test_confident_learning_thresholds():
    prob = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    issue, t = confident_issues(prob, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(t, [0.8, 0.6])
    # sample 3 (labeled 1): p0 = 0.6 < t0 = 0.8, p1 = 0.4 < t1: in no class, not an issue
    assert issue.tolist() == [False, False, False, False]
    issue, _ = confident_issues(np.array([[0.9, 0.1], [0.95, 0.05], [0.1, 0.9]]), np.array([0, 1, 1]))
    assert issue.tolist() == [False, True, False]


STEMS = [("mask1", 0), ("mask2", 0), ("mask3", 0), ("mask4", 0), ("mask5", 0), ("incorrect_mask", 1), ("normal", 2)]


def mask_persons(n_persons: int, seed: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(stored metas, true class, stored class) of n persons x 7 photos, with planted errors in
    persons 000 (gender flipped), 001 (incorrect_mask/normal swapped), 002 (age 65 stored as 25)."""
    rng = np.random.default_rng(seed)
    metas, true, given = [], [], []
    for p in range(n_persons):
        gender, age = int(rng.integers(0, 2)), int(rng.integers(18, 80))
        if p == 2:
            age = 65
        for stem, mask in STEMS:
            true.append(L.encode(mask, gender, L.age_group(age)))
            stored = {"person_id": f"{p:03d}", "gender": gender, "age": age, "mask": mask, "race": "Asian",
                      "path": f"{p:03d}/{stem}.jpg"}
            if p == 0:
                stored["gender"] = 1 - gender
            if p == 1 and mask in (1, 2):
                stored["mask"] = 3 - mask
            if p == 2:
                stored["age"] = 25
            metas.append(stored)
            given.append(L.label_from_meta(stored))
    return metas, np.array(true), np.array(given)


def relabel_rows(table) -> list[dict]:
    return [dict(zip(table.header, map(str, row))) for row in table.rows]


def test_mask_hook_suggests_the_right_corrections(tmp_path):
    metas, true, given = mask_persons(40, seed=1)
    prob = model_probs(true, L.NUM_CLASSES, margin=6.0, rng=np.random.default_rng(2))
    s = find_suspects(oof_of(prob, given, L.class_names(), metas), MASK_TASK)
    (table,) = s.tables
    assert table.name == "relabel" and table.header[:4] == ["id", "gender", "age", "swap_mask"]
    rows = {r["id"]: r for r in relabel_rows(table)}
    assert set(rows) == {"000", "001", "002"}, table.rows  # the planted persons, nobody else
    assert (rows["000"]["gender"], rows["000"]["age"], rows["000"]["swap_mask"]) == \
        (L.GENDER_NAMES[1 - metas[0]["gender"]], "", "")
    assert (rows["001"]["gender"], rows["001"]["age"], rows["001"]["swap_mask"]) == ("", "", "1")
    old = sorted(m["age"] for m in metas[21:] if m["age"] >= 60)[0]  # the nearest age labeled >= 60
    assert (rows["002"]["gender"], rows["002"]["age"], rows["002"]["swap_mask"]) == ("", str(old), "")
    assert all(float(r["score"]) > 0.5 and int(r["photos"]) == 7 for r in rows.values())

    # The file feeds straight back into training: --relabel gives the true labels.
    write_table(tmp_path / "relabel.csv", table.header, table.rows)
    fixes = L.load_relabel(str(tmp_path / "relabel.csv"))
    fixed = np.array([L.target_from_meta(m, None, fixes=fixes) for m in metas])
    np.testing.assert_array_equal(fixed, true)

    # every sample whose given label is wrong is among the most suspect
    planted = set(np.flatnonzero(given != true).tolist())
    assert len(planted) == 7 + 2 + 7 and set(s.order[:len(planted)].tolist()) == planted


@pytest.fixture(scope="module")
def planted_oof(mask_shards, tmp_path_factory) -> tuple[Path, str, set[str]]:
    """An OOF file over the synthetic train shards: a model that learned the stored labels, with
    one person's gender flipped in the given labels and metadata, and 3 more single-photo flips."""
    info = load_info(str(mask_shards))
    keys, metas, true = [], [], []
    for smp in iter_samples(str(mask_shards), info, "train"):
        keys.append(smp["__key__"])
        metas.append(json.loads(smp["json"]))
        true.append(int(smp["cls"]))
    true = np.array(true)
    given = true.copy()
    person = metas[0]["person_id"]
    planted = set()
    for i, m in enumerate(metas):
        if m["person_id"] == person:
            m["gender"] = 1 - m["gender"]
            given[i] = L.label_from_meta(m)
            planted.add(keys[i])
    others = [i for i, m in enumerate(metas) if m["person_id"] != person][::40][:3]
    for i in others:
        given[i] = (true[i] + 6) % L.NUM_CLASSES  # another mask status
        planted.add(keys[i])
    prob = model_probs(true, L.NUM_CLASSES, margin=5.0, rng=np.random.default_rng(0))
    preds = files.Predictions("key", keys, prob.argmax(1), L.class_names(), given, prob)
    cv = tmp_path_factory.mktemp("cv")
    files.save_oof(cv / "oof.probs.npz", preds, np.arange(len(keys)) % 5, metas, str(mask_shards), "train")
    return cv, person, planted


def test_cli_writes_ranked_csv_relabel_file_and_grid(planted_oof, capsys):
    cv, person, planted = planted_oof
    s = suspects_cli.main([str(cv), "--top", "20", "--grid", str(cv / "suspects.png")])
    printed = capsys.readouterr().out
    assert "flagged by confident learning" in printed and "suspects.relabel.csv" in printed
    with (cv / "suspects.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and list(rows[0]) == ["rank", "key", "fold", "label", "label_name", "pred", "pred_name",
                                                  "p_label", "p_pred", "score", "issue"]
    assert {r["key"] for r in rows[:len(planted)]} == planted
    flagged = {r["key"] for r in rows if r["issue"] == "1"}
    assert flagged <= planted and len(flagged) == s.issue.sum() >= 3  # cautious (4 of 10 here), never wrong here
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    fixes = L.load_relabel(str(cv / "suspects.relabel.csv"))
    assert list(fixes) == [person] and set(fixes[person]) == {"gender"}

    png = cv / "suspects.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with Image.open(png) as img:
        w, h = img.size
    assert w >= 1000 and 500 <= h <= 2000, img.size
    assert "20 images found" in printed


def test_bad_input_is_one_line_exit_2(planted_oof, tmp_path, capsys):
    cv, _, _ = planted_oof
    preds = files.load_probs(cv / "oof.probs.npz")
    files.save_probs(tmp_path / "plain.probs.npz", preds)
    cases = [([str(tmp_path)], "no such file"),
             ([str(tmp_path / "plain.probs.npz")], "not an out-of-fold file"),
             ([str(cv), "--top", "-1"], "--top -1"),
             ([str(cv), "--data", str(tmp_path / "moved")], "no such folder"),
             ([str(cv), "--out", str(tmp_path)], "is a folder")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            suspects_cli.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "suspects.csv").exists()


def weak_oof(tmp_path: Path, mask_shards: Path) -> Path:
    """An OOF file of models that learned nothing (accuracy about chance) over 40 persons."""
    metas, _, given = mask_persons(40, seed=3)
    prob = model_probs(np.zeros_like(given), L.NUM_CLASSES, margin=0.0, rng=np.random.default_rng(4))
    keys = [f"s{i:05d}" for i in range(len(given))]
    preds = files.Predictions("key", keys, prob.argmax(1), L.class_names(), given, prob)
    files.save_oof(tmp_path / "oof.probs.npz", preds, np.arange(len(keys)) % 5, metas, str(mask_shards), "train")
    return tmp_path / "oof.probs.npz"


def test_judge_models_against_the_majority_class():
    classes = ["a", "b", "c"]
    given = np.array([0] * 6 + [1] * 2 + [2] * 2)
    q = judge_models(files.Predictions("key", list("0123456789"), given, classes, given, np.eye(3)[np.zeros(10, int)]))
    assert (q.accuracy, q.majority, q.majority_class) == (0.6, 0.6, "a") and not q.ok  # always 'a': no better
    assert q.needed == pytest.approx(0.7)
    right = np.eye(3)[given]
    right[:3] = np.eye(3)[1]  # 7 of 10 right: 0.1 above the majority rate
    assert judge_models(files.Predictions("key", list("0123456789"), given, classes, given, right)).ok


def test_weak_models_are_refused_and_forced_runs_are_capped(tmp_path, mask_shards, capsys):
    oof = weak_oof(tmp_path, mask_shards)
    with pytest.raises(SystemExit) as e:
        suspects_cli.main([str(oof)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "too weak to judge labels: OOF accuracy" in err and "--force" in err
    assert "\n" not in err and not (tmp_path / "suspects.csv").exists()

    s = suspects_cli.main([str(oof), "--force", "--top", "0"])
    out, err = capsys.readouterr()
    assert err.startswith("WARNING: ") and "too weak" in err
    n = len(s.score)
    assert s.flagged > 0.3 * n and s.issue.sum() == np.ceil(0.1 * n)  # capped to 10% of the samples
    assert set(np.flatnonzero(s.issue)) == set(s.order[s.issue[s.order]][:28])  # the most suspect flagged ones
    (table,) = s.tables
    assert len(table.rows) <= 4 and "capped to the 4 most suspect (0.1 of 40" in table.summary  # 10% of persons
    assert "before the cap" in out
    with (tmp_path / "suspects.csv").open() as f:
        assert sum(r["issue"] == "1" for r in csv.DictReader(f)) == 28
    rows = list(csv.DictReader((tmp_path / "suspects.relabel.csv").open()))
    assert len(rows) == len(table.rows)


def test_relabel_summary_counts_changes_per_task_and_warns_on_lost_classes():
    metas, _, given = mask_persons(40, seed=1)
    fixes = {"000": {"gender": 1 - metas[0]["gender"]}, "001": {"swap_mask": True}, "999": {"age": 20}}
    line = L.relabel_summary("f.csv", metas, fixes, L.DEFAULT_AGE_BINS)
    assert line == ("--relabel f.csv: 9 of 280 training labels changed (mask 2, gender 7, age 0); 2 of the file's "
                    f"3 persons are in this split; classes present {len(set(given.tolist()))} -> "
                    f"{len(set(given.tolist()))}")
    collapse = {m["person_id"]: {"gender": 0, "age": 20} for m in metas}
    line = L.relabel_summary("bad.csv", metas, collapse, L.DEFAULT_AGE_BINS)
    assert "classes present 18 -> 3" in line.splitlines()[0]
    assert line.splitlines()[1].startswith("WARNING: after --relabel no training sample has class ")


def test_training_says_what_relabel_changed(mask_shards, tmp_path):
    from types import SimpleNamespace

    info = load_info(str(mask_shards))
    person = json.loads(next(iter_samples(str(mask_shards), info, "train"))["json"])["person_id"]
    (tmp_path / "fix.csv").write_text(f"id,gender,age,swap_mask\n{person},,,1\n")
    cfg = SimpleNamespace(relabel=str(tmp_path / "fix.csv"), age_bins="30,60")
    line = MASK_TASK.describe_targets(cfg, str(mask_shards), info, "train")
    n = info["splits"]["train"]["num_samples"]
    assert line == (f"--relabel {tmp_path / 'fix.csv'}: 2 of {n} training labels changed (mask 2, gender 0, age 0); "
                    "1 of the file's 1 persons are in this split; classes present 18 -> 18"), line
    assert MASK_TASK.describe_targets(SimpleNamespace(relabel=None, age_bins="30,60"), str(mask_shards), info,
                                      "train") is None
    # training prints it at the start
    from conftest import run_main

    proc = run_main(["--data", str(mask_shards), "--output", str(tmp_path / "run"), "--relabel", cfg.relabel,
                     "--model", "test_resnet", "--img-size", "32", "--batch-size", "16", "--workers", "0",
                     "--max-steps", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert line in proc.stdout
