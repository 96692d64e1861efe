"""The shard writer's write pass: every shard of the plan built from the spool (`spool`), at a
temporary name, fsynced and renamed when complete, its sha256 taken for `_info.json`.

Tar headers carry fixed mtime/owner/mode and members go in a fixed order (image, cls, fold,
json per sample), so the same input gives byte-identical shards.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from dist_train.errors import temp_file

from .format import file_sha256
from .sources import Record
from .spool import Spool

# Fixed tar header fields: determinism must not depend on who ran the job, or when.
TAR_MTIME = 0
TAR_MODE = 0o444


@functools.lru_cache(maxsize=1)
def _template() -> bytes:
    """tarfile's PAX-format header of an empty regular member with our fixed fields."""
    info = tarfile.TarInfo("")
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, TAR_MODE, 0, 0, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _header(name: str, size: int) -> bytes | None:
    """The header tarfile writes for a regular member `name` of `size` bytes with our fixed fields,
    from a template (tarfile's TarInfo.tobuf took ~70 us a member, most of the write pass);
    None where tarfile must write it: a name of 100 bytes or more or not ASCII (a PAX record), a
    size of 8 GiB or more (a base-256 field)."""
    if len(name) >= 100 or not name.isascii() or size >= 8 ** 11:
        return None
    t = _template()
    raw = name.encode("ascii")
    head = raw + tarfile.NUL * (100 - len(raw)) + t[100:124] + b"%011o\0" % size + t[136:148] + b" " * 8 + t[156:]
    return head[:148] + b"%06o\0" % sum(head) + head[155:]  # tarfile's checksum field: 6 digits, NUL, space


def write_plan(out: Path, plan: list[tuple[str, str, list[Record]]], spool: Spool, progress: bool,
               fold_of: dict[str, int]) -> tuple[dict[str, str], int]:
    """Write every shard (temp name -> fsync -> rename) from the spool, in the plan's order; returns
    sha256 per file and total bytes. A thread finishes each shard (fsync, rename, checksum) while
    the next one is built."""
    sha: dict[str, str] = {}
    total = 0
    with (ThreadPoolExecutor(1) as finisher,
          tqdm(total=sum(len(recs) for _, _, recs in plan), desc="writing", unit="img", disable=not progress,
               file=sys.stderr) as bar):
        pending: deque[tuple[str, Future]] = deque()
        for _, filename, recs in plan:
            if len(pending) >= 2:  # bounded: at most two shards open
                name, done = pending.popleft()
                sha[name], size = done.result()
                total += size
            f, tmp = _build_shard(out, filename, recs, spool, fold_of, bar)
            pending.append((filename, finisher.submit(_finish_shard, f, tmp, out / filename)))
        for name, done in pending:
            sha[name], size = done.result()
            total += size
    return sha, total


def _build_shard(out: Path, filename: str, recs: list[Record], spool: Spool, fold_of: dict[str, int],
                 bar: tqdm) -> tuple[BinaryIO, Path]:
    """One shard's tar at a temporary name in OUT: (the open file, flushed, not yet synced; its path)."""
    fd, tmp_name = temp_file(out, filename)
    tmp = Path(tmp_name)
    f = os.fdopen(fd, "wb")
    try:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for r in recs:
                _sample(tar, r, spool, fold_of)
                bar.update()
        f.flush()
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    return f, tmp


def _finish_shard(f: BinaryIO, tmp: Path, dest: Path) -> tuple[str, int]:
    """fsync, close and rename a built shard; (its sha256, its size)."""
    try:
        with f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(dest), dest.stat().st_size


def _sample(tar: tarfile.TarFile, r: Record, spool: Spool, fold_of: dict[str, int]) -> None:
    """One sample's members: the image, its class, its fold, its metadata."""
    ext, data = spool.member(r.key, r.path)
    _tar_member(tar, f"{r.key}.{ext}", data)
    if r.label is not None:
        _tar_member(tar, f"{r.key}.cls", str(r.label).encode())
    if r.key in fold_of:
        _tar_member(tar, f"{r.key}.fold", str(fold_of[r.key]).encode())
    _tar_member(tar, f"{r.key}.json", json.dumps(r.meta, ensure_ascii=False).encode())


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """`data` as member `name`: the header from `_header` where it can (the bytes tarfile writes,
    tested), else from tarfile itself."""
    head = _header(name, len(data))
    if head is not None:
        pad = -len(data) % tarfile.BLOCKSIZE
        for part in (head, data, tarfile.NUL * pad):
            tar.fileobj.write(part)
        tar.offset += len(head) + len(data) + pad
        return
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
