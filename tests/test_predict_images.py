"""predict --images: image files, folders and globs predicted without a shard set, with the
same probabilities as the shard path for the same images; bad files counted and listed."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train import predict
from dist_train.data import files as data_files
from dist_train.data.files import find_images
from dist_train.errors import UserError
from dist_train.infer import files
from dist_train.model.build import data_config
from dist_train.model.export import save_for_timm
from dist_train.shardset.writer import write_shards
from dist_train.tasks import build_model

CLASSES = ["class0", "class1", "class2"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 class folders of noise images of assorted sizes: png, jpg, webp, one nested deeper,
    and one file that is not an image at all."""
    root = tmp_path_factory.mktemp("images") / "src"
    rng = np.random.default_rng(0)
    formats = [("png", {}), ("jpg", {"quality": 90}), ("webp", {"quality": 80}), ("jpeg", {})]
    for c in range(3):
        for i, (ext, kw) in enumerate(formats):
            sub = root / CLASSES[c] / ("deep" if i == 3 else "")
            sub.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"p{c}{i}.{ext}", **kw)
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def run3(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run3"
    torch.manual_seed(3)
    m = build_model("test_resnet", 3, img_size=32)
    d = data_config(m)
    save_for_timm(m, run / "best", model_name="test_resnet", num_classes=3, label_names=CLASSES,
                  img_size=32, crop_pct=0.875, mean=d["mean"], std=d["std"])
    return run


def probs_by_name(out: Path) -> dict[str, np.ndarray]:
    p = files.load_probs(files.probs_path(out))
    return dict(zip(p.ids, p.prob))


def test_images_equal_the_shard_path(image_folder, run3, tmp_path, capsys):
    shards = tmp_path / "shards"
    write_shards(image_folder, shards, layout="folder", val_fraction=0.5, workers=1, progress=False)
    shard_probs = {}
    for split in ("train", "validation"):
        out = predict.main(["--run", str(run3), "--data", str(shards), "--split", split, "--tta", "hflip",
                            "--out", str(tmp_path / f"{split}.csv"), "--save-probs", "--workers", "0"])
        shard_probs.update(probs_by_name(out))
    out = predict.main(["--run", str(run3), "--images", str(image_folder), "--tta", "hflip",
                        "--out", str(tmp_path / "img.csv"), "--save-probs", "--workers", "0", "--batch-size", "5"])
    printed = capsys.readouterr().out
    assert "12 rows, 13 images, 1 unreadable and left out: " + str(image_folder / "class1" / "broken.jpg") in printed
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "ans", "class"]
    paths = [r[0] for r in rows[1:]]
    assert paths == sorted(paths) and all(p.startswith(str(image_folder) + "/") for p in paths)  # as given
    img = probs_by_name(out)
    assert len(img) == 12 == len(shard_probs)
    for path, prob in img.items():
        key = str(Path(path).relative_to(image_folder).with_suffix(""))  # the folder layout's sample key
        np.testing.assert_allclose(prob, shard_probs[key], atol=1e-5, err_msg=path)
    assert any(p.endswith(".webp") for p in paths) and any("/deep/" in p for p in paths)


