"""Shard writer: round trip, readers (timm, webdataset), resize, idempotency, atomicity, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_train.errors import UserError
from dist_train.shard import main
from dist_train.shardset.spool import Spool
from dist_train.shardset.writer import inspect, shard_sizes, write_shards
from dist_train.tasks.mask.labels import label_from_meta
from test_sources import demo_persons, image_bytes, make_eval_set, make_mask_set, person_folder


def members(out: Path) -> dict[str, dict[str, bytes]]:
    """{shard filename: {member name: bytes}} for every tar in out."""
    res = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            res[tar_path.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return res


def file_state(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}


@pytest.fixture
def raw(tmp_path) -> Path:
    """10 persons, jpg; one person's normal image is a PNG."""
    root = make_mask_set(tmp_path / "raw" / "train", demo_persons(10))
    folder = root / "images" / person_folder(*demo_persons(1)[0])
    (folder / "normal.jpg").unlink()
    (folder / "normal.png").write_bytes(image_bytes(500, "PNG"))
    return root


def run(src: Path, out: Path, **kw) -> dict:
    """write_shards on one worker; `age_bins=` is the mask layouts' option."""
    options = {"age_bins": kw.pop("age_bins")} if "age_bins" in kw else None
    return write_shards(src, out, workers=1, progress=False, options=options, **kw)


def test_round_trip_bytes_labels_metadata(raw, tmp_path):
    out = tmp_path / "out"
    info = run(raw, out, samples_per_shard=8)
    src_files = {f"{p.parent.name}/{p.stem}": p for p in (raw / "images").glob("*/*.*")}
    seen: dict[str, str] = {}
    for name, files in members(out).items():
        split = name.rsplit("-", 1)[0]
        keys = sorted({m.rsplit(".", 1)[0] for m in files})
        assert len(keys) == info["splits"][split]["shard_lengths"][info["splits"][split]["filenames"].index(name)]
        for key in keys:
            assert key not in seen
            seen[key] = split
            p = src_files[key]
            ext = "png" if p.suffix == ".png" else "jpg"
            assert files[f"{key}.{ext}"] == p.read_bytes()
            meta = json.loads(files[f"{key}.json"])
            assert meta["path"] == f"{p.parent.name}/{p.name}"
            pid, gender, _, age = p.parent.name.split("_")
            assert (meta["person_id"], meta["gender"], meta["age"]) == (pid, ("male", "female").index(gender), int(age))
            assert int(files[f"{key}.cls"]) == label_from_meta(meta)
    assert set(seen) == set(src_files)  # every image exactly once
    persons = {split: {k.split("/")[0] for k, s in seen.items() if s == split} for split in ("train", "validation")}
    assert persons["validation"] and not persons["train"] & persons["validation"]
    assert max(max(s["shard_lengths"]) for s in info["splits"].values()) <= 8
    assert info["splits"]["train"]["num_samples"] + info["splits"]["validation"]["num_samples"] == 70
    assert sum(info["label_counts"]["train"].values()) == info["splits"]["train"]["num_samples"]
    assert info["params"] == {"layout": "mask", "val_fraction": 0.2, "seed": 0, "resize": None, "quality": 95,
                              "samples_per_shard": 8, "as_split": None, "age_bins": [30, 60], "dup_threshold": 14}
    assert set(info["sha256"]) == {p.name for p in out.glob("*.tar")}
    assert not (out / "_rejected.jsonl").exists()


def test_webdataset_reads_the_shards(raw, tmp_path):
    out = tmp_path / "out"
    run(raw, out)
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    assert len(samples) == 70
    for s in samples:
        assert int(s["cls"]) == label_from_meta(json.loads(s["json"]))
        assert ("jpg" in s) != ("png" in s)


def test_timm_reads_the_shard_set(raw, tmp_path):
    from timm.data import create_dataset

    out = tmp_path / "out"
    info = run(raw, out, samples_per_shard=16)
    ds = create_dataset("wds/out", root=str(out), split="train")
    items = list(ds)
    assert len(items) == info["splits"]["train"]["num_samples"]
    img, target = items[0]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and 0 <= target < 18
    val = create_dataset("wds/out", root=str(out), split="validation")
    assert sorted(t for _, t in val) == sorted(
        int(c) for c, n in info["label_counts"]["validation"].items() for _ in range(n))


