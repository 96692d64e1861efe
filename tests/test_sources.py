"""Raw layouts (every quirk of the real data) and the person-level stratified split."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dist_train.errors import UserError
from dist_train.shardset.sources import detect_layout, load_source, make_key, split_records
from dist_train.tasks.mask.labels import MASK_STEMS, encode

STEMS = list(MASK_STEMS)


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    """A small picture whose pixels depend on `seed`, so every file's bytes differ."""
    im = Image.new(mode, size, tuple((seed * k) % 256 for k in (37, 91, 53, 255)[: len(mode)]))
    im.putpixel((seed % size[0], (seed // size[0]) % size[1]), (255,) * len(mode))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def person_folder(pid: str, gender: str, age: int) -> str:
    return f"{pid}_{gender}_Asian_{age}"


def make_mask_set(root: Path, persons: list[tuple[str, str, int]], ext: str = ".jpg") -> Path:
    """Competition train layout under root: train.csv + images/<path>/<seven stems><ext>."""
    (root / "images").mkdir(parents=True)
    rows = ["id,gender,race,age,path"]
    for i, (pid, gender, age) in enumerate(persons):
        folder = person_folder(pid, gender, age)
        rows.append(f"{pid},{gender},Asian,{age},{folder}")
        (root / "images" / folder).mkdir()
        for j, stem in enumerate(STEMS):
            fmt = "PNG" if ext.lower() == ".png" else "JPEG"
            (root / "images" / folder / f"{stem}{ext}").write_bytes(image_bytes(i * 7 + j, fmt))
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def demo_persons(n: int) -> list[tuple[str, str, int]]:
    """n persons cycling through all six (gender, age group) strata."""
    ages = (20, 45, 65)
    return [(f"{i:06d}", ("male", "female")[i % 2], ages[(i // 2) % 3] + i % 5) for i in range(n)]


def test_mask_layout_counts_every_quirk(tmp_path):
    root = make_mask_set(tmp_path / "train", demo_persons(3))
    p0 = root / "images" / person_folder(*demo_persons(1)[0])
    # mixed and upper-case extensions are accepted
    (p0 / "mask1.jpg").rename(p0 / "mask1.JPG")
    (p0 / "mask2.jpg").unlink()
    (p0 / "mask2.Jpeg").write_bytes(image_bytes(100))
    (p0 / "normal.jpg").unlink()
    (p0 / "normal.PNG").write_bytes(image_bytes(101, "PNG"))
    # junk: AppleDouble files (folder and image level), dot-files, checkpoints, unknown stems, non-images
    (p0 / "._mask1.JPG").write_bytes(b"\0\5\26\7junk")
    (root / "images" / f"._{p0.name}").write_bytes(b"junk")
    (p0 / ".DS_Store").write_bytes(b"junk")
    (p0 / ".ipynb_checkpoints").mkdir()
    (p0 / ".ipynb_checkpoints" / "mask1-checkpoint.jpg").write_bytes(image_bytes(102))
    (root / "images" / ".ipynb_checkpoints").mkdir()
    (p0 / "mask6.jpg").write_bytes(image_bytes(103))
    (p0 / "mask1.txt").write_text("not an image")
    (root / "images" / "999999_male_Asian_20").mkdir()  # a folder train.csv does not list

    src = load_source(root)
    assert src.layout == "mask" and detect_layout(root) == "mask"
    assert len(src.records) == 3 * 7
    assert src.ignored == {"appledouble": 2, "dotfiles": 1, "checkpoints": 2, "unknown_stem": 1,
                           "not_image": 1, "unlisted": 1, "outside_source": 0, "repeated": 0, "special": 0}
    by_key = {r.key: r for r in src.records}
    assert {f"{p0.name}/mask1", f"{p0.name}/mask2", f"{p0.name}/normal"} <= set(by_key)
    r = by_key[f"{p0.name}/normal"]
    assert r.path.name == "normal.PNG" and r.rel == f"{p0.name}/normal.PNG"
    assert r.meta == {"person_id": "000000", "gender": 0, "race": "Asian", "age": 20, "mask": 2,
                      "path": f"{p0.name}/normal.PNG"}
    assert r.label == encode(2, 0, 0) and r.group == "000000" and r.stratum == "0/0"
    assert len(src.classes) == 18 and src.classes[4] == "wear/female/30-59"


def test_mask_parent_folder_and_age_bins(tmp_path):
    make_mask_set(tmp_path / "data" / "train", [("000001", "female", 58)])
    src = load_source(tmp_path / "data", options={"age_bins": (30, 58)})
    assert src.layout == "mask" and src.root == tmp_path / "data" / "train"
    assert {r.label for r in src.records} == {encode(m, 1, 2) for m in (0, 1, 2)}
    assert {r.label for r in load_source(tmp_path / "data").records} == {encode(m, 1, 1) for m in (0, 1, 2)}


def test_mask_duplicated_stem_is_an_error(tmp_path):
    root = make_mask_set(tmp_path, demo_persons(2))
    folder = person_folder(*demo_persons(1)[0])
    (root / "images" / folder / "mask1.png").write_bytes(image_bytes(1, "PNG"))
    with pytest.raises(UserError, match=rf"{folder}/\{{mask1.jpg,mask1.png\}}"):
        load_source(root)


def test_mask_missing_folder_is_an_error(tmp_path):
    root = make_mask_set(tmp_path, demo_persons(2))
    with (root / "train.csv").open("a") as f:
        f.write("000777,male,Asian,33,000777_male_Asian_33\n")
    with pytest.raises(UserError, match="line 4: 000777_male_Asian_33"):
        load_source(root)


@pytest.mark.parametrize("gender, age, bad", [("mal", "30", "gender 'mal'"), ("male", "thirty", "age 'thirty'")])
def test_mask_unparseable_values_are_errors(tmp_path, gender, age, bad):
    root = make_mask_set(tmp_path, demo_persons(2))
    csv = (root / "train.csv").read_text().splitlines()
    pid, _, race, _, path = csv[2].split(",")
    csv[2] = ",".join([pid, gender, race, age, path])
    (root / "train.csv").write_text("\n".join(csv) + "\n")
    with pytest.raises(UserError, match=rf"line 3 .*{bad}"):
        load_source(root)


def test_missing_csv_empty_folders_and_unknown_layout(tmp_path):
    root = make_mask_set(tmp_path / "m", demo_persons(2))
    (root / "train.csv").unlink()
    with pytest.raises(UserError, match="no train.csv"):
        load_source(root)
    with pytest.raises(UserError, match=r"train\.csv: not found"):
        load_source(root, layout="mask")
    with pytest.raises(UserError, match=r"info\.csv: not found"):
        load_source(root, layout="mask-eval")

    empty = make_mask_set(tmp_path / "e", demo_persons(2))
    folder = empty / "images" / person_folder(*demo_persons(1)[0])
    for p in folder.iterdir():
        p.unlink()
    (folder / "._mask1.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match=f"no images.*{folder.name}"):
        load_source(empty)

    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="empty or unrecognised"):
        load_source(tmp_path / "nothing")
    with pytest.raises(UserError, match="not a folder"):
        load_source(tmp_path / "absent")
    with pytest.raises(UserError, match="layout 'coco'"):
        load_source(root, layout="coco")


def make_eval_set(root: Path, ids: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    for i, image_id in enumerate(ids):
        (root / "images" / image_id).write_bytes(image_bytes(i))
    (root / "info.csv").write_text("ImageID,ans\n" + "".join(f"{x},0\n" for x in ids))
    return root


def test_mask_eval_keeps_info_csv_order(tmp_path):
    ids = ["f3.jpg", "a1.jpg", "c2.v1.jpg", "b0.jpg"]
    root = make_eval_set(tmp_path / "data" / "eval", ids)
    (root / "images" / "._a1.jpg").write_bytes(b"junk")
    src = load_source(tmp_path / "data")
    assert src.layout == "mask-eval" and not src.labeled
    assert [r.meta for r in src.records] == [{"image_id": x, "index": i} for i, x in enumerate(ids)]
    assert [r.key for r in src.records] == ["f3", "a1", "c2_v1", "b0"]
    assert all(r.label is None for r in src.records)
    assert src.ignored["appledouble"] == 1
    assert list(split_records(src, 0.2, 0)) == ["test"]
    assert split_records(src, 0.2, 0)["test"] == src.records

    (root / "images" / "b0.jpg").unlink()
    with pytest.raises(UserError, match="line 5: b0.jpg"):
        load_source(root)


def test_folder_layout_sorted_classes_and_junk(tmp_path):
    root = tmp_path / "pets"
    for cls, fmt, ext in (("zebra", "JPEG", ".jpg"), ("cat", "PNG", ".PNG"), ("dog", "BMP", ".bmp"), ("ant", "WEBP", ".webp")):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}{ext}").write_bytes(image_bytes(i, fmt))
        (root / cls / "sub" / "x.y.jpg").write_bytes(image_bytes(9))
    (root / "cat" / "._0.PNG").write_bytes(b"junk")
    (root / "cat" / "notes.txt").write_text("x")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("x")
    src = load_source(root)
    assert src.layout == "folder" and src.classes == ["ant", "cat", "dog", "zebra"]
    assert len(src.records) == 16
    assert src.ignored == {"appledouble": 1, "dotfiles": 0, "checkpoints": 1, "unknown_stem": 0,
                           "not_image": 1, "unlisted": 1, "outside_source": 0, "repeated": 0, "special": 0}
    r = next(r for r in src.records if r.rel == "dog/sub/x.y.jpg")
    assert r.key == "dog/sub/x_y" and r.label == 2 and r.meta == {"path": "dog/sub/x.y.jpg", "class_name": "dog"}

    (root / "dog" / "0.png").write_bytes(image_bytes(1, "PNG"))
    with pytest.raises(UserError, match=r"dog/0\.bmp vs dog/0\.png -> dog/0"):
        load_source(root)


def test_make_key():
    assert make_key("000001_female_Asian_45/mask1.jpg") == "000001_female_Asian_45/mask1"
    assert make_key("a.b/c.d.png") == "a_b/c_d"
    assert make_key("dir.x/noext") == "dir_x/noext"


def test_person_split_disjoint_stratified_deterministic(tmp_path):
    src = load_source(make_mask_set(tmp_path, demo_persons(60)))
    splits = split_records(src, 0.2, seed=0)
    train_p = {r.group for r in splits["train"]}
    val_p = {r.group for r in splits["validation"]}
    assert not train_p & val_p
    assert len(splits["train"]) + len(splits["validation"]) == len(src.records)
    assert sorted(r.key for s in splits.values() for r in s) == sorted(r.key for r in src.records)
    # 6 (gender, age group) strata of 10 persons: each gives exactly 2 persons (14 images) to validation
    assert Counter(r.stratum for r in splits["validation"]) == {f"{g}/{a}": 14 for g in (0, 1) for a in (0, 1, 2)}
    again = split_records(src, 0.2, seed=0)
    assert [r.key for r in again["validation"]] == [r.key for r in splits["validation"]]
    other = split_records(src, 0.2, seed=1)
    assert {r.group for r in other["validation"]} != val_p
    assert list(split_records(src, 0.0, 0)) == ["train"]
    with pytest.raises(UserError):
        split_records(src, 1.0, 0)


def test_split_keeps_singleton_stratum_in_train(tmp_path):
    src = load_source(make_mask_set(tmp_path, [("000001", "male", 20), ("000002", "male", 22), ("000003", "female", 70)]))
    splits = split_records(src, 0.5, seed=3)
    assert {r.group for r in splits["train"]} == {"000003", *({"000001", "000002"} - {r.group for r in splits["validation"]})}
    assert len({r.group for r in splits["validation"]}) == 1


def test_folder_split_stratified_per_class(tmp_path):
    root = tmp_path / "f"
    for cls, n in (("a", 10), ("b", 20), ("c", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i}.jpg").write_bytes(image_bytes(i))
    splits = split_records(load_source(root), 0.2, seed=0)
    assert Counter(r.meta["class_name"] for r in splits["validation"]) == {"a": 2, "b": 4, "c": 1}
    assert Counter(r.meta["class_name"] for r in splits["train"]) == {"a": 8, "b": 16, "c": 2}
