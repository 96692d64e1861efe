"""Images and tars from someone else (issue 20, `trust.media`): image sizes read from headers and
bounded before decoding, tar members filtered (links, devices, sparse, oversized, escaping
names), compressed / missing / non-tar shards one line. Every file is crafted here."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import dist_train.data.readers as readers
from dist_train import run, shard
from dist_train.errors import UserError
from dist_train.shardset.format import load_info
from dist_train.trust import media, tarheader
from test_bad_input import BASE, assert_one_line, call
from test_data import LENGTHS7, epoch_batches, eval_loader, train_loader, write_set

BOMB_SIDE = 30000


def bomb_jpeg(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A valid 8x8 JPEG whose frame header (SOF0) is patched to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG", quality=50)
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encoded(fmt: str, size: tuple[int, int] = (37, 23), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, format=fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- image headers
@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}),
                                    ("WEBP", {"lossless": True}), ("WEBP", {"quality": 50}), ("GIF", {}),
                                    ("BMP", {}), ("TIFF", {})])
def test_image_size_is_read_from_the_header(fmt, kw):
    assert media.image_size(encoded(fmt, **kw)) == (fmt, 37, 23)


def test_webp_extended_header():
    im = Image.new("RGBA", (300, 200), (0, 0, 255, 128))  # alpha: PIL writes a VP8X chunk
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=50)
    assert buf.getvalue()[12:16] == b"VP8X" and media.image_size(buf.getvalue()) == ("WEBP", 300, 200)


def test_declared_size_over_the_bound_is_refused_without_decoding():
    data = bomb_jpeg()
    assert len(data) < 1000 and media.image_size(data) == ("JPEG", BOMB_SIDE, BOMB_SIDE)
    with pytest.raises(media.ImageRefused, match="30000x30000 = 900,000,000 pixels.*not decoded"):
        media.check_image_bytes(data, media.max_pixels_for(224))
    assert media.max_pixels_for(224) == media.DEFAULT_MAX_PIXELS
    assert media.max_pixels_for(1024) == 1024 * 1024**2  # 32x the side of a large model input
    with pytest.raises(media.ImageRefused, match="GIF data; expected JPEG or PNG"):
        media.check_image_bytes(encoded("GIF"), 10**9, ("JPEG", "PNG"))
    for junk in (b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"not an image at all"):
        with pytest.raises(media.ImageRefused):
            media.image_size(junk)


def test_bomb_in_a_shard_set_is_a_bad_sample_never_decoded(tmp_path, monkeypatch):
    bombs = {3: bomb_jpeg(), 20: bomb_jpeg(65000, 65000)}
    root = write_set(tmp_path / "s", {"train": LENGTHS7}, corrupt=bombs)
    decoded = []
    real = readers.decode_rgb
    monkeypatch.setattr(readers, "decode_rgb", lambda data: decoded.append(len(data)) or real(data))
    loader = train_loader(root, batch_size=4)
    with pytest.warns(UserWarning, match="30000x30000"):
        batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) and loader.bad_samples == 2
    ev = eval_loader(root, "train")
    with pytest.warns(UserWarning, match="65000x65000"):
        keys = [k for b in ev for k in b["key"]]
    assert ev.bad_samples == 2 and len(keys) == 46
    assert decoded and all(n != len(bombs[3]) for n in decoded)


def test_bomb_is_rejected_at_shard_time_without_decoding(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            (src / c / f"{i}.png").write_bytes(encoded("PNG", (16, 16)))
    (src / "a" / "bomb.jpg").write_bytes(bomb_jpeg())
    loads = []
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: loads.append(im.size) or real(im))
    shard.main(["--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"])
    rejected = [json.loads(x) for x in (tmp_path / "out" / "_rejected.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejected] == ["a/bomb.jpg"] and "not decoded" in rejected[0]["reason"]
    assert (BOMB_SIDE, BOMB_SIDE) not in loads
    # the bound is a flag, checked like every other number
    code, err = call(shard.main, ["--src", str(src), "--out", str(tmp_path / "o2"), "--max-image-pixels", "0"], capsys)
    assert_one_line(code, err, "--max-image-pixels 0: expected a positive number")


# ----------------------------------------------------------------------------- tar members
def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def _sample(tar: tarfile.TarFile, key: str, k: int, image: bytes | None = None) -> None:
    _member(tar, f"{key}.jpg", image if image is not None else encoded("JPEG", (20, 20)))
    _member(tar, f"{key}.cls", str(k % 3).encode())
    _member(tar, f"{key}.json", json.dumps({"idx": k}).encode())


def _sparse(tar: tarfile.TarFile, name: str) -> None:
    """A PAX (GNU 0.1) sparse member: 10 bytes stored, 3 GiB declared (reading it would make them)."""
    sparse = tarfile.TarInfo(name)
    sparse.size = 10
    sparse.pax_headers = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": name,
                          "GNU.sparse.size": str(3 << 30), "GNU.sparse.map": "0,10"}
    tar.addfile(sparse, io.BytesIO(b"\xff" * 10))


def test_ten_kilobyte_sparse_tar_is_not_inflated(tmp_path):
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _sparse(tar, "k.jpg")
    assert path.stat().st_size <= 10240
    with tarfile.open(path) as tar:  # what tarfile (and webdataset) would read: 3 GiB of zeros
        assert tar.getmember("k.jpg").size == 3 << 30
    (sample,) = media.tar_samples([str(path)], handler=lambda e: pytest.fail(str(e)))
    assert sample["__key__"] == "k" and "jpg" not in sample and "sparse" in media.refused(sample)


def crafted_set(root: Path) -> Path:
    """One shard of 8 samples, 5 of them crafted: a sparse member declaring 3 GiB, a symlink, a
    hardlink, an absolute name and a '..' name (each with its cls/json members)."""
    root.mkdir(parents=True)
    with tarfile.open(root / "train-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        _sample(tar, "good_0", 0)
        _sparse(tar, "sparse.jpg")
        _member(tar, "sparse.cls", b"1")
        _member(tar, "sparse.json", b'{"idx": 1}')
        _sample(tar, "good_2", 2)
        _member(tar, "symlink.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _member(tar, "symlink.cls", b"0")
        _member(tar, "symlink.json", b'{"idx": 3}')
        _member(tar, "hardlink.jpg", type=tarfile.LNKTYPE, linkname="good_0.jpg")
        _member(tar, "hardlink.cls", b"1")
        _member(tar, "hardlink.json", b'{"idx": 4}')
        _sample(tar, "/abs/x", 5)
        _sample(tar, "../up", 6)
        _sample(tar, "good_7", 7)
    info = {"name": "t", "layout": "folder", "classes": ["c0", "c1", "c2"],
            "splits": {"train": {"name": "train", "num_samples": 8, "filenames": ["train-000000.tar"],
                                 "shard_lengths": [8]}},
            "label_counts": {"train": {"0": 3, "1": 3, "2": 2}}}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def test_crafted_members_are_bad_samples(tmp_path):
    root = crafted_set(tmp_path / "s")
    samples = list(media.tar_samples([str(root / "train-000000.tar")], handler=lambda e: pytest.fail(str(e))))
    assert len(samples) == 8
    reasons = [media.refused(s) or "" for s in samples]
    assert "sparse (declares 3,221,225,472 bytes)" in reasons[1]
    assert "is a link" in reasons[3] and "is a link" in reasons[4]
    assert "absolute or has '..'" in reasons[5] and "absolute or has '..'" in reasons[6]
    assert [i for i, r in enumerate(reasons) if not r] == [0, 2, 7]
    ev = eval_loader(root, "train", batch_size=2)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        keys = [k for b in ev for k in b["key"]]
    assert keys == ["good_0", "good_2", "good_7"] and ev.bad_samples == 5
    loader = train_loader(root, batch_size=2, shuffle_buffer=8)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) == 4 and loader.bad_samples == 5
    assert sorted({int(t) for _, targets in batches for t in targets}) == [0, 2, 7]


def test_oversized_pax_header_ends_the_shard_unread(tmp_path, monkeypatch):
    """tarfile reads a PAX header whole, whatever it declares: one over the cap ends the shard as a
    broken tar (the handler gets it) and is never read; a normal PAX header still works."""
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, comment in (("a.cls", "ok"), ("b.cls", "x" * 300_000)):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = 1, {"comment": comment}
            tar.addfile(info, io.BytesIO(b"1"))
    monkeypatch.setattr(tarheader, "MAX_TAR_HEADER_BYTES", 100_000)
    errors: list[Exception] = []
    members = list(media.tar_members(str(path), handler=lambda e: errors.append(e) or True))
    assert [m[0] for m in members] == ["a.cls"] and len(errors) == 1
    assert "extended (PAX/GNU) header declares" in str(errors[0]) and "over the limit of 100,000" in str(errors[0])


def test_member_filter_devices_fifos_and_sizes():
    def info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        t = tarfile.TarInfo(name)
        t.size, t.type = size, kind
        return t

    assert media.member_problem(info("a.jpg", 100)) is None
    assert "device or FIFO" in media.member_problem(info("a.jpg", kind=tarfile.CHRTYPE))
    assert "device or FIFO" in media.member_problem(info("a.jpg", kind=tarfile.FIFOTYPE))
    assert "over the limit" in media.member_problem(info("a.jpg", media.MAX_IMAGE_BYTES + 1))
    assert "over the limit" in media.member_problem(info("a.json", media.MAX_META_BYTES + 1))
    assert "absolute" in media.member_problem(info("C:/x.jpg", 1))


@pytest.mark.parametrize("case", ["gzip", "missing", "not_a_tar", "empty"])
def test_broken_shard_is_one_line_naming_it(tmp_path, case):
    root = write_set(tmp_path / "s", {"train": [4, 4]})
    victim = root / "train-000001.tar"
    if case == "gzip":
        victim.write_bytes(gzip.compress(victim.read_bytes()))
        expected = "a gzip-compressed file, not a plain tar"
    elif case == "missing":
        victim.unlink()
        expected = "listed in the shard set's _info.json but missing"
    elif case == "not_a_tar":
        victim.write_bytes(b"<html>not found</html>" * 400)  # large enough for its 4 samples' count
        expected = "not a tar file"
    else:
        victim.write_bytes(b"")
        expected = "not a tar file|too small for the 4 samples"  # _info.json's counts are checked first
    for build in (train_loader, eval_loader):
        with pytest.raises(UserError, match=expected) as e:
            build(root, "train")
        assert victim.name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=expected):
        list(media.tar_samples([str(victim)], handler=lambda e: True))


def test_missing_shard_stops_training_with_one_line(mask_shards, tmp_path, capsys):
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(mask_shards, data)
    (data / "train-000002.tar").unlink()
    code, err = call(run.main, ["--data", str(data), "--output", str(tmp_path / "o"), *BASE], capsys)
    assert_one_line(code, err, "train-000002.tar", "missing")
    assert not (tmp_path / "o").exists()


def inspect_output(root: Path, capsys) -> tuple[int, str]:
    """(exit code, stdout) of `shard --inspect ROOT`."""
    try:
        shard.main(["--inspect", str(root)])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def test_inspect_checks_tar_structure_and_counts(tmp_path, capsys):
    root = write_set(tmp_path / "s", {"train": [4, 4]})
    info = json.loads((root / "_info.json").read_text())
    code, out = inspect_output(root, capsys)
    assert code == 1 and "checksums ok" not in out and "no checksums in _info.json: nothing verified" in out

    def sha(name: str) -> str:
        from dist_train.shardset.outdir import sha256_file

        return sha256_file(root / name)

    info["sha256"] = {f: sha(f) for f in info["splits"]["train"]["filenames"]}
    (root / "_info.json").write_text(json.dumps(info))
    code, out = inspect_output(root, capsys)
    assert code == 0 and "checksums ok, sample counts ok" in out

    info["splits"]["train"]["shard_lengths"] = [5, 3]  # the same total, wrong per shard
    (root / "_info.json").write_text(json.dumps(info))
    code, out = inspect_output(root, capsys)
    assert code == 1 and "COUNT    train-000000.tar: 4 samples, _info.json says 5" in out
    assert "checksums ok" not in out

    (root / "train-000001.tar").write_bytes(b"\0" * 8192)  # not a tar, checksum updated to match
    info["splits"]["train"]["shard_lengths"] = [4, 4]
    info["sha256"]["train-000001.tar"] = sha("train-000001.tar")
    (root / "_info.json").write_text(json.dumps(info))
    code, out = inspect_output(root, capsys)
    assert code == 1 and "NOT A TAR train-000001.tar" in out and "checksums ok" not in out
    assert load_info(str(root))  # the set itself still loads: the tars are what is wrong