def test_default_shard_count_rule():
    assert shard_sizes(100, None) == [17] * 4 + [16] * 2  # small sets: few shards of >= 16 samples
    assert shard_sizes(10, None) == [10]
    assert shard_sizes(1023, None) == [17] * 15 + [16] * 48 and len(shard_sizes(1024, None)) == 64
    assert len(shard_sizes(15120, None)) == 64 and max(shard_sizes(15120, None)) == 237
    assert len(shard_sizes(200_000, None)) == 200 and max(shard_sizes(200_000, None)) == 1000
    assert shard_sizes(168, 25) == [24] * 7
    assert shard_sizes(0, None) == []


def test_resize_shrinks_never_enlarges(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "big.jpg").write_bytes(image_bytes(1, "JPEG", (96, 64)))
    (root / "a" / "small.jpg").write_bytes(image_bytes(2, "JPEG", (20, 30)))
    (root / "b" / "alpha.png").write_bytes(image_bytes(3, "PNG", (64, 128), "RGBA"))
    (root / "b" / "gray.bmp").write_bytes(image_bytes(4, "BMP", (50, 50), "L"))
    run(root, tmp_path / "o", resize=32, as_split="test", quality=80)
    got = {}
    for files in members(tmp_path / "o").values():
        for name, data in files.items():
            if name.endswith(".jpg"):
                im = Image.open(io.BytesIO(data))
                got[name] = (im.format, im.mode, im.size)
            assert not name.endswith(".png")
    assert got == {"a/big.jpg": ("JPEG", "RGB", (48, 32)), "a/small.jpg": ("JPEG", "RGB", (20, 30)),
                   "b/alpha.jpg": ("JPEG", "RGB", (32, 64)), "b/gray.jpg": ("JPEG", "RGB", (32, 32))}


def test_as_split_keeps_labels_and_other_formats_become_png(tmp_path):
    root = tmp_path / "holdout"
    for i, cls in enumerate(("b", "a")):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.webp").write_bytes(image_bytes(i, "WEBP"))
        (root / cls / "y.jpg").write_bytes(image_bytes(i + 5))
    info = run(root, tmp_path / "o", as_split="test")
    assert list(info["splits"]) == ["test"] and info["label_counts"]["test"] == {"0": 2, "1": 2}
    files = {k: v for f in members(tmp_path / "o").values() for k, v in f.items()}
    assert files["a/x.cls"] == b"0" and files["b/y.cls"] == b"1"
    assert Image.open(io.BytesIO(files["a/x.png"])).format == "PNG"
    assert files["b/y.jpg"] == (root / "b" / "y.jpg").read_bytes()


def test_mask_eval_is_unlabeled_test_in_info_csv_order(tmp_path):
    ids = [f"{c}{i}.jpg" for i, c in enumerate("zyxwvutsrq")]
    root = make_eval_set(tmp_path / "eval", ids)
    info = run(root, tmp_path / "o", samples_per_shard=3)
    assert list(info["splits"]) == ["test"] and info["label_counts"] == {}
    samples = list(wds.WebDataset([str(tmp_path / "o" / f) for f in info["splits"]["test"]["filenames"]],
                                  shardshuffle=False))
    assert [json.loads(s["json"]) for s in samples] == [{"image_id": x, "index": i} for i, x in enumerate(ids)]
    assert all("cls" not in s for s in samples)


