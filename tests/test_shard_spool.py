"""The shard writer's one decode pass: the members it spools are the bytes `encode_image` makes
from the file, the fingerprints those of a fresh decode, the spool never outlives the run."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dist_train.shardset import dedup, outdir, spool as spool_module
from dist_train.shardset import writer
from dist_train.shardset.duplicates import FINGERPRINTS_NAME, read_fingerprints
from dist_train.shardset.images import _to_rgb, check_and_encode, encode_image
from dist_train.shardset.writer import write_shards

# (name, size, mode, format): JPEGs at least twice the target (decoded again at a DCT scale by
# encode_image's draft) and below it, grey and CMYK JPEGs, RGBA and palette PNGs, TIFF, BMP, 16-bit PNG
IMAGES = [("big", (64, 48), "RGB", "JPEG"), ("edge", (42, 32), "RGB", "JPEG"), ("near", (31, 40), "RGB", "JPEG"),
          ("small", (12, 20), "RGB", "JPEG"), ("grey", (64, 64), "L", "JPEG"), ("cmyk", (48, 40), "CMYK", "JPEG"),
          ("alpha", (32, 24), "RGBA", "PNG"), ("pal", (30, 30), "P", "PNG"), ("tiff", (36, 20), "RGB", "TIFF"), ("bmp", (24, 32), "RGB", "BMP"),
          ("wide", (40, 32), "I;16", "PNG")]
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp"}


def _picture(seed: int, size: tuple[int, int], mode: str) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1) + rng.normal(0, 25, (h, w, 3))
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray((np.asarray(im.convert("L")).astype(np.uint16) * 257))
    return im.convert(mode)


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Two class folders of the images above (different pixels in each) and one unreadable file."""
    root = tmp_path / "src"
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i, (name, size, mode, fmt) in enumerate(IMAGES):
            _picture(10 * c + i, size, mode).save(root / cls / f"{name}{SUFFIX[fmt]}", format=fmt)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def _members(out: Path) -> dict[str, bytes]:
    found = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return found


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("resize", [16, None])
def test_one_pass_writes_encode_image_bytes_whatever_the_workers(mixed, tmp_path, resize):
    one = write_shards(mixed, tmp_path / "w1" / "set", resize=resize, quality=90, workers=1, progress=False)
    two = write_shards(mixed, tmp_path / "w2" / "set", resize=resize, quality=90, workers=2, progress=False)
    assert one["rejected"] == 1 and one["sha256"] == two["sha256"]
    files = _files(tmp_path / "w1" / "set")
    assert files == _files(tmp_path / "w2" / "set")  # tars, _info.json, fingerprints, rejected list, duplicates
    assert not [n for n in files if "spool" in n or n.endswith(".tmp")]
    members = _members(tmp_path / "w1" / "set")
    images = {n: data for n, data in members.items() if n.rsplit(".", 1)[1] in ("jpg", "png")}
    assert len(images) == 2 * len(IMAGES)
    for path in sorted(mixed.rglob("*")):
        if path.name != "broken.jpg" and path.is_file():
            ext, data = encode_image((str(path), resize, 90))
            assert images[f"{path.parent.name}/{path.stem}.{ext}"] == data, path.name
    fp, _ = read_fingerprints(tmp_path / "w1" / "set" / FINGERPRINTS_NAME)
    for key, exact, phash in zip(fp.key, fp.exact, fp.phash):
        path = next(mixed.glob(f"{key}.*"))
        with Image.open(path) as im:  # a fresh full decode, whatever the shard stores
            want = dedup.fingerprint(_to_rgb(im))
        assert (bytes(exact), int(phash)) == want[:2], key


