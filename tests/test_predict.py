"""Prediction files: one row per sample in source order for 1 and 2 processes (with and without
TTA), the mask-eval submission format, TTA views, checkpoints, and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

from conftest import launch
from dist_train import predict
from dist_train.infer import files
from dist_train.model.build import data_config
from dist_train.model.export import save_for_timm
from dist_train.shardset.format import iter_samples, load_info
from dist_train.shardset.writer import write_shards
from dist_train.tasks import build_model as create_model
from dist_train.tasks.mask import labels as L

HISTORY = [
    {"epoch": 0, "step": 5, "train_loss": 2.9, "val_loss": 2.8, "val_acc": 0.1, "val_macro_f1": 0.05},
    {"epoch": 1, "step": 10, "train_loss": 2.5, "val_loss": 2.6, "val_acc": 0.2, "val_macro_f1": 0.12},
]


def save_random_model(best: Path, seed: int = 0) -> torch.nn.Module:
    """A trained-looking `best/`: random-init resnet18, 18 classes, 32 px."""
    torch.manual_seed(seed)
    model = create_model("resnet18", L.NUM_CLASSES, img_size=32)
    d = data_config(model)
    save_for_timm(model, best, model_name="resnet18", num_classes=L.NUM_CLASSES, label_names=L.class_names(),
                  img_size=32, crop_pct=1.0, mean=d["mean"], std=d["std"])
    return model


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("predict") / "run"
    save_random_model(run / "best")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HISTORY))
    return run


@pytest.fixture(scope="session")
def eval_shards(raw_mask, tmp_path_factory) -> Path:
    """The synthetic competition eval set (mask-eval layout, `test` split) in several shards."""
    out = tmp_path_factory.mktemp("shards") / "eval"
    write_shards(raw_mask / "eval", out, samples_per_shard=5, workers=1, progress=False)
    return out


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def source_order(shards: Path, split: str) -> list[tuple[str, int | None]]:
    """(key, stored class) of every sample in shard order: the split's source order."""
    info = load_info(str(shards))
    return [(s["__key__"], int(s["cls"]) if "cls" in s else None) for s in iter_samples(str(shards), info, split)]


def run_predict(*args: str) -> Path:
    return predict.main([*args, "--workers", "0", "--batch-size", "8"])


def test_one_process_rows_in_source_order(trained_run, mask_shards, tmp_path):
    out = run_predict("--run", str(trained_run), "--data", str(mask_shards), "--out", str(tmp_path / "p.csv"))
    header, rows = read_rows(out)
    assert header == ["key", "ans", "class", "label"]  # labeled validation split, no test split
    truth = source_order(mask_shards, "validation")
    assert len(rows) == len(truth) == load_info(str(mask_shards))["splits"]["validation"]["num_samples"]
    assert [r[0] for r in rows] == [k for k, _ in truth]
    assert len({r[0] for r in rows}) == len(rows)
    assert [int(r[3]) for r in rows] == [c for _, c in truth]
    assert all(r[2] == L.class_name(int(r[1])) for r in rows)


@pytest.mark.ranks
@pytest.mark.parametrize("tta", ["none", "hflip,five-crop"])
def test_two_processes_write_the_same_file(trained_run, mask_shards, tmp_path, tta):
    """The same rows for 1 and 2 processes, with 10 TTA views per image as without."""
    one = run_predict("--run", str(trained_run), "--data", str(mask_shards), "--out", str(tmp_path / "one.csv"),
                      "--tta", tta, "--save-probs")
    two = tmp_path / "two.csv"
    # 2 ranks x 2 workers = 4 readers over the validation split's 2 shards: the strided path.
    proc = launch(["dist_train/predict.py", "--run", str(trained_run), "--data", str(mask_shards), "--out", str(two),
                   "--workers", "2", "--batch-size", "4", "--tta", tta, "--save-probs"], nproc=2, timeout=120)
    assert "2 process(es)" in proc.stdout
    assert two.read_text() == one.read_text()
    a, b = files.load_probs(files.probs_path(one)), files.load_probs(files.probs_path(two))
    assert a.ids == b.ids
    np.testing.assert_allclose(a.prob, b.prob, atol=1e-6)


def test_mask_eval_submission_in_info_csv_order(trained_run, eval_shards, raw_mask, tmp_path):
    out = run_predict("--run", str(trained_run), "--data", str(eval_shards), "--out", str(tmp_path / "sub.csv"),
                      "--save-probs")  # default split: test
    header, rows = read_rows(out)
    info_header, info_rows = read_rows(raw_mask / "eval" / "info.csv")
    assert header == info_header == ["ImageID", "ans"]
    assert [r[0] for r in rows] == [r[0] for r in info_rows]
    assert all(0 <= int(r[1]) < L.NUM_CLASSES for r in rows)
    probs = files.load_probs(files.probs_path(out))
    assert probs.ids == [r[0] for r in rows] and probs.id_column == "ImageID"
    assert probs.prob.shape == (len(rows), L.NUM_CLASSES)
    np.testing.assert_allclose(probs.prob.sum(axis=1), 1.0, atol=1e-5)
    assert probs.ans.tolist() == [int(r[1]) for r in rows]


def test_images_rejected_at_shard_time_are_named_in_the_summary(trained_run, raw_mask, tmp_path, capsys):
    """An eval image that was unreadable when sharded has no submission row: the summary says so,
    with the count and the list to look at, instead of a file silently one row short."""
    import shutil

    src = tmp_path / "eval"
    shutil.copytree(raw_mask / "eval", src)
    first = read_rows(src / "info.csv")[1][0][0]
    (src / "images" / first).write_bytes(b"not an image")
    write_shards(src, tmp_path / "shards", workers=1, progress=False)
    capsys.readouterr()
    out = run_predict("--run", str(trained_run), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "s.csv"))
    assert len(read_rows(out)[1]) == len(read_rows(src / "info.csv")[1]) - 1
    assert (f"1 image(s) of the source were rejected when it was sharded and have no row (see "
            f"{tmp_path / 'shards' / '_rejected.jsonl'})") in capsys.readouterr().out


