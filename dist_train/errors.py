"""User-facing errors and atomic file writes.

Bad input must end in one clear line and exit code 2, never a traceback, and nothing a
reader could mistake for a finished file may be left behind; both rules live here so every
command applies them the same way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2.

    `all_ranks`: as for RunFailed, every rank of a distributed run raised it on the same agreed
    facts (a checkpoint every rank refuses), so only the main process prints the line.
    """

    def __init__(self, message: str, all_ranks: bool = False) -> None:
        super().__init__(message)
        self.all_ranks = all_ranks


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one line, exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


class RunFailed(Exception):
    """A run that cannot go on (too much bad data, non-finite losses): one line, exit code 1.

    `all_ranks`: every rank of a distributed run raised it on the same agreed facts, so only the
    main process (RANK 0) prints the line; every rank still exits 1.
    """

    def __init__(self, message: str, all_ranks: bool = False) -> None:
        super().__init__(message)
        self.all_ranks = all_ranks


def error_line(e: Exception) -> str:
    """The error's own message. torch re-raises an exception of a DataLoader worker in the main
    process with the worker's whole traceback as its message ("Caught UserError in DataLoader
    worker process 0. Original Traceback ..."), the original `Type: message` line last."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def cli_main(fn: F) -> F:
    """Wrap a command's main(): UserError -> `error: ...` + exit 2; RunFailed -> exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if not e.all_ranks or os.environ.get("RANK", "0") == "0":
                print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)
        except RunFailed as e:
            if not e.all_ranks or os.environ.get("RANK", "0") == "0":
                print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch.OutOfMemoryError (CUDA: "out of memory"), or
    the CPU allocator's RuntimeError ("can't allocate memory"). A setting too large for the
    machine, never bad data."""
    text = str(e)
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _check_can_create(folder: Path, flag: str, path: Path) -> None:
    """`folder` exists and takes new files, or can be created: its nearest existing ancestor is a
    folder in which a file can be created. Tested by creating one: permission bits (and
    os.access) say nothing for root, and nothing about read-only or special filesystems."""
    base = folder
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, not a folder; expected a path in a folder you can write")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create files in {base} ({e.strerror or e}); "
                        "expected a folder you can write") from None


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """The output folder of a command, refused before any work when it cannot be written:
    an existing file, a path under a file, a place where no file can be created."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder; expected a folder (or a new path)")
    _check_can_create(path, flag, path)
    return path


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """The output file of a command, refused before any work when it cannot be written: an
    existing folder, or a folder that cannot take it (as `check_writable_dir`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; expected a file name")
    _check_can_create(path.parent, flag, path)
    return path


def scratch_dir() -> Path:
    """Where temporary folders go: $TMPDIR, checked (tempfile would quietly fall back to /tmp,
    which may be the small disk TMPDIR was set to avoid), else tempfile's default."""
    tmp = os.environ.get("TMPDIR")
    if tmp:
        if not os.path.isdir(tmp):
            raise UserError(f"TMPDIR {tmp}: no such folder; expected a folder for temporary files")
        return check_writable_dir(tmp, "TMPDIR")
    try:
        return Path(tempfile.gettempdir())
    except FileNotFoundError as e:
        raise UserError(f"no folder for temporary files ({e}); set TMPDIR to one you can write") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written folder into place; an older folder of that name is removed.

    The old folder is first renamed aside, so at every moment `final_dir` is either the old
    complete folder or the new complete one.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    moved = final_dir.exists()
    if moved:
        os.replace(final_dir, old)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if moved:  # put the old complete folder back where readers look for it
            os.replace(old, final_dir)
        raise
    if old.exists():
        shutil.rmtree(old)
