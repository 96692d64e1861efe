"""The synthetic competition folder: exact layout, quirks, determinism, class coverage."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from dist_train.errors import UserError
from dist_train.tasks.mask import labels as L
from dist_train.tasks.mask.synth import make_dataset

SEVEN = {"mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, make_dataset(out, persons=30, seed=3, size=32, eval_persons=12)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _images(folder: Path) -> list[Path]:
    """The real (non-junk) images of one person folder."""
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def test_train_csv_and_folders(ds: tuple[Path, dict]) -> None:
    out, summary = ds
    train = out / "train"
    with (train / "train.csv").open() as f:
        assert f.readline() == "id,gender,race,age,path\n"
    rows = _rows(train / "train.csv")
    assert len(rows) == summary["persons"] == 30
    assert summary["train_images"] == 30 * 7
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for r in rows:
        assert re.fullmatch(r"\d{6}", r["id"])
        assert r["gender"] in ("male", "female")
        assert r["race"] == "Asian"
        assert r["path"] == f"{r['id']}_{r['gender']}_{r['race']}_{r['age']}"
        imgs = _images(train / "images" / r["path"])
        assert {p.name.split(".")[0] for p in imgs} == SEVEN and len(imgs) == 7
        assert all(p.suffix.lower() in L.IMAGE_EXTENSIONS for p in imgs)
    person_dirs = {p.name for p in (train / "images").iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert person_dirs == {r["path"] for r in rows}


def test_quirks_present(ds: tuple[Path, dict]) -> None:
    out, summary = ds
    images = out / "train" / "images"
    suffixes = {p.suffix for p in images.glob("*/*") if p.is_file() and not p.name.startswith(".")}
    assert {".jpg", ".jpeg", ".png", ".JPG"} <= suffixes
    appledouble = list(images.glob("*/._*"))
    assert len(appledouble) == summary["appledouble"] >= 1
    for junk in appledouble:
        assert (junk.parent / junk.name[2:]).is_file()  # shadows a real image's name
        with pytest.raises(UnidentifiedImageError):
            Image.open(junk).load()
    checkpoints = [p for p in images.rglob(".ipynb_checkpoints") if p.is_dir()]
    assert (images / ".ipynb_checkpoints").is_dir()
    assert any(p.parent != images for p in checkpoints)
    assert len(checkpoints) == summary["checkpoints"]
    dotfiles = list(images.rglob(".DS_Store"))
    assert (images / ".DS_Store").is_file() and len(dotfiles) == summary["dotfiles"]


def test_eval_info_and_labels(ds: tuple[Path, dict]) -> None:
    out, summary = ds
    info, labels = _rows(out / "eval" / "info.csv"), _rows(out / "eval" / "labels.csv")
    assert list(info[0]) == ["ImageID", "ans"] and list(labels[0]) == ["ImageID", "label"]
    assert len(info) == summary["eval_images"] == 12 * 7
    assert [r["ImageID"] for r in info] == [r["ImageID"] for r in labels]
    assert all(r["ans"] == "0" for r in info)
    assert all(re.fullmatch(r"[0-9a-f]{40}\.jpg", r["ImageID"]) for r in info)
    assert sorted(p.name for p in (out / "eval" / "images").iterdir()) == sorted(r["ImageID"] for r in info)
    assert {int(r["label"]) for r in labels} == set(range(18))  # 12 persons cover all 6 cells
    # Shuffled, not grouped by person: consecutive rows are not all the same mask status.
    masks = [L.decode(int(r["label"]))[0] for r in labels[:14]]
    assert len(set(masks)) > 1


def test_images_decode_at_size(ds: tuple[Path, dict]) -> None:
    out, _ = ds
    files = [p for r in _rows(out / "train" / "train.csv") for p in _images(out / "train" / "images" / r["path"])]
    files += list((out / "eval" / "images").iterdir())
    for p in files:
        with Image.open(p) as im:
            im.load()
            assert im.size == (32, 43) and im.mode == "RGB"
            assert im.format == ("PNG" if p.suffix.lower() == ".png" else "JPEG")


def test_every_class_and_edge_ages(ds: tuple[Path, dict]) -> None:
    out, _ = ds
    rows = _rows(out / "train" / "train.csv")
    cells = Counter((L.parse_gender(r["gender"]), L.age_group(int(r["age"]))) for r in rows)
    assert len(cells) == 6 and min(cells.values()) >= 2
    for gender in ("male", "female"):
        assert {29, 30, 59, 60} <= {int(r["age"]) for r in rows if r["gender"] == gender}
    classes = Counter()
    for r in rows:
        g, a = L.parse_gender(r["gender"]), L.age_group(int(r["age"]))
        for p in _images(out / "train" / "images" / r["path"]):
            classes[L.encode(L.mask_status(p.name.split(".")[0]), g, a)] += 1
    assert set(classes) == set(range(18))
    assert cells[(0, 2)] + cells[(1, 2)] < cells[(0, 0)] + cells[(1, 0)]  # >=60 is rarer


def test_every_class_small_set(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", persons=6, size=16, eval_persons=6)
    rows = _rows(tmp_path / "d" / "train" / "train.csv")
    assert {(r["gender"], L.age_group(int(r["age"]))) for r in rows} == {
        (g, a) for g in ("male", "female") for a in range(3)
    }
    assert {int(r["label"]) for r in _rows(tmp_path / "d" / "eval" / "labels.csv")} == set(range(18))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", persons=13, seed=7, size=24)
    b = make_dataset(tmp_path / "b", persons=13, seed=7, size=24)
    assert a == b
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert ta == tb and len(ta) > 13 * 7
    make_dataset(tmp_path / "c", persons=13, seed=8, size=24)
    assert _tree(tmp_path / "c") != ta


def test_pictures_follow_the_class(tmp_path: Path) -> None:
    # Guard against a drawing bug that makes classes look alike: mean picture per mask
    # status must differ clearly (the mask is a large light-blue patch).
    make_dataset(tmp_path / "d", persons=12, size=32, eval_persons=0)
    train = tmp_path / "d" / "train"
    means: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for r in _rows(train / "train.csv"):
        for p in _images(train / "images" / r["path"]):
            arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
            blue = (arr[..., 2] - arr[..., 0] > 60) & (arr[..., 2] > 170)
            means[L.mask_status(p.name.split(".")[0])].append(blue.mean())
    wear, incorrect, none = (float(np.mean(means[k])) for k in range(3))
    assert wear > incorrect > none
    assert none < 0.01 and incorrect > 0.02


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="persons"):
        make_dataset(tmp_path / "x", persons=0)
    with pytest.raises(UserError, match="size"):
        make_dataset(tmp_path / "x", persons=2, size=8)
    with pytest.raises(UserError, match="eval-persons"):
        make_dataset(tmp_path / "x", persons=2, eval_persons=-1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_dataset(tmp_path / "full", persons=2, size=16)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half written
    make_dataset(tmp_path / "full", persons=2, size=16, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["eval", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "dist_train.synth", "--out", str(tmp_path / "d"), "--persons", "3", "--size", "16"]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and "3 persons / 21 train images" in ok.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: --out") and "Traceback" not in again.stderr
    bad = subprocess.run(cmd[:5] + ["--persons", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --persons 0: expected at least 1"
    over = subprocess.run(cmd + ["--overwrite", "--eval-persons", "2"], cwd=REPO, capture_output=True, text=True)
    assert over.returncode == 0 and "2 persons / 14 eval images" in over.stdout
