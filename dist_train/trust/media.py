"""Images and tar members from files someone else may have made, checked before they cost memory.

Images: the width and height come from the header (JPEG SOF marker, PNG IHDR, WebP
VP8/VP8L/VP8X chunk, GIF screen; any other format through PIL's lazy `Image.open(...).size`)
before anything is decoded, and an image over the pixel bound is refused: a 600-byte JPEG may
declare 30000x30000 and ask the decoder for 2.7 GB. The bound is `max_pixels_for(img_size)`:
the larger of PIL's own default (`DEFAULT_MAX_PIXELS`, 89.5 MP, ~270 MB as RGB) and
`PIXEL_FACTOR` x img_size² (1024: 32 times the side), generous for any photo a model sees at
that size; `shard --max-image-pixels` sets it at shard time (default `DEFAULT_MAX_PIXELS`).

Tars (PEP 706's `data` filter, as webdataset would otherwise read them): a shard is opened
uncompressed only (gzip/bzip2/xz/zstd magic refused), and its first header must be a tar
header, else one line naming the shard. A member that is a link (sym or hard), a device, a
FIFO, sparse, larger than `MAX_IMAGE_BYTES` (images) or `MAX_META_BYTES` (other members), or
named absolutely or with `..` is never read: its sample carries `REFUSED` (the reason) and the
readers count it as a bad sample, so positions in the shard do not shift.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import struct
import tarfile
from pathlib import Path
from typing import Callable, Generator, Iterable, Iterator

from PIL import Image

from dist_train.errors import UserError

from .tarheader import CappedTarInfo, plain_header

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default: 1024**3 / 4 / 3
PIXEL_FACTOR = 1024  # bound = PIXEL_FACTOR * img_size**2 when that is larger: 32x the side
MAX_IMAGE_BYTES = 256 << 20  # an image member larger than this is refused unread
MAX_META_BYTES = 1 << 20  # cls / json / fold / any other member
HEADER_BYTES = 1 << 20  # how much of an image file `file_image_size` reads to find its header
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff")
REFUSED = "__refused__"  # sample key: why a member of this sample was not read
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# webdataset's sample key rule: everything up to the first '.' of the last path component.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata names
_DRIVE_RE, _SEP_RE = re.compile(r"^[A-Za-z]:"), re.compile(r"[/\\]")


class ImageRefused(ValueError):
    """An image that is not read: unknown format, unparseable header, or over the pixel bound."""


def max_pixels_for(img_size: int) -> int:
    """The pixel bound of images read for a model of input `img_size` (see the module docstring)."""
    return max(DEFAULT_MAX_PIXELS, PIXEL_FACTOR * int(img_size) ** 2)


# ---------------------------------------------------------------- image headers


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the first frame header (SOF0..SOF15 but DHT/JPG/DAC), skipping segments."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ImageRefused(f"JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if marker == 0xDA or length < 2:
            raise ImageRefused("JPEG: no frame header before the image data")
        i += 2 + length
    raise ImageRefused("JPEG: header truncated before its frame size")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageRefused("PNG: no IHDR chunk first")
    return struct.unpack(">II", data[16:24])


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    raise ImageRefused("WebP: no VP8/VP8L/VP8X header")


def _gif_size(data: bytes) -> tuple[int, int]:
    if len(data) < 10:
        raise ImageRefused("GIF: header truncated")
    return struct.unpack("<HH", data[6:10])


def _pil_size(data: bytes) -> tuple[str, int, int]:
    """Other formats: PIL reads the header only (`Image.open` is lazy)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return str(im.format), im.width, im.height
    except Image.DecompressionBombError as e:  # PIL's own limit, from the header too
        raise ImageRefused(str(e)) from None
    except Image.UnidentifiedImageError:  # its text holds the BytesIO's address: not the same twice
        raise ImageRefused("not an image PIL can read (no format recognises its header)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for unknown data
        raise ImageRefused(f"not an image PIL can read ({type(e).__name__}: {e})") from None


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header of an image's bytes, without decoding it.

    The format is PIL's name (JPEG, PNG, WEBP, GIF, BMP, ...). ImageRefused when the header
    cannot be read.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return ("JPEG", *_jpeg_size(data))
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ("PNG", *_png_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP", *_webp_size(data))
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ("GIF", *_gif_size(data))
    return _pil_size(data)


def check_pixels(fmt: str, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageRefused(f"{fmt} header declares {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageRefused(f"{fmt} header declares {width}x{height} = {width * height:,} pixels, over the "
                           f"limit of {max_pixels:,} (not decoded)")


def check_image_bytes(data: bytes, max_pixels: int, formats: Iterable[str] | None = None) -> tuple[str, int, int]:
    """(format, width, height) of an image that may be decoded: its header read, its format one of
    `formats` (None: any), its pixels within `max_pixels`. ImageRefused (a bad sample) otherwise."""
    fmt, width, height = image_size(data)
    if formats is not None and fmt not in formats:
        raise ImageRefused(f"{fmt} data; expected {' or '.join(formats)}")
    check_pixels(fmt, width, height, max_pixels)
    return fmt, width, height


def file_image_size(path: str | os.PathLike) -> tuple[str, int, int]:
    """(format, width, height) of an image file from its first bytes; a header beyond them (a
    JPEG with large metadata segments) goes to PIL's lazy open. Only regular files are opened:
    a FIFO named x.jpg would block forever."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageRefused("not a regular file")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    try:
        return image_size(head)
    except ImageRefused:
        if len(head) < HEADER_BYTES:
            raise
    try:
        with Image.open(path) as im:
            return str(im.format), im.width, im.height
    except Exception as e:
        raise ImageRefused(f"header not readable ({type(e).__name__}: {e})") from None


def check_image_file(path: str | os.PathLike, max_pixels: int) -> tuple[str, int, int]:
    """`file_image_size`, within `max_pixels` (ImageRefused otherwise)."""
    fmt, width, height = file_image_size(path)
    check_pixels(fmt, width, height, max_pixels)
    return fmt, width, height


# ---------------------------------------------------------------- tars


def check_tar_head(head: bytes, where: str) -> None:
    """The first bytes of a shard: an uncompressed tar (its first header parses), else UserError."""
    for magic, kind in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise UserError(f"{where}: a {kind}-compressed file, not a plain tar: shards are read "
                            "uncompressed (rewrite it with python -m dist_train.shard)")
    try:
        tarfile.TarInfo.frombuf(head[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise UserError(f"{where}: not a tar file ({e}); expected a shard written by python -m dist_train.shard") from None


def check_local_shards(paths: Iterable[str]) -> None:
    """Every local shard of a split exists, is a regular file and starts as a plain tar: one line
    naming the first that does not, before any rank or worker starts reading. URLs are checked
    when they are read."""
    for path in paths:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{path}: not a regular file; expected a shard (a tar file)")
            with open(path, "rb") as f:
                head = f.read(tarfile.BLOCKSIZE)
        except FileNotFoundError:
            raise UserError(f"{path}: shard listed in the shard set's _info.json but missing") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read this shard ({e.strerror or e})") from None
        check_tar_head(head, path)


def _name_problem(name: str) -> str | None:
    if name.startswith(("/", "\\")) or _DRIVE_RE.match(name) or ".." in _SEP_RE.split(name):
        return f"member name {name!r} is absolute or has '..'"
    return None


def _size_problem(name: str, size: int) -> str | None:
    suffix = name.rsplit(".", 1)[-1].lower()
    limit = MAX_IMAGE_BYTES if suffix in IMAGE_SUFFIXES else MAX_META_BYTES
    if size > limit:
        return f"member {name!r} has {size:,} bytes, over the limit of {limit:,}"
    return None


def member_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar member is not read (PEP 706's data filter, plus sparse and size limits), or None."""
    name = info.name
    if _name_problem(name):
        return _name_problem(name)
    if info.issym() or info.islnk():
        return f"member {name!r} is a link"
    if info.ischr() or info.isblk() or info.isfifo():
        return f"member {name!r} is a device or FIFO"
    if info.issparse():
        return f"member {name!r} is sparse (declares {info.size:,} bytes)"
    if not info.isreg():
        return f"member {name!r} is not a regular file"
    return _size_problem(name, info.size)


def _open(url: str) -> io.BufferedIOBase:
    """A shard's byte stream: local files opened here (missing: one line), URLs through webdataset's gopen."""
    if "://" not in url and not url.startswith("pipe:"):
        check_local_shards([url])
        return open(url, "rb")
    import webdataset as wds  # torch comes with it: only readers of URLs pay for it

    return wds.gopen(url)


def tar_members(url: str, handler: Callable[[Exception], bool]) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, data, None) for each member of the shard at `url`, or (name, None, reason) for a refused one.

    Directories and webdataset's `__x__` names are passed over. A shard that is compressed or not a
    tar is a UserError; a read error further on (a truncated tar) goes to `handler` and ends the shard.
    """
    source = stream = _open(url)
    try:
        head = source.read(tarfile.BLOCKSIZE)
        check_tar_head(head, url)
        if getattr(source, "seekable", lambda: False)():  # webdataset's Pipe has no seekable()
            source.seek(0)
        else:
            stream = io.BufferedReader(_Chain(head, source), buffer_size=1 << 16)
        try:
            rest = yield from _plain_members(stream)
            if rest is not None:  # a header the fast path leaves to tarfile: it goes on from there
                with tarfile.open(fileobj=io.BufferedReader(_Chain(rest, stream), 1 << 16), mode="r|",
                                  tarinfo=CappedTarInfo) as tar:
                    for info in tar:
                        if info.isdir() or _META_RE.match(info.name):
                            continue
                        why = member_problem(info)
                        if why is not None:
                            yield info.name, None, why
                            continue
                        f = tar.extractfile(info)
                        yield info.name, f.read() if f is not None else b"", None
                        tar.members = []
        except (tarfile.TarError, OSError, EOFError) as e:
            handler(ValueError(f"{url}: {e}"))
    finally:
        with contextlib.suppress(Exception):  # a URL's command stopped early exits non-zero
            source.close()


def _plain_members(stream: io.BufferedIOBase) -> Generator[tuple[str, bytes | None, str | None], None, bytes | None]:
    """`tar_members`' fast path: the members whose headers are plain (`tarheader.plain_header`),
    with the same checks; returns the first header block left to tarfile, or None where tarfile
    would have ended the archive (a zero block, or a damaged header after the first member)."""
    first = True
    while True:
        block = stream.read(tarfile.BLOCKSIZE)
        head = plain_header(block)
        if head is None:
            if not first:
                try:
                    tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                except tarfile.HeaderError:  # tarfile ends there quietly after the first member
                    return None
            return block
        first = False
        name, size = head
        pad = -size % tarfile.BLOCKSIZE
        meta = _META_RE.match(name)
        why = None if meta else _name_problem(name) or _size_problem(name, size)
        if meta or why:  # never read: passed over, or refused (and reported before its bytes are)
            if why:
                yield name, None, why
            complete = _skip(stream, size + pad)
        else:
            data = stream.read(size)
            if len(data) < size:
                raise tarfile.ReadError("unexpected end of data")
            yield name, data, None
            complete = _skip(stream, pad)
        if not complete:
            raise tarfile.ReadError("unexpected end of data")


def _skip(stream: io.BufferedIOBase, n: int) -> bool:
    """Read past `n` bytes; False if the stream ends first."""
    while n > 0:
        got = len(stream.read(min(n, 1 << 20)))
        if not got:
            return False
        n -= got
    return True


class _Chain(io.RawIOBase):
    """Bytes already read from a stream, then the rest of the stream."""

    def __init__(self, head: bytes, rest: io.BufferedIOBase):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.head:
            n = min(len(buf), len(self.head))
            buf[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def tar_samples(urls: Iterable[str], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's samples (`__key__`, `__url__`, one entry per member suffix) from checked tars.

    A refused member stays in its sample as `REFUSED` (the reason), so the sample keeps its
    position in the shard and the reader counts it as bad; a suffix seen twice in a sample too.
    """
    for url in urls:
        sample: dict | None = None
        for name, data, why in tar_members(url, handler):
            m = _KEY_RE.match(name)
            key, suffix = (m.group(1), m.group(2).lower()) if m else (name, "")
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if why is None and suffix in sample:
                why = f"member {name!r} twice in the sample"
            if why is not None:
                sample[REFUSED] = why
            else:
                sample[suffix] = data
        if sample is not None:
            yield sample


def refused(sample: dict) -> str | None:
    """Why a sample from `tar_samples` must not be used (a member was refused), or None."""
    return sample.get(REFUSED)


def tar_counts(path: str | Path) -> tuple[int, list[str]]:
    """(samples, problems) of a local shard read whole, for `shard --inspect`: how many samples it
    holds and why any member would be refused."""
    problems: list[str] = []
    n = 0
    for sample in tar_samples([str(path)], handler=lambda e: problems.append(str(e)) or False):
        n += 1
        if REFUSED in sample:
            problems.append(sample[REFUSED])
    return n, problems