def symmetric_shards(root: Path) -> Path:
    """A folder-layout shard set of 32x32 images that equal their mirror image."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "src" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            half = rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)
            Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(root / "src" / f"class{c}" / f"{i}.png")
    write_shards(root / "src", root / "shards", val_fraction=0.5, workers=1, progress=False)
    return root / "shards"


@pytest.fixture
def three_class_run(tmp_path) -> Path:
    """A random 3-class model (for the 3-class folder sets)."""
    run = tmp_path / "run3"
    torch.manual_seed(1)
    m = create_model("resnet18", 3, img_size=32)
    d = data_config(m)
    save_for_timm(m, run / "best", model_name="resnet18", num_classes=3, label_names=["class0", "class1", "class2"],
                  img_size=32, crop_pct=1.0, mean=d["mean"], std=d["std"])
    return run


def tta_probs(tmp_path: Path, run_dir: Path, data: Path, *tta: str) -> np.ndarray:
    out = run_predict("--run", str(run_dir), "--data", str(data), "--out", str(tmp_path / f"{len(tta)}{tta}.csv"),
                      "--save-probs", *tta)
    return files.load_probs(files.probs_path(out)).prob


def test_tta_hflip(tmp_path, three_class_run, trained_run, mask_shards):
    sym = symmetric_shards(tmp_path)
    np.testing.assert_allclose(tta_probs(tmp_path, three_class_run, sym),
                               tta_probs(tmp_path, three_class_run, sym, "--tta", "hflip"), atol=1e-5)
    # On ordinary (asymmetric) images the flip does change the probabilities: TTA really runs.
    plain = tta_probs(tmp_path, trained_run, mask_shards)
    flipped = tta_probs(tmp_path, trained_run, mask_shards, "--tta", "hflip")
    assert np.abs(plain - flipped).max() > 1e-4


def test_five_crop_of_a_constant_image_is_no_tta(tmp_path, three_class_run, folder_shards, trained_run, mask_shards):
    """Every crop (and zoom-in) of a plain-colour image is that image: the same probabilities.
    On real images five-crop does change them."""
    plain = tta_probs(tmp_path, three_class_run, folder_shards)
    for spec in ("five-crop", "scales:1.0/1.5"):
        np.testing.assert_allclose(tta_probs(tmp_path, three_class_run, folder_shards, "--tta", spec), plain,
                                   atol=1e-5)
    plain = tta_probs(tmp_path, trained_run, mask_shards)
    assert np.abs(tta_probs(tmp_path, trained_run, mask_shards, "--tta", "five-crop") - plain).max() > 1e-4


def test_accelerate_checkpoint_folder(trained_run, mask_shards, tmp_path):
    """A RUN/checkpoints/step-*/model.safetensors saved through DDP (keys under `module.`) is
    rebuilt from the run's config.yaml + run.json and predicts exactly like best/."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    state = safetensors.torch.load_file(str(trained_run / "best" / "model.safetensors"))
    safetensors.torch.save_file({f"module.{k}": v for k, v in state.items()}, str(ckpt / "model.safetensors"))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "resnet18", "img_size": 32, "crop_pct": 1.0,
                                                     "head": "single"}))
    (run / "run.json").write_text(json.dumps({"model": "resnet18", "num_classes": 18, "head": "single",
                                              "classes": L.class_names()}))
    a = run_predict("--checkpoint", str(ckpt), "--data", str(mask_shards), "--out", str(tmp_path / "a.csv"))
    b = run_predict("--run", str(trained_run), "--data", str(mask_shards), "--out", str(tmp_path / "b.csv"))
    assert a.read_text() == b.read_text()


def test_bad_input_is_one_line_exit_2(trained_run, mask_shards, tmp_path, capsys):
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    cases = [
        (["--run", str(tmp_path / "missing")], "no such folder"),
        (["--run", str(empty_run)], "no trained model"),
        (["--run", str(trained_run), "--split", "nope"], "split 'nope'"),
        (["--checkpoint", str(empty_run)], "expected a best/-style folder"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            run_predict(*args, "--data", str(mask_shards), "--out", str(tmp_path / "x.csv"))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x.csv").exists()


LOAD_WITH_TIMM = """
import sys, numpy as np, timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], torch.log_softmax(model(x), dim=1).numpy())
cfg = model.pretrained_cfg
print(model.num_classes, cfg["input_size"][-1], "dist_train" in sys.modules)
"""


@pytest.mark.parametrize("head", ["single", "multi"])
def test_best_loads_in_plain_timm(head, tmp_path):
    """`best/` is an ordinary timm model: `local-dir:` builds it with its weights, no dist_train
    code involved; a multi-head model comes back as one 18-way classifier with the same softmax."""
    torch.manual_seed(0)
    model = create_model("resnet18", L.NUM_CLASSES, img_size=32, head=head).eval()
    d = data_config(model)
    save_for_timm(model, tmp_path / "best", model_name="resnet18", num_classes=L.NUM_CLASSES,
                  label_names=L.class_names(), img_size=32, crop_pct=1.0, mean=d["mean"], std=d["std"])
    x = torch.randn(4, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_TIMM, str(tmp_path / "best"), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["18", "32", "False"]
    with torch.no_grad():
        expected = torch.log_softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