def test_idempotent_rerun_refusal_and_overwrite(raw, tmp_path, capsys):
    out = tmp_path / "out"
    run(raw, out, samples_per_shard=5)
    before = file_state(out)
    capsys.readouterr()
    info = run(raw, out, samples_per_shard=5)
    assert "up to date" in capsys.readouterr().out
    assert file_state(out) == before and info == json.loads((out / "_info.json").read_text())

    with pytest.raises(SystemExit) as e:
        main(["--src", str(raw), "--out", str(out), "--samples-per-shard", "50", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "samples_per_shard 5 -> 50" in err and "--overwrite" in err
    assert file_state(out) == before

    img = next((raw / "images").glob("*/mask1.jpg"))
    img.write_bytes(image_bytes(999))
    with pytest.raises(SystemExit):
        main(["--src", str(raw), "--out", str(out), "--samples-per-shard", "5", "--quiet"])
    assert "source files changed" in capsys.readouterr().err

    info = run(raw, out, samples_per_shard=50, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "validation-000000.tar"]
    assert set(info["sha256"]) == {"train-000000.tar", "validation-000000.tar"}
    before = file_state(out)
    (out / "train-000000.tar").write_bytes(b"damaged")
    assert not inspect(out)[1]
    assert run(raw, out, samples_per_shard=50, overwrite=True) == info  # --overwrite always rebuilds
    assert inspect(out)[1] and file_state(out) != before


def test_interrupted_write_leaves_no_finished_set(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(raw, out, samples_per_shard=5)
    real = Spool.member
    calls = []

    def dying(self, key, source):  # the write pass, reading the members the check pass spooled
        calls.append(key)
        if len(calls) == 23:
            raise KeyboardInterrupt
        return real(self, key, source)

    monkeypatch.setattr(Spool, "member", dying)
    with pytest.raises(KeyboardInterrupt):
        run(raw, out, samples_per_shard=10, overwrite=True)
    assert not (out / "_info.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for p in out.glob("*.tar"):  # whatever carries a final name is a complete tar
        with tarfile.open(p) as tar:
            assert len(tar.getmembers()) % 3 == 0
    monkeypatch.setattr(Spool, "member", real)

    (out / ".train-000000.tar.x1y2.tmp").write_bytes(b"half a tar from a killed run")
    info = run(raw, out, samples_per_shard=10)  # no --overwrite needed: there was no finished set
    fresh = run(raw, tmp_path / "fresh", samples_per_shard=10)
    assert info["sha256"] == fresh["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())


def test_small_sets_get_few_shards_of_reasonable_size(raw_mask, tmp_path):
    """210 images (30 persons): a handful of shards per split, none near-empty, folds or not."""
    for folds in (0, 5):
        info = write_shards(raw_mask / "train", tmp_path / f"f{folds}", workers=1, progress=False, resize=8,
                            folds=folds)
        lengths = {name: s["shard_lengths"] for name, s in info["splits"].items()}
        assert sum(map(sum, lengths.values())) == 210
        assert lengths == {"train": shard_sizes(168, None), "validation": shard_sizes(42, None)}
        assert len(lengths["train"]) == 10 and len(lengths["validation"]) == 2
        assert min(min(v) for v in lengths.values()) >= 16


def test_deterministic_across_runs_and_workers(raw, tmp_path):
    a = write_shards(raw, tmp_path / "a", workers=1, progress=False, resize=16)
    b = write_shards(raw, tmp_path / "b", workers=2, progress=False, resize=16)
    assert a["sha256"] == b["sha256"]
    for name in a["sha256"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        m = tar.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
    # train is shuffled at write time (shards mix persons), validation keeps the source order
    order = {split: [m.rsplit(".", 1)[0] for f in a["splits"][split]["filenames"]
                     for m in members(tmp_path / "a")[f] if m.endswith(".json")] for split in a["splits"]}
    assert order["train"] != sorted(order["train"]) and order["validation"] == sorted(order["validation"])
    c = run(raw, tmp_path / "c", seed=1, resize=16)
    assert c["sha256"] != a["sha256"]


def test_inspect_detects_tampering(raw, tmp_path, capsys):
    out = tmp_path / "out"
    run(raw, out)
    info, ok = inspect(out)
    assert ok and info["rejected"] == 0
    main(["--inspect", str(out)])
    assert "checksums ok" in capsys.readouterr().out
    victim = out / "validation-000000.tar"
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["--inspect", str(out)])
    assert e.value.code == 1
    assert "MISMATCH validation-000000.tar" in capsys.readouterr().out


def test_corrupt_image_rejected_or_strict(raw, tmp_path, capsys):
    folder = person_folder(*demo_persons(3)[2])
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(noise, format="JPEG")
    # header intact, scan data cut: Image.verify() passes this, only decoding finds it
    (raw / "images" / folder / "mask3.jpg").write_bytes(noise.getvalue()[: len(noise.getvalue()) * 7 // 10])
    (raw / "images" / folder / "mask4.jpg").write_bytes(b"not an image at all")
    with pytest.raises(SystemExit) as e:
        main(["--src", str(raw), "--out", str(tmp_path / "strict"), "--strict", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "2 unreadable" in err and f"{folder}/mask3.jpg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "strict").exists()

    info = run(raw, tmp_path / "out")
    assert info["rejected"] == 2 and sum(s["num_samples"] for s in info["splits"].values()) == 68
    rejected = [json.loads(x) for x in (tmp_path / "out" / "_rejected.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejected] == [f"{folder}/mask3.jpg", f"{folder}/mask4.jpg"]
    assert all(r["reason"] for r in rejected)
    keys = {m.rsplit(".", 1)[0] for f in members(tmp_path / "out").values() for m in f}
    assert f"{folder}/mask3" not in keys and f"{folder}/mask2" in keys


@pytest.mark.parametrize("case", ["missing_csv", "empty_folder", "unknown_layout", "bad_option"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    src = tmp_path / "src"
    args = ["--src", str(src), "--out", str(tmp_path / "out"), "--quiet"]
    if case == "missing_csv":
        make_mask_set(src, demo_persons(2))
        (src / "train.csv").unlink()
        args += ["--layout", "mask"]
        expected = "train.csv"
    elif case == "empty_folder":
        src.mkdir()
        expected = str(src)
    elif case == "unknown_layout":
        make_mask_set(src, demo_persons(2))
        args += ["--layout", "imagenet"]
        expected = "imagenet"
    else:
        args += ["--val-fraction", "lots"]
        expected = "val-fraction"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_synthetic_dataset_with_its_quirks(raw_mask, tmp_path):
    """The synthetic competition set (train + eval) shards, and its junk is counted, not sharded."""
    info = write_shards(raw_mask, tmp_path / "t", workers=2, progress=False)
    assert info["layout"] == "mask" and sum(info["ignored"].values()) > 0
    assert len(info["splits"]["validation"]["filenames"]) >= 1
    ev = write_shards(raw_mask / "eval", tmp_path / "e", workers=1, progress=False)
    assert ev["layout"] == "mask-eval" and list(ev["splits"]) == ["test"]
    digest = hashlib.sha256((tmp_path / "t" / "train-000000.tar").read_bytes()).hexdigest()
    assert digest == info["sha256"]["train-000000.tar"]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert clips 16-bit pixels at 255 (a white image); the writer scales them to 8 bits."""
    ramp = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)  # 0..65472: mid-grey on average
    root = tmp_path / "f"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(ramp).save(root / cls / "png16.png")
        Image.fromarray(ramp).save(root / cls / "tif16.tif")

    def stored(resize: int | None) -> dict[str, bytes]:
        out = tmp_path / f"out{resize}"
        run(root, out, resize=resize, as_split="test")
        return {n: d for f in members(out).values() for n, d in f.items()
                if n.startswith("a/") and n.endswith((".png", ".jpg"))}

    def grey(data: bytes) -> float:
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode in ("L", "RGB")
            return float(np.asarray(im.convert("L"), dtype=np.float64).mean())

    kept = stored(None)  # the 16-bit PNG goes in untouched; the TIFF becomes an 8-bit PNG
    assert set(kept) == {"a/png16.png", "a/tif16.png"}
    assert kept["a/png16.png"] == (root / "a" / "png16.png").read_bytes()
    assert 100 < grey(kept["a/tif16.png"]) < 155
    resized = stored(16)  # both re-encoded as 8-bit JPEG
    assert set(resized) == {"a/png16.jpg", "a/tif16.jpg"}
    assert all(100 < grey(d) < 155 for d in resized.values())


def test_float_images_in_zero_one_are_scaled_others_clipped(tmp_path):
    """A [0, 1] float TIFF (mode F) is scaled by 255, which PIL's convert would make black; a
    0-255 float TIFF is taken as it is."""
    ramp = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    root = tmp_path / "f"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(ramp).save(root / cls / "unit.tif")
        Image.fromarray(ramp * 255.0).save(root / cls / "bytes.tif")
    out = tmp_path / "out"
    run(root, out, as_split="test")
    greys = {}
    for n, d in (kv for f in members(out).values() for kv in f.items()):
        if n.startswith("a/") and n.endswith(".png"):
            with Image.open(io.BytesIO(d)) as im:
                greys[n] = np.asarray(im.convert("L"), dtype=np.float64)
    assert set(greys) == {"a/unit.png", "a/bytes.png"}
    assert np.array_equal(greys["a/unit.png"], greys["a/bytes.png"])
    assert greys["a/unit.png"].min() == 0 and greys["a/unit.png"].max() == 255


def test_a_full_size_set_of_large_images_says_to_resize(tmp_path):
    """Stored as they are, 1,200-px images are decoded whole every epoch: the writer says so and
    what to pass; with --resize, or with small images, it says nothing."""
    root = tmp_path / "f"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (1600, 1200), (60 * i, 90, 120)).save(root / cls / f"{i}.jpg")
    with pytest.warns(UserWarning, match=r"median shorter side 1200 px.*22x the pixels of a --resize 256 set"):
        run(root, tmp_path / "full", as_split="test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(root, tmp_path / "small", as_split="test", resize=64)


# Every argument recorded in _info.json "params" (layout aside: it is also part of the source
# fingerprint), with a base that sets --resize so that --quality matters.
REFUSAL_BASE = dict(resize=16, quality=80, samples_per_shard=10, seed=0, val_fraction=0.2, age_bins="30,60")
CHANGED_ARGS = [
    ({"resize": 24}, "resize 16 -> 24"),
    ({"resize": None}, "resize 16 -> None"),
    ({"quality": 81}, "quality 80 -> 81"),
    ({"seed": 1}, "seed 0 -> 1"),
    ({"val_fraction": 0.25}, "val_fraction 0.2 -> 0.25"),
    ({"samples_per_shard": 11}, "samples_per_shard 10 -> 11"),
    ({"samples_per_shard": None}, "samples_per_shard 10 -> None"),
    ({"as_split": "test"}, "as_split None -> 'test'"),
    ({"age_bins": "30,61"}, "age_bins [30, 60] -> [30, 61]"),
    ({"folds": 3}, "folds None -> 3"),
    ({"dup_threshold": 8}, "dup_threshold 14 -> 8"),
]


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory) -> Path:
    """6 persons, 42 images of 32x32 px: enough for a train and a validation split."""
    return make_mask_set(tmp_path_factory.mktemp("small") / "train", demo_persons(6))


def snapshot(out: Path) -> dict[str, tuple[int, int, str]]:
    """Every file of OUT with its mtime, size and content hash."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.iterdir())}


def test_rerun_with_the_recorded_arguments_is_up_to_date(small_raw, tmp_path, capsys):
    out = tmp_path / "out"
    info = run(small_raw, out, **REFUSAL_BASE)
    assert info["params"] == {"layout": "mask", "val_fraction": 0.2, "seed": 0, "resize": 16, "quality": 80,
                              "samples_per_shard": 10, "as_split": None, "age_bins": [30, 60], "dup_threshold": 14}
    before = snapshot(out)
    capsys.readouterr()
    assert run(small_raw, out, **REFUSAL_BASE) == info
    assert "up to date" in capsys.readouterr().out
    assert snapshot(out) == before


@pytest.mark.parametrize("change, named", CHANGED_ARGS, ids=[c[1].split(" ")[0] + "=" + str(list(c[0].values())[0])
                                                         for c in CHANGED_ARGS])
def test_rerun_with_any_other_recorded_argument_is_refused(small_raw, tmp_path, change, named):
    """Not "up to date": the refusal names exactly the changed argument and nothing is written."""
    out = tmp_path / "out"
    run(small_raw, out, **REFUSAL_BASE)
    before = snapshot(out)
    with pytest.raises(UserError) as e:
        run(small_raw, out, **{**REFUSAL_BASE, **change})
    assert str(e.value) == f"{out}: holds a shard set made differently ({named}); pass --overwrite to replace it"
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- --classes-from
def class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """One folder per class holding N distinct 16 px noise images."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def shard(*args: object) -> None:
    main([*map(str, args), "--workers", "1", "--quiet"])


def test_classes_from_numbers_a_holdout_set_like_the_training_set(tmp_path, capsys):
    """The hold-out set lacks `dog`: its classes are still cat, dog, eel (dog with 0 images), the
    class list is a recorded param (rerun: up to date; another list: refused), and a set sharded
    without the flag records no such param."""
    train, out = tmp_path / "train_set", tmp_path / "hold_set"
    shard("--src", class_folders(tmp_path / "train", {"cat": 2, "dog": 2, "eel": 2}), "--out", train,
          "--val-fraction", "0")
    assert "classes" not in json.loads((train / "_info.json").read_text())["params"]
    hold = class_folders(tmp_path / "hold", {"eel": 2, "cat": 1}, seed=1)
    shard("--src", hold, "--out", out, "--classes-from", train, "--as-split", "test")
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"] == ["cat", "dog", "eel"] and info["params"]["classes"] == ["cat", "dog", "eel"]
    assert info["label_counts"] == {"test": {"0": 1, "1": 0, "2": 2}}
    files = {k: v for f in members(out).values() for k, v in f.items()}
    assert files["eel/0.cls"] == files["eel/1.cls"] == b"2" and files["cat/0.cls"] == b"0"
    capsys.readouterr()
    main(["--inspect", str(out)])  # no SystemExit: the checksums verify
    assert any(line.split() == ["dog", "0"] for line in capsys.readouterr().out.splitlines())

    before = snapshot(out)
    shard("--src", hold, "--out", out, "--classes-from", train, "--as-split", "test")
    assert "up to date" in capsys.readouterr().out and snapshot(out) == before
    other = tmp_path / "other_set"
    shard("--src", class_folders(tmp_path / "other", {"cat": 1, "eel": 1, "fox": 1}), "--out", other,
          "--as-split", "train")
    for flags, change in ((["--classes-from", other], "classes ['cat', 'dog', 'eel'] -> ['cat', 'eel', 'fox']"),
                          ([], "classes ['cat', 'dog', 'eel'] -> None")):
        with pytest.raises(SystemExit) as e:
            shard("--src", hold, "--out", out, "--as-split", "test", *flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and change in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
        assert snapshot(out) == before
    shard("--src", hold, "--out", out, "--as-split", "test", "--overwrite")
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"] == ["cat", "eel"] and "classes" not in info["params"]


@pytest.mark.parametrize("case", ["unknown_folder", "mask_layout", "not_a_shard_set", "no_class_names"])
def test_classes_from_refusals_are_one_line(tmp_path, capsys, case):
    train = tmp_path / "train_set"
    shard("--src", class_folders(tmp_path / "train", {"cat": 1, "dog": 1, "eel": 1}), "--out", train,
          "--val-fraction", "0")
    src = tmp_path / "src"
    if case == "unknown_folder":
        class_folders(src, {"cat": 1, "cow": 1, "eel": 1})
        expected = f"{src}: class folder(s) cow not among the 3 classes of --classes-from (cat, dog, eel)"
    elif case == "mask_layout":
        make_mask_set(src, demo_persons(2))
        expected = f"--classes-from: {src} is a mask-layout set"
    elif case == "not_a_shard_set":
        class_folders(src, {"cat": 1})
        train = tmp_path / "train"  # the raw folders, not their shards
        expected = f"--classes-from {train}: no _info.json"
    else:
        class_folders(src, {"cat": 1})
        train = tmp_path / "unlabeled"
        train.mkdir()
        (train / "_info.json").write_text(json.dumps({"classes": [], "splits": {}}))
        expected = f"--classes-from {train}: the shard set has no class names"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        shard("--src", src, "--out", tmp_path / "out", "--classes-from", train)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()