def test_folder_is_read_as_shard_reads_it(run3, tmp_path, capsys):
    """bmp/tiff files are predicted (converted as the shard writer converts them: the same
    probabilities), and what `shard` skips as junk is not predicted: no `._*` AppleDouble file
    reported unreadable, no `.ipynb_checkpoints` or dot-folder copy predicted as an extra row."""
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for c, cls in enumerate(CLASSES):
        (src / cls).mkdir(parents=True)
        for i, ext in enumerate(("bmp", "tif", "png")):
            Image.fromarray(rng.integers(0, 256, (20 + c, 24, 3), dtype=np.uint8)).save(src / cls / f"p{i}.{ext}")
    shards = tmp_path / "shards"
    write_shards(src, shards, layout="folder", val_fraction=0.5, workers=1, progress=False)
    for junk in ("._p0.jpg", ".hidden/p.jpg", ".ipynb_checkpoints/p0-checkpoint.png"):
        (src / "class0" / junk).parent.mkdir(exist_ok=True)
        (src / "class0" / junk).write_bytes((src / "class0" / "p2.png").read_bytes() if "checkpoint" in junk else b"\0\5\26\7")
    (src / "class0" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    shard_probs = {}
    for split in ("train", "validation"):
        out = predict.main(["--run", str(run3), "--data", str(shards), "--split", split, "--out",
                            str(tmp_path / f"{split}.csv"), "--save-probs", "--workers", "0"])
        shard_probs.update(probs_by_name(out))
    capsys.readouterr()
    out = predict.main(["--run", str(run3), "--images", str(src), "--out", str(tmp_path / "img.csv"), "--save-probs",
                        "--workers", "0"])
    assert "9 rows, 9 images, model" in capsys.readouterr().out
    img = probs_by_name(out)
    assert sorted(Path(p).suffix for p in img) == [".bmp"] * 3 + [".png"] * 3 + [".tif"] * 3
    for path, prob in img.items():
        np.testing.assert_allclose(prob, shard_probs[str(Path(path).relative_to(src).with_suffix(""))], atol=1e-5)


def test_file_name_that_is_not_utf8_is_refused_before_predicting(run3, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))
    with pytest.raises(SystemExit) as e:
        predict.main(["--run", str(run3), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv"), "--workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --images ") and len(err.strip().splitlines()) == 1
    assert "caf\\xe9.png' is not UTF-8" in err and not (tmp_path / "p.csv").exists()


def test_files_globs_and_folders(image_folder, tmp_path):
    a = str(image_folder / "class0" / "p00.png")
    pattern = str(image_folder / "class2" / "*.jpg")
    found = find_images([a, pattern, str(image_folder / "class0"), a])
    names = [f.name for f in found]
    assert names[0] == a and names[1] == str(image_folder / "class2" / "p21.jpg")
    assert names[2:] == [str(image_folder / "class0" / n) for n in ("deep/p03.jpeg", "p01.jpg", "p02.webp")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad, says in [(tmp_path / "empty", "no images in it"), (tmp_path / "notes.txt", "not an image file"),
                      (tmp_path / "nothing", "no such file or folder"), (tmp_path / "*.png", "no images in it")]:
        with pytest.raises(UserError, match=says):
            find_images([str(bad)])


def test_links_out_of_the_folder_are_not_followed(image_folder, tmp_path):
    inside = tmp_path / "given"
    inside.mkdir()
    (inside / "out.png").symlink_to(image_folder / "class0" / "p00.png")
    Image.new("RGB", (8, 8)).save(inside / "own.png")
    assert [f.name for f in find_images([str(inside)])] == [str(inside / "own.png")]


def test_over_large_and_unreadable_images_are_bad_samples(image_folder, run3, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_files, "MAX_PIXELS", 40 * 40)
    Image.new("RGB", (50, 50), "red").save(tmp_path / "big.png")
    Image.new("RGB", (30, 30), "red").save(tmp_path / "small.png")
    out = predict.main(["--run", str(run3), "--images", str(tmp_path / "big.png"), str(tmp_path / "small.png"),
                        "--out", str(tmp_path / "p.csv"), "--workers", "0"])
    assert out.read_text().splitlines()[1].startswith(str(tmp_path / "small.png") + ",")
    assert "1 unreadable and left out: " + str(tmp_path / "big.png") in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        predict.main(["--run", str(run3), "--images", str(tmp_path / "big.png"), "--out", str(tmp_path / "q.csv"),
                      "--workers", "0"])
    assert e.value.code == 2 and not (tmp_path / "q.csv").exists()
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_bad_flag_combinations(run3, tmp_path, capsys):
    for args in (["--out", str(tmp_path / "a.csv")],
                 ["--images", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "a.csv")],
                 ["--images", str(tmp_path), "--split", "test", "--out", str(tmp_path / "a.csv")]):
        with pytest.raises(SystemExit) as e:
            predict.main(["--run", str(run3), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_files_are_split_exactly_once_over_ranks_and_workers(image_folder):
    """The file reader's share of (rank, worker) for 2 ranks x 2 workers: every file once, the bad
    one counted by the reader that owns it (the gather itself is the shard path's `infer`)."""
    from dist_train.data.files import FileReader
    from dist_train.data.transforms import AugmentConfig, Transform

    images = find_images([str(image_folder)])
    seen, bad = [], 0
    for rank in range(2):
        reader = FileReader(images, Transform(AugmentConfig(img_size=16), train=False), 3, 2, rank)
        for worker in range(2):
            reader._worker = lambda w=worker: (w, 2)
            for batch in reader:
                seen += batch["order"].tolist()
                assert batch["key"] == [images[i].name for i in batch["order"].tolist()]
                assert batch["image"].shape[1:] == (3, 16, 16) and (batch["target"] == -1).all()
        bad += reader.bad.value
    assert sorted(seen) == [i for i, f in enumerate(images) if not f.name.endswith("broken.jpg")]
    assert bad == 1 and len(images) == 13
    assert [reader.reader_samples(r, 4) for r in range(4)] == [4, 3, 3, 3]  # the loader's batch count


def test_a_folder_is_walked_as_shard_walks_it_links_inside_followed_once(tmp_path):
    given = tmp_path / "given"
    (given / "real").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(given / "real" / name)
    (given / "alias").symlink_to(given / "real")  # a linked folder inside: its images are the same files
    (given / "real" / "loop").symlink_to(given)  # a link back up: no endless walk
    (given / "c.png").symlink_to(given / "real" / "a.png")  # a linked file beside its target
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "x.png")
    (given / "out").symlink_to(tmp_path / "elsewhere")  # a linked folder out of the given one
    names = [f.name for f in find_images([str(given) + "/"])]
    assert len(names) == 2 and all(n.startswith(str(given) + "/") for n in names)
    assert sorted(os.path.realpath(n) for n in names) == [str(given / "real" / "a.png"), str(given / "real" / "b.png")]
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "sub").symlink_to(given / "real")  # the folder of a link inside: read through the link
    with pytest.raises(UserError, match="no images in it"):  # its target is outside `linked`
        find_images([str(linked)])
