"""Tar headers of plain regular files, parsed in one `struct` call: the fast path of
`trust.media.tar_members`.

`tarfile` parses all sixteen fields of every header in Python (~25 us a member, three members a
sample); a shard written by `dist_train.shard` (or webdataset's TarWriter) holds nothing but
regular files whose headers need four. `plain_header` accepts exactly the headers that `tarfile`
reads as a regular file with nothing attached: type '0' or NUL (not a v7 directory), octal size,
the unsigned checksum right. Any other header (pax or GNU extension headers, links, devices,
directories, sparse files, base-256 numbers, a signed checksum, end of archive, damage) is
answered None and left to `tarfile`, so what is read, refused or reported is what `tarfile` and
`trust.media.member_problem` decide.
"""

from __future__ import annotations

import struct
import tarfile

# name, (mode uid gid), size, (mtime), chksum, typeflag, (linkname magic version uname gname devs), prefix
_FIELDS = struct.Struct("100s24x12s12x8sc100x8x64x16x155s12x")
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_ENCODING = ("utf-8", "surrogateescape")  # tarfile's defaults for names
MAX_TAR_HEADER_BYTES = 1 << 20  # a PAX or GNU long-name header: a name and a few attributes


def _octal(field: bytes) -> int:
    """tarfile's `nti` for an octal field (ValueError for anything else)."""
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def plain_header(block: bytes) -> tuple[str, int] | None:
    """(name, size) of a tar header block that `tarfile` reads as a plain regular file, else None."""
    if len(block) != tarfile.BLOCKSIZE:
        return None
    name_field, size_field, chksum_field, kind, prefix = _FIELDS.unpack(block)
    if kind not in _REGULAR:
        return None
    try:
        size, chksum = _octal(size_field), _octal(chksum_field)
    except ValueError:  # base-256 or garbage: tarfile decides
        return None
    if size < 0 or chksum != 256 + sum(block) - sum(block[148:156]):
        return None
    name = name_field.split(b"\0", 1)[0].decode(*_ENCODING)
    if kind == tarfile.AREGTYPE and name.endswith("/"):  # a v7 directory
        return None
    prefix = prefix.split(b"\0", 1)[0]
    if prefix:  # a ustar long name
        name = prefix.decode(*_ENCODING) + "/" + name
    return name, size


class CappedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX / GNU long-name header whole, whatever size it declares: refuse one over
    `MAX_TAR_HEADER_BYTES` before reading it (it ends the shard like any broken tar)."""

    def _proc_member(self, tar: tarfile.TarFile):  # type: ignore[override]
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)
        if self.type in extended and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.HeaderError(f"an extended (PAX/GNU) header declares {self.size:,} bytes, over the "
                                      f"limit of {MAX_TAR_HEADER_BYTES:,}")
        return super()._proc_member(tar)
