"""A cross-validation folder's outputs, on fold runs made by hand (random models, no training):
oof prints each fold's scores and uses the folds' own --val-tta unless told; predict --images
averages the fold models as predict --data does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dist_train import oof, predict
from dist_train.infer import files
from dist_train.infer.cv import FoldRun, fold_runs
from dist_train.infer.tta import parse_tta
from dist_train.model.build import data_config
from dist_train.model.export import save_for_timm
from dist_train.tasks import build_model
from dist_train.tasks.mask import labels as L
from test_launch import project  # noqa: F401 (fixture: a scratch project root whose venv is installed)


def fake_cv(root: Path, shards: Path, val_tta: list[str]) -> Path:
    """CV/fold-k/ for each fold of `shards`: config.yaml, a finished summary.json, a random best/."""
    for k, tta in enumerate(val_tta):
        run = root / f"fold-{k}"
        torch.manual_seed(k)
        m = build_model("test_resnet", L.NUM_CLASSES, img_size=32)
        d = data_config(m)
        save_for_timm(m, run / "best", model_name="test_resnet", num_classes=L.NUM_CLASSES,
                      label_names=L.class_names(), img_size=32, crop_pct=1.0, mean=d["mean"], std=d["std"])
        (run / "config.yaml").write_text(yaml.safe_dump({"data": str(shards), "fold": str(k), "val_tta": tta,
                                                         "model": "test_resnet", "img_size": 32}))
        (run / "summary.json").write_text(json.dumps({"finished": True}))
    return root


@pytest.fixture(scope="module")
def hflip_cv(fold_shards, tmp_path_factory) -> Path:
    return fake_cv(tmp_path_factory.mktemp("cv") / "cv", fold_shards, ["hflip"] * 3)


def test_oof_prints_each_fold_and_uses_the_folds_tta(hflip_cv, tmp_path, capsys, monkeypatch):
    s = oof.main([str(hflip_cv), "--workers", "0"])
    out = capsys.readouterr().out
    assert s["tta"] == "hflip (the folds' --val-tta)" and "TTA hflip (the folds' --val-tta)" in out
    for f in s["per_fold"]:
        assert f"  fold {f['fold']}: {f['num_samples']} samples, accuracy {f['acc']:.4f}, macro F1 " \
               f"{f['macro_f1']:.4f}" in out
    assert f"  OOF (210 samples): accuracy {s['acc']:.4f}" in out and "over the folds: accuracy" in out
    assert json.loads((hflip_cv / "oof.json").read_text())["tta"] == s["tta"]

    # what each fold model is run with: its own --val-tta, or --tta when given
    seen = []
    monkeypatch.setattr(oof, "run_inference", lambda *a, tta, **kw: seen.append(tta))
    run = fold_runs(hflip_cv)[0]
    for given in (None, "none", "five-crop"):
        oof._fold_result(run, SimpleNamespace(tta=given, batch_size=8, workers=0, mixed_precision=None))
    assert seen == [parse_tta("hflip"), parse_tta("none"), parse_tta("five-crop")]


def test_oof_names_each_folds_tta_when_they_differ(tmp_path):
    runs = [FoldRun(k, tmp_path / f"fold-{k}", {"data": "x", "val_tta": t}, "x") for k, t in enumerate(["none", "hflip"])]
    assert oof._tta_note(runs, None) == "fold 0: none, fold 1: hflip (each fold's --val-tta)"
    assert oof._tta_note(runs, "five-crop") == "five-crop (--tta)"
    assert oof.fold_tta(FoldRun(0, tmp_path, {"data": "x"}, "x"), None) == "none"  # a config from before val_tta


def test_predict_images_with_a_cv_folder_averages_the_folds(hflip_cv, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    probs = []
    for k in range(3):
        out = predict.main(["--run", str(hflip_cv / f"fold-{k}"), "--images", str(tmp_path), "--out",
                            str(tmp_path / f"f{k}.csv"), "--save-probs", "--workers", "0"])
        probs.append(files.load_probs(files.probs_path(out)).prob)
    out = predict.main(["--run", str(hflip_cv), "--images", str(tmp_path), "--out", str(tmp_path / "cv.csv"),
                        "--save-probs", "--workers", "0"])
    p = files.load_probs(files.probs_path(out))
    assert p.ids == [str(tmp_path / f"{i}.png") for i in range(3)] and p.id_column == "path"
    np.testing.assert_allclose(p.prob, np.mean(probs, axis=0), atol=1e-6)


def test_evaluate_a_fold_run_scores_its_held_out_fold(hflip_cv, fold_shards, tmp_path):
    """`evaluate --run CV/fold-k --data SHARDS` (what the CV refusal tells a user to run) scores the
    fold that model never trained on, as oof does, into RUN/eval-fold-k/; the set has no
    validation split, so the old default refused it."""
    from dist_train import evaluate

    s = oof.main([str(hflip_cv), "--workers", "0", "--tta", "none"])
    run = hflip_cv / "fold-1"
    m = evaluate.main(["--run", str(run), "--data", str(fold_shards), "--workers", "0"])
    fold1 = s["per_fold"][1]
    assert m["split"] == "train[fold=1]" and m["num_samples"] == fold1["num_samples"]
    assert m["macro_f1"] == pytest.approx(fold1["macro_f1"]) and m["acc"] == pytest.approx(fold1["acc"])
    assert json.loads((run / "eval-fold-1" / "metrics.json").read_text())["num_samples"] == fold1["num_samples"]
    m = evaluate.main(["--run", str(run), "--data", str(fold_shards), "--workers", "0", "--tta", "hflip"])
    assert (run / "eval-fold-1-tta-hflip" / "metrics.json").is_file() and m["tta"] == "hflip"
    import shutil

    as_int = tmp_path / "fold-0"  # a config.yaml whose YAML says fold: 0, not '0'
    shutil.copytree(hflip_cv / "fold-0", as_int)
    cfg = yaml.safe_load((as_int / "config.yaml").read_text())
    (as_int / "config.yaml").write_text(yaml.safe_dump({**cfg, "fold": 0}))
    assert evaluate.main(["--run", str(as_int), "--data", str(fold_shards), "--workers", "0"])["split"] == "train[fold=0]"
    # an explicit --split is taken as given: the whole training split, folds the model trained on included
    m = evaluate.main(["--run", str(run), "--data", str(fold_shards), "--workers", "0", "--split", "train"])
    assert m["split"] == "train" and m["num_samples"] == s["num_samples"]


def test_evaluate_a_run_on_a_set_of_folds_without_validation_says_what_to_pass(hflip_cv, fold_shards, tmp_path,
                                                                              capsys):
    """A run that did not train with --fold k on this set (here: its config.yaml names another path)
    has no default split there: one line naming the folds and --split."""
    import shutil

    from dist_train import evaluate

    run = tmp_path / "run"
    shutil.copytree(hflip_cv / "fold-0", run)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": str(tmp_path / "elsewhere"), "fold": "0"}))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(run), "--data", str(fold_shards), "--workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{fold_shards} has no 'validation' split, only train (train has 3 folds: a run trained with " \
           "--fold k on this set" in err and "pass --split NAME" in err
    assert not (run / "eval-validation").exists()


def test_a_missing_fold_is_told_the_settings_of_the_others(hflip_cv, tmp_path, capsys):
    """The command oof gives for a missing fold trains it as fold 0 was trained (its config.yaml:
    model, size, recipe), not with run.py's defaults beside folds of another model."""
    import shutil

    cv = tmp_path / "cv"
    shutil.copytree(hflip_cv, cv)
    shutil.rmtree(cv / "fold-2")
    with pytest.raises(SystemExit) as e:
        oof.main([str(cv), "--workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"{cv}: fold 2 of 3 is missing (train it with fold 0's settings: dist_train/run.py --config "
            f"{cv}/fold-0/config.yaml --fold 2 --output {cv}/fold-2)") in err
    (cv / "fold-1" / "summary.json").write_text(json.dumps({"finished": False}))
    shutil.copytree(cv / "fold-0", cv / "fold-2")
    (cv / "fold-2" / "config.yaml").write_text((cv / "fold-0" / "config.yaml").read_text().replace("'0'", "'2'"))
    with pytest.raises(SystemExit):
        oof.main([str(cv), "--workers", "0"])
    err = capsys.readouterr().err
    assert f"continue it with dist_train/run.py --config {cv}/fold-1/config.yaml --output {cv}/fold-1 --resume auto" in err


def test_kfold_sh_scores_the_oof_on_the_address_it_was_given(hflip_cv, fold_shards, project, tmp_path):  # noqa: F811
    """launch/kfold.sh's last step, `oof CV`, read the shard set back from fold-0/config.yaml, where a
    `pipe:` address is refused (a command read from a file never runs): after every fold trained,
    the OOF step failed. The address typed to kfold.sh is passed on with --data."""
    import shutil
    import subprocess

    from conftest import ROOT
    from test_launch import ENV

    if not (ROOT / ".venv" / "bin" / "python").exists():  # setup.sh would build and install one (minutes, GBs)
        pytest.skip("needs the project's .venv (launch/setup.sh), as the launch scripts run in it")
    cv = tmp_path / "cv"
    shutil.copytree(hflip_cv, cv)  # every fold finished: kfold.sh goes straight to the OOF step
    address = f"pipe:cat {fold_shards}/{{}}"
    for k in range(3):
        cfg = yaml.safe_load((cv / f"fold-{k}" / "config.yaml").read_text())
        (cv / f"fold-{k}" / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": address}))
    proc = subprocess.run(["bash", "launch/kfold.sh", "launch/cpu_ddp.yaml", "--data", address, "--output", str(cv),
                           "--workers", "0"], cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("already finished") == 3 and "OOF (210 samples)" in proc.stdout
    assert json.loads((cv / "oof.json").read_text())["data"] == address


def test_predict_on_a_labeled_split_prints_macro_f1(hflip_cv, fold_shards, tmp_path, capsys):
    """The competition's score beside the accuracy, as evaluate computes it (after --calibration)."""
    from dist_train import evaluate

    out = predict.main(["--run", str(hflip_cv / "fold-0"), "--data", str(fold_shards), "--split", "train", "--out",
                        str(tmp_path / "p.csv"), "--workers", "0"])
    line = capsys.readouterr().out
    m = evaluate.main(["--run", str(hflip_cv / "fold-0"), "--data", str(fold_shards), "--split", "train", "--workers",
                       "0", "--out", str(tmp_path / "e")])
    assert out.is_file() and f", accuracy {m['acc']:.4f}, macro F1 {m['macro_f1']:.4f}" in line, line
