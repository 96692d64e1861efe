"""The fast path of tar reading (`trust.tarheader`, issue 22): every shard, whole, truncated at any
byte or damaged, reads exactly as through `tarfile` alone (same members, data, refusals, errors)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from dist_train.trust import media
from dist_train.trust.tarheader import plain_header
from test_untrusted_media import _member as _add  # one tar member with any header fields


def _tar(fmt: int) -> bytes:
    """Plain members first and last, everything the fast path leaves to tarfile in between."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        _add(tar, "a/k1.jpg", b"\xff\xd8\xff" + b"x" * 700)
        _add(tar, "a/k1.cls", b"3")
        _add(tar, "a/k1.json", b"{}")
        _add(tar, "__meta__", b"m" * 10)
        _add(tar, "empty.cls")
        _add(tar, "/abs.cls", b"1")
        _add(tar, "p" * 120 + "/k2.jpg", b"y" * 513)  # ustar prefix, GNU longname or pax path
        _add(tar, "k3.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "dir", type=tarfile.DIRTYPE)
        if fmt == tarfile.PAX_FORMAT:
            _add(tar, "naïve.jpg", b"z" * 100)  # a pax header for the name
        _add(tar, "k4.cls", b"7")
        _add(tar, "k4.jpg", b"w" * 1024)
    return buf.getvalue()


def _read(path: Path) -> tuple[list, list[str]]:
    errors: list[str] = []
    members = list(media.tar_members(str(path), handler=lambda e: errors.append(str(e)) or True))
    return members, errors


def _both(path: Path, monkeypatch) -> tuple[tuple, tuple]:
    fast = _read(path)
    with monkeypatch.context() as m:
        m.setattr(media, "plain_header", lambda block: None)  # tarfile reads everything
        slow = _read(path)
    return fast, slow


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_path_reads_as_tarfile_whole_and_truncated(tmp_path, monkeypatch, fmt):
    data = _tar(fmt)
    path = tmp_path / "train-000000.tar"
    path.write_bytes(data)
    (fast, slow) = _both(path, monkeypatch)
    assert fast == slow and not fast[1]
    names = [m[0] for m in fast[0]]
    assert names[:3] == ["a/k1.jpg", "a/k1.cls", "a/k1.json"] and names[-2:] == ["k4.cls", "k4.jpg"]
    assert "__meta__" not in names and "p" * 120 + "/k2.jpg" in names
    cuts = {*range(512, len(data), 397), *(b + d for b in range(1024, len(data), 512) for d in (-1, 0, 1))}
    for cut in sorted(cuts):  # from the first header on (a cut inside it is a UserError before reading)
        path.write_bytes(data[:cut])
        fast, slow = _both(path, monkeypatch)
        assert fast == slow, cut


def test_fast_path_damaged_headers_read_as_tarfile(tmp_path, monkeypatch):
    data = bytearray(_tar(tarfile.USTAR_FORMAT))
    path = tmp_path / "train-000000.tar"
    headers = [i for i in range(0, len(data), 512) if plain_header(bytes(data[i:i + 512]))]
    assert len(headers) >= 6
    for at in (headers[1], headers[3]):  # the first header is checked before reading (a UserError)
        for offset, byte in ((148, ord("7")), (124, ord("9")), (156, ord("2")), (0, ord("/"))):
            damaged = bytearray(data)
            damaged[at + offset] = byte
            path.write_bytes(bytes(damaged))
            fast, slow = _both(path, monkeypatch)
            assert fast == slow, (at, offset)


def test_plain_header_only_for_what_tarfile_reads_as_a_plain_file():
    def header(**kw) -> bytes:
        info = tarfile.TarInfo(kw.pop("name", "x/y.jpg"))
        for k, v in kw.items():
            setattr(info, k, v)
        return info.tobuf(tarfile.USTAR_FORMAT)

    assert plain_header(header(size=1234)) == ("x/y.jpg", 1234)
    assert plain_header(header(name="d" * 130 + "/y.jpg")) == ("d" * 130 + "/y.jpg", 0)
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE):
        assert plain_header(header(type=kind)) is None
    assert plain_header(b"\0" * 512) is None and plain_header(header()[:511]) is None
    bad = bytearray(header(size=5))
    bad[130] = ord("1")  # size changed, checksum not
    assert plain_header(bytes(bad)) is None
    assert tarfile.TarInfo.frombuf(header(size=5), "utf-8", "surrogateescape").size == 5