def test_check_and_encode_one_decode(mixed, monkeypatch):
    """A JPEG is decoded in full once; a second, reduced-scale decode only where encode_image's is reduced."""
    decodes = []
    real_load = ImageFile.ImageFile.load

    def counting_load(im):
        if im.format == "JPEG" and im.tile:  # tiles left: this load decodes
            decodes.append(im.size)
        return real_load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    (why, fp, ext), data = check_and_encode((str(mixed / "a" / "near.jpg"), 10**6, 16, 90))
    assert why is None and ext == "jpg" and data and decodes == [(31, 40)]  # to 16x21: draft keeps the full scale
    for name, full, reduced in (("edge", (42, 32), (21, 16)), ("big", (64, 48), (32, 24))):
        decodes.clear()
        check_and_encode((str(mixed / "a" / f"{name}.jpg"), 10**6, 16, 90))
        assert decodes == [full, reduced]  # the full decode, then draft's scale for the resize
    decodes.clear()
    assert check_and_encode((str(mixed / "a" / "big.jpg"), 10**6, None, 90))[1] == b""  # the writer copies the file
    assert decodes == [(64, 48)]
    (why, fp, ext), data = check_and_encode((str(mixed / "b" / "broken.jpg"), 10**6, 16, 90))
    assert why and (fp, ext, data) == (None, None, b"")


def test_spool_lives_in_out_only_while_the_shards_are_written(mixed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = write_shards(mixed, out, resize=16, workers=1, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    seen = []
    real_member = spool_module.Spool.member

    def member(self, key, source):  # the write pass: the spool is in OUT under a temporary name
        seen.append(sorted(p.name for p in out.iterdir() if outdir.TMP_RE.match(p.name) and "_spool" in p.name))
        if len(seen) == 7:
            raise KeyboardInterrupt
        return real_member(self, key, source)

    monkeypatch.setattr(spool_module.Spool, "member", member)
    with pytest.raises(KeyboardInterrupt):
        write_shards(mixed, out, resize=16, samples_per_shard=3, workers=1, progress=False, overwrite=True)
    assert len(seen[0]) == 1 and seen[0][0].startswith("._spool.") and seen[-1] == seen[0]
    assert not (out / "_info.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(spool_module.Spool, "member", real_member)

    (out / "._spool.k1ll3d.tmp").write_bytes(b"spooled by a killed run")
    again = write_shards(mixed, out, resize=16, workers=1, progress=False)  # no finished set: no --overwrite
    assert again["sha256"] == first["sha256"] and sorted(p.name for p in out.iterdir()) == sorted(before)

    calls = []

    def dying(task):  # stopped in the check pass: the finished set is untouched
        calls.append(task)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return check_and_encode(task)

    monkeypatch.setattr(writer, "check_and_encode", dying)
    monkeypatch.setattr(writer, "_pool_map", lambda fn, items, *a: (fn(x) for x in items))
    state = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        write_shards(mixed, out, resize=16, samples_per_shard=3, workers=1, progress=False, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == state


def test_strict_with_resize_leaves_no_folder(mixed, tmp_path, capsys):
    from dist_train.shard import main

    with pytest.raises(SystemExit) as e:
        main(["--src", str(mixed), "--out", str(tmp_path / "new" / "set"), "--resize", "16", "--strict", "--quiet"])
    assert e.value.code == 2 and "1 unreadable image(s): b/broken.jpg" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_spool_keeps_only_an_index(tmp_path):
    """Members go to the file as they come; memory holds offsets and lengths."""
    with spool_module.Spool(tmp_path / "o") as sp:
        sp.add("k0", "jpg", b"\x01" * 1000)
        sp.add("k1", "png", b"")
        sp.add("k2", "jpg", b"\x02" * 10)
        sp.finish()
        assert (tmp_path / "o" / sp.name).stat().st_size == 1010 and list(sp.length) == [1000, 0, 10]
        (tmp_path / "src.png").write_bytes(b"png bytes")
        assert sp.member("k2", tmp_path / "x") == ("jpg", b"\x02" * 10)
        assert sp.member("k1", tmp_path / "src.png") == ("png", b"png bytes")
        name = sp.name
    assert not (tmp_path / "o" / name).exists() and (tmp_path / "o").is_dir()
