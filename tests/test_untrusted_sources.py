"""`shard` on a source folder from someone else (issue 20): it stays inside the folder (links,
loops, special files, csv paths), reads bad csvs as one line, and never deletes a file it did not
write in --out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dist_train import shard
from dist_train.shardset.sources import load_source
from test_bad_input import assert_one_line, call
from test_data import time_limit  # fail instead of hanging (a FIFO opened for reading blocks forever)
from test_sources import demo_persons, image_bytes, make_mask_set




def folder_set(src: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 8) -> Path:
    for c, cls in enumerate(classes):
        (src / cls).mkdir(parents=True)
        for i in range(n):
            (src / cls / f"{i}.png").write_bytes(image_bytes(c * 100 + i, "PNG", size=(16, 16)))
    return src


def shard_args(src: Path, out: Path, *more: str) -> list[str]:
    # identical perceptual hashes only: these flat one-dot pictures are near-duplicates of each other
    return ["--src", str(src), "--out", str(out), "--workers", "1", "--quiet", "--val-fraction", "0.25",
            "--dup-threshold", "0", *more]


# ----------------------------------------------------------------------------- links and special files
def test_symlink_loop_packs_each_image_once(tmp_path):
    src = folder_set(tmp_path / "src")
    os.symlink("..", src / "a" / "loop")  # a/loop -> src: a/loop/a/loop/... and a/loop/b/...
    os.symlink(src / "b", src / "b" / "self")
    source = load_source(src)
    assert len(source.records) == 16 and len({r.path.resolve() for r in source.records}) == 16
    assert source.ignored["repeated"] == 2
    shard.main(shard_args(src, tmp_path / "out"))
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert sum(s["num_samples"] for s in info["splits"].values()) == 16


def test_links_out_of_the_source_are_not_followed(tmp_path):
    outside = folder_set(tmp_path / "elsewhere", classes=("secret",), n=3)
    (tmp_path / "private.png").write_bytes(image_bytes(7, "PNG", size=(16, 16)))
    src = folder_set(tmp_path / "src")
    os.symlink(outside / "secret", src / "c")  # would be packed as a class
    os.symlink(tmp_path / "private.png", src / "a" / "x.png")
    os.symlink(src / "a" / "0.png", src / "b" / "dup.png")  # inside, but the same image twice
    os.symlink(src / "gone.png", src / "a" / "broken.png")
    source = load_source(src)
    assert source.classes == ["a", "b"] and len(source.records) == 16
    assert source.ignored["outside_source"] == 3 and source.ignored["repeated"] == 1


def test_fifo_named_like_an_image_is_skipped_not_opened(tmp_path):
    src = folder_set(tmp_path / "src")
    os.mkfifo(src / "a" / "x.jpg")
    with time_limit(60):
        shard.main(shard_args(src, tmp_path / "out"))
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["ignored"]["special"] == 1 and sum(s["num_samples"] for s in info["splits"].values()) == 16


def test_mask_layout_person_folder_links_and_fifos(tmp_path):
    root = make_mask_set(tmp_path / "src", demo_persons(3))
    people = sorted((root / "images").iterdir())
    (people[0] / "mask1.jpg").unlink()
    os.mkfifo(people[0] / "mask1.jpg")
    (people[1] / "mask2.jpg").unlink()
    os.symlink(people[2] / "mask2.jpg", people[1] / "mask2.jpg")  # inside, but packed once only
    with time_limit(60), pytest.warns(UserWarning, match="2 person folder"):  # each now lacks a photo
        source = load_source(root)
    assert len(source.records) == 19 and source.ignored["special"] == 1 and source.ignored["repeated"] == 1


# ----------------------------------------------------------------------------- csv
@pytest.mark.parametrize("path", ["/abs/dir", "../../dir", "ok/../../dir", "C:/dir"])
def test_csv_paths_must_stay_under_images(tmp_path, capsys, path):
    root = make_mask_set(tmp_path / "src", demo_persons(2))
    outside = tmp_path / "dir"
    outside.mkdir()
    csv = root / "train.csv"
    lines = csv.read_text().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:4] + [path])
    csv.write_text("\n".join(lines) + "\n")
    code, err = call(shard.main, shard_args(root, tmp_path / "out"), capsys)
    assert_one_line(code, err, f"{csv}: paths that do not stay under", f"line 3: {path!r}")
    assert not (tmp_path / "out").exists()


def test_eval_csv_image_ids_must_stay_under_images(tmp_path, capsys):
    root = tmp_path / "eval"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "secret.jpg").write_bytes(image_bytes(2))
    (root / "info.csv").write_text("ImageID,ans\na.jpg,0\n../../secret.jpg,0\n")
    code, err = call(shard.main, shard_args(root, tmp_path / "out"), capsys)
    assert_one_line(code, err, "info.csv: paths that do not stay under", "line 3: '../../secret.jpg'")


@pytest.mark.parametrize("case", ["latin1", "huge_field"])
def test_unreadable_csv_is_one_line(tmp_path, capsys, case):
    root = make_mask_set(tmp_path / "src", demo_persons(2))
    csv = root / "train.csv"
    if case == "latin1":
        csv.write_bytes(csv.read_bytes().replace(b"Asian", "Asiático".encode("latin-1")))
        expected = "codec can't decode"
    else:
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join([*lines, f'9,male,"{"x" * (129 << 10)}",30,p']) + "\n")
        expected = "field larger than field limit"
    code, err = call(shard.main, shard_args(root, tmp_path / "out"), capsys)
    assert_one_line(code, err, f"{csv}: line ", expected, "expected a UTF-8 csv")


def test_csv_line_numbers_count_blank_lines_and_short_rows_are_named(tmp_path, capsys):
    """Lines as an editor shows them: blank lines and a quoted line break counted; a row with fewer
    fields than the header is named as such, not as an empty path."""
    root = make_mask_set(tmp_path / "src", demo_persons(3))
    csv = root / "train.csv"
    head, *rows = csv.read_text().splitlines()
    race = rows[0].split(",")[2]
    csv.write_text("\n".join([head, "", rows[0].replace(f",{race},", ',"two\nlines",'), "", rows[1],
                              rows[2].replace("female", "robot").replace(",male,", ",robot,")]) + "\n")
    code, err = call(shard.main, shard_args(root, tmp_path / "out"), capsys)
    assert_one_line(code, err, f"{csv}: unparseable values: line 7 ", "gender 'robot'")
    csv.write_text("\n".join([head, "", *rows, "", "000009,male"]) + "\n")
    code, err = call(shard.main, shard_args(root, tmp_path / "out"), capsys)
    assert_one_line(code, err, f"{csv}: line 7: 2 fields, the header has 5")
    csv.write_bytes(b"\n".join([head.encode(), b"", rows[0].encode(), rows[1].replace("Asian", "Asi\xe1n").encode("latin-1")]))
    code, err = call(shard.main, shard_args(root, tmp_path / "out"), capsys)
    assert_one_line(code, err, f"{csv}: line 4: unreadable", "expected a UTF-8 csv")
    assert not (tmp_path / "out").exists()


def test_a_csv_of_another_labeled_set_says_what_works(tmp_path, capsys):
    """image,label + images/ (a common download) is read as the competition's index: the line says
    the columns it lacks and that any other labeled set goes in class folders."""
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "images" / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "src" / "train.csv").write_text("image_id,label\na.jpg,cat\n")
    code, err = call(shard.main, shard_args(tmp_path / "src", tmp_path / "out"), capsys)
    assert_one_line(code, err, "train.csv: missing column(s) id,gender,race,age,path",
                    "any other labeled image set: one subfolder per class")


def test_person_folder_missing_a_photo_is_warned_about(tmp_path):
    root = make_mask_set(tmp_path / "src", demo_persons(2))
    folder = sorted((root / "images").iterdir())[1]
    (folder / "normal.jpg").unlink()
    with pytest.warns(UserWarning, match=f"1 person folder\\(s\\) without all 7 photos.*{folder.name} \\(no normal\\)"):
        source = load_source(root)
    assert len(source.records) == 13


def test_csv_paths_are_made_canonical(tmp_path):
    """`person/` and `./person` in train.csv, `./a.jpg` in info.csv: the same keys as the plain
    names (not `person//mask1` or `_/a`), nothing counted as unlisted; the submission's ImageID
    stays as info.csv gives it."""
    root = make_mask_set(tmp_path / "src", demo_persons(2))
    csv = root / "train.csv"
    head, first, second = csv.read_text().splitlines()
    *cols, folder = second.split(",")
    csv.write_text("\n".join([head, first + "/", ",".join([*cols, "./" + folder])]) + "\n")
    source = load_source(root)
    assert {r.key.split("/")[0] for r in source.records} == {first.split(",")[4], folder}
    assert all("//" not in r.key and not r.key.startswith("_") for r in source.records)
    assert source.ignored["unlisted"] == 0
    ev = tmp_path / "eval"
    (ev / "images" / "sub").mkdir(parents=True)
    (ev / "images" / "a.jpg").write_bytes(image_bytes(1))
    (ev / "images" / "sub" / "b.jpg").write_bytes(image_bytes(2))
    (ev / "info.csv").write_text("ImageID,ans\n./a.jpg,0\nsub//b.jpg,0\n")
    source = load_source(ev)
    assert [r.key for r in source.records] == ["a", "sub/b"] and source.ignored["unlisted"] == 0
    assert [r.meta["image_id"] for r in source.records] == ["./a.jpg", "sub//b.jpg"]


def test_key_clash_names_the_folder_and_what_to_do(tmp_path, capsys):
    """x.jpg beside x.png (or a.b/ beside a_b/) would be one sample key: refused with the pair."""
    src = folder_set(tmp_path / "src")
    (src / "a" / "0.jpg").write_bytes(image_bytes(99))
    code, err = call(shard.main, shard_args(src, tmp_path / "out"), capsys)
    assert_one_line(code, err, f"{src}: sample keys clash", "a/0.jpg vs a/0.png -> a/0", "rename one of each pair")
    assert not (tmp_path / "out").exists()


def test_split_folders_given_as_the_source_are_not_taken_for_classes(tmp_path, capsys):
    """data/{test,train,val}/<class>/ given as --src data would be a 3-class set labelled by split."""
    for split in ("test", "train", "val"):
        folder_set(tmp_path / "data" / split, n=2)
    code, err = call(shard.main, shard_args(tmp_path / "data", tmp_path / "out"), capsys)
    assert_one_line(code, err, "(test, train, val) are splits holding class folders, not classes",
                    f"--src {tmp_path / 'data' / 'train'}")
    assert not (tmp_path / "out").exists()
    (tmp_path / "plain" / "val").mkdir(parents=True)  # a class that happens to be called val, with images
    (tmp_path / "plain" / "val" / "0.png").write_bytes(image_bytes(1, "PNG", size=(16, 16)))
    folder_set(tmp_path / "plain", classes=("train",), n=2)
    assert load_source(tmp_path / "plain").classes == ["train", "val"]


def test_macosx_folder_of_an_unzipped_archive_is_junk_not_a_class(tmp_path):
    src = folder_set(tmp_path / "src")
    (src / "__MACOSX" / "a").mkdir(parents=True)
    (src / "__MACOSX" / "a" / "._0.png").write_bytes(b"\0\5\26\7")
    source = load_source(src)
    assert source.classes == ["a", "b"] and len(source.records) == 16 and source.ignored["appledouble"] == 1


def test_out_inside_the_source_is_refused_and_src_dot_is_named_after_its_folder(tmp_path, capsys, monkeypatch):
    """`shard --src .` in the image folder wrote into ./shards (named after '' : the default folder
    itself) inside the source, and the next run read it as a class with no images."""
    src = folder_set(tmp_path / "pets")
    code, err = call(shard.main, shard_args(src, src / "shards"), capsys)
    assert_one_line(code, err, f"--out {src / 'shards'}: inside the source's image folder")
    assert sorted(p.name for p in src.iterdir()) == ["a", "b"]  # nothing written
    monkeypatch.chdir(tmp_path)
    shard.main(["--src", "pets", "--workers", "1", "--quiet", "--dup-threshold", "0"])
    assert (tmp_path / "shards" / "pets" / "_info.json").is_file()
    monkeypatch.chdir(src)
    code, err = call(shard.main, ["--src", ".", "--workers", "1", "--quiet"], capsys)
    assert_one_line(code, err, "--out shards/pets: inside the source's image folder")


def test_file_name_that_is_not_utf8_is_one_line(tmp_path, capsys):
    src = folder_set(tmp_path / "src")
    os.rename(src / "a" / "0.png", os.path.join(os.fsencode(src / "a"), b"caf\xe9.png"))
    code, err = call(shard.main, shard_args(src, tmp_path / "out"), capsys)
    assert_one_line(code, err, "caf\\xe9.png' is not UTF-8")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --out
def test_out_with_other_files_is_refused_and_they_survive(tmp_path, capsys):
    src = folder_set(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    backup = out / "backup-000001.tar"
    backup.write_bytes(b"the user's own backup")
    code, err = call(shard.main, shard_args(src, out), capsys)
    assert_one_line(code, err, f"--out {out}: holds backup-000001.tar and no shard set", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["backup-000001.tar"]

    shard.main(shard_args(src, out, "--overwrite", "--samples-per-shard", "1"))
    assert backup.read_bytes() == b"the user's own backup" and (out / "_info.json").is_file()
    assert len(list(out.glob("train-*.tar"))) == 12
    # replacing the set (another shard count) removes the old set's shards, still not the backup
    shard.main(shard_args(src, out, "--overwrite", "--samples-per-shard", "3"))
    info = json.loads((out / "_info.json").read_text())
    assert backup.read_bytes() == b"the user's own backup"
    side = {"_fingerprints.npz", "_duplicates.csv", "_duplicates.png"}  # the duplicate check's files
    assert {p.name for p in out.iterdir()} - side == {"backup-000001.tar", "_info.json", *info["sha256"]}
    assert len(list(out.glob("train-*.tar"))) == 4  # 12 training images, 3 per shard: none left over


def test_a_set_listing_a_foreign_file_never_gets_it_deleted_unless_listed(tmp_path):
    """Only files listed in the replaced set's _info.json go: an unlisted shard-named file stays."""
    src = folder_set(tmp_path / "src")
    out = tmp_path / "out"
    shard.main(shard_args(src, out))
    stray = out / "extra-000000.tar"
    stray.write_bytes(b"not ours")
    shard.main(shard_args(src, out, "--overwrite", "--samples-per-shard", "5"))
    assert stray.read_bytes() == b"not ours"
