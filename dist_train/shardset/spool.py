"""The shard writer's spool: the members its one decode pass encoded, kept on disk until the
shards are written in their own (shuffled) order.

With `--resize` every image is decoded once, in the check pass, which also encodes it
(`images.check_and_encode`); the encoded bytes arrive in source order, before the split (which
needs every fingerprint) is known. They are appended to one file in OUT under a temporary name
(`errors.temp_file`: ".\\_spool.XXXX.tmp", one of `outdir.TMP_RE`'s names, so a run killed before
it removed the file leaves nothing the next run does not clean up), indexed by sample key, and
copied from there into the tars. Memory holds the index only (two integers and an extension per
image); the disk holds the encoded set twice while the shards are written. Without `--resize`,
JPEG and PNG members are the source files' own bytes: nothing is spooled for them, the write
pass copies the file.

The spool is removed when the writer leaves it, finished or not; if the run fails before its
shards are written, the folders it created for the spool (OUT and parents that did not exist)
are removed again when empty, so a refused run (`--strict`) leaves nothing behind.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Any, BinaryIO

from dist_train.errors import temp_file

SPOOL_NAME = "_spool"


class Spool:
    """Context manager: `add` in the check pass, `member` in the write pass."""

    def __init__(self, out: Path):
        self.out = out
        self.file: BinaryIO | None = None
        self.path: Path | None = None
        self.made: list[Path] = []  # folders created for the spool, innermost first
        self.row: dict[str, int] = {}
        self.offset, self.length = array("q"), array("q")
        self.ext: list[str] = []
        self.size = 0

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)

    @property
    def name(self) -> str | None:
        """The spool file's name in OUT (None until something was spooled)."""
        return self.path.name if self.path else None

    def _open(self) -> BinaryIO:
        if self.file is None:
            missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
            self.out.mkdir(parents=True, exist_ok=True)
            self.made = missing
            fd, tmp = temp_file(self.out, SPOOL_NAME)
            self.path = Path(tmp)
            self.file = os.fdopen(fd, "w+b", buffering=1 << 20)
        return self.file

    def add(self, key: str, ext: str, data: bytes) -> None:
        """Record sample `key`'s member: `data` (spooled), or b"" for the source file's own bytes."""
        self.row[key] = len(self.ext)
        self.ext.append(ext)
        self.offset.append(self.size if data else -1)
        self.length.append(len(data))
        if data:
            self._open().write(data)
            self.size += len(data)

    def finish(self) -> None:
        """Every member added: make the spooled bytes readable."""
        if self.file is not None:
            self.file.flush()

    def member(self, key: str, source: Path) -> tuple[str, bytes]:
        """(extension, bytes) of sample `key`, whose source file is `source`."""
        i = self.row[key]
        if self.offset[i] < 0:
            return self.ext[i], source.read_bytes()
        data = os.pread(self.file.fileno(), self.length[i], self.offset[i])
        if len(data) != self.length[i]:
            raise OSError(f"{self.path}: the spool file was cut short (read {len(data)} of {self.length[i]} bytes)")
        return self.ext[i], data

    def close(self, failed: bool = False) -> None:
        """Remove the spool file; after a failure also the folders made for it, if empty."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.path.unlink(missing_ok=True)
        if failed:
            for folder in self.made:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or not ours to remove any more): kept
                    break
        self.made = []
