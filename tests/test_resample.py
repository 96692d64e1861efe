"""The compiled resize (`shardset.resample`, issue 22): Pillow's pixels bit for bit, whichever way
the writer gets there, so its shards stay the bytes a plain-PIL pipeline stores; and the tar
headers the write pass builds itself are tarfile's."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from dist_train.shardset import resample, tars
from dist_train.shardset.writer import write_shards
from test_shard_spool import _files, mixed  # noqa: F401 (mixed: the fixture of mixed formats)

pytestmark = pytest.mark.skipif(not resample.HAVE_NUMBA, reason="numba is a dependency; absent only in odd envs")


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """Gradients, noise and hard edges: every tap of every filter matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, ((x // 3 + y // 5) % 2) * 255], -1) + rng.normal(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


# (source, target) sizes: both axes down (1.5x as the writer; height much more than width, where
# Pillow 13 runs the vertical pass first), one axis only, up, mixed, to 1 pixel
SIZES = [((48, 64), (32, 43)), ((48, 64), (40, 9)), ((48, 64), (12, 60)), ((48, 64), (48, 20)), ((48, 64), (30, 64)),
         ((37, 53), (80, 90)), ((37, 53), (70, 20)), ((37, 53), (1, 1)), ((5, 3), (2, 7))]


@pytest.mark.parametrize("method", sorted(resample.FILTERS))
def test_compiled_resize_gives_pillows_pixels(method):
    pil_filter = resample.FILTERS[method][1]
    for i, (src, dst) in enumerate(SIZES):
        im = _photo(*src, seed=i)
        want = im.resize(dst, pil_filter)
        got = resample.resize_array(np.asarray(im), dst, method)
        assert np.array_equal(got, np.asarray(want)), (src, dst)
        mirrored = resample.resize_array(np.asarray(im), dst, method, flip=True)
        assert np.array_equal(mirrored, np.asarray(want.transpose(Image.Transpose.FLIP_LEFT_RIGHT))), (src, dst)
        grey = im.convert("L")  # one channel
        got = resample.resize_array(np.asarray(grey)[:, :, None], dst, method)[:, :, 0]
        assert np.array_equal(got, np.asarray(grey.resize(dst, pil_filter))), (src, dst)
    crop = np.asarray(_photo(48, 64, seed=9))[5:50, 7:40]  # a strided view, as a crop is
    assert np.array_equal(resample.resize_array(crop, (20, 30), method),
                          np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((20, 30), pil_filter)))


def test_a_process_switches_to_the_kernels_after_enough_images(monkeypatch):
    monkeypatch.setattr(resample, "COMPILE_AFTER", 3)
    monkeypatch.setitem(resample._state, "resized", 0)
    calls = []
    real = resample.resize_array
    monkeypatch.setattr(resample, "resize_array", lambda *a, **k: calls.append(1) or real(*a, **k))
    im = _photo(48, 64, seed=1)
    outs = [resample.resize(im, (32, 43)) for _ in range(5)]
    assert len(calls) == 2  # Pillow for the first 3, the kernels after
    assert all(np.array_equal(np.asarray(o), np.asarray(outs[0])) for o in outs)
    assert resample.resize(im.convert("RGBA"), (32, 43)).mode == "RGBA" and len(calls) == 2  # other modes: Pillow
    monkeypatch.setitem(resample._state, "resized", 0)
    resample.use_compiled()  # a long job: from the next image on
    resample.resize(im, (32, 43))
    assert len(calls) == 3


def test_a_long_job_writes_the_bytes_pillow_alone_writes(mixed, tmp_path, monkeypatch):  # noqa: F811
    """Workers told the job is long resize with the kernels from their first image; the shards,
    fingerprints and _info.json are those of Pillow alone (numba hidden), in-process and in workers."""
    with monkeypatch.context() as m:
        m.setattr(resample, "HAVE_NUMBA", False)
        write_shards(mixed, tmp_path / "pil" / "set", resize=20, quality=90, workers=1, progress=False)
    monkeypatch.setattr(resample, "COMPILE_JOB", 1)
    monkeypatch.setitem(resample._state, "resized", 0)
    calls = []
    real = resample.resize_array
    monkeypatch.setattr(resample, "resize_array", lambda *a, **k: calls.append(1) or real(*a, **k))
    write_shards(mixed, tmp_path / "jit1" / "set", resize=20, quality=90, workers=1, progress=False)
    assert len(calls) >= 10  # in this process: every RGB/L image larger than 20 px
    write_shards(mixed, tmp_path / "jit2" / "set", resize=20, quality=90, workers=2, progress=False)
    pil = _files(tmp_path / "pil" / "set")
    assert _files(tmp_path / "jit1" / "set") == pil and _files(tmp_path / "jit2" / "set") == pil


def test_numba_missing_leaves_pillow(monkeypatch):
    monkeypatch.setitem(resample._state, "kernels", False)  # its import failed
    monkeypatch.setitem(resample._state, "resized", resample.COMPILE_AFTER)
    im = _photo(48, 64, seed=2)
    assert np.array_equal(np.asarray(resample.resize(im, (32, 43))),
                          np.asarray(im.resize((32, 43), Image.Resampling.LANCZOS)))


def _tar_bytes(members: list[tuple[str, bytes]], fast: bool, monkeypatch) -> bytes:
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(tars, "_header", lambda name, size: None)
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                tars._tar_member(tar, name, data)
    return buf.getvalue()


def test_write_pass_headers_are_tarfiles(monkeypatch):
    rng = np.random.default_rng(0)
    members = [("k" * n + ".jpg", rng.bytes(size)) for n, size in
               [(1, 0), (5, 1), (20, 511), (30, 512), (40, 513), (95, 1000), (96, 3), (99, 7), (120, 5), (3, 70000)]]
    members += [("ümlaut/ß.jpg", b"x"), ("tab\there.json", b"{}"), ("dir/sub/a.cls", b"3")]
    fast = _tar_bytes(members, True, monkeypatch)
    assert fast == _tar_bytes(members, False, monkeypatch)
    assert tars._header("ümlaut.jpg", 1) is None and tars._header("x" * 100, 1) is None  # left to tarfile
    with tarfile.open(fileobj=io.BytesIO(fast)) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == members
