"""User-facing errors and atomic file writes.

Bad input must end in one clear line and exit code 2, never a traceback, and nothing a
reader could mistake for a finished file may be left behind; both rules live here so every
command applies them the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C

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
    """argparse whose usage errors are UserErrors: one line, exit 2, like every other bad input;
    a mistyped flag gets the nearest real one."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UserError(f"{message}{self._did_you_mean(message)} (see {self.prog} --help)")

    def _did_you_mean(self, message: str) -> str:
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        flags = [t.split("=", 1)[0] for t in message.split(":", 1)[1].split() if t.startswith("--")]
        guesses = [f"{f} -> {m[0]}" for f in flags if (m := did_you_mean(f, known))]
        return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def did_you_mean(name: str, known: Any) -> list[str]:
    """The nearest of `known` to a mistyped `name` (difflib), or none."""
    return difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)


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


# How long a rank other than the main one, holding an error every rank reached, waits for the
# launcher to end it once the main process has printed the line and exited (torchrun and
# `accelerate launch` stop the other ranks when one fails). Only if the main process did not
# fail the same way does the rank print its own line after this wait.
SIBLING_WAIT_S = 20.0


@contextlib.contextmanager
def same_on_every_rank() -> Any:
    """UserErrors raised inside come from checks every rank makes on the same inputs (flags,
    the shard set's _info.json, the run folder): under a launcher only the main process prints
    the line."""
    try:
        yield
    except UserError as e:
        e.all_ranks = True
        raise


def _report(e: UserError | RunFailed) -> None:
    """Print the error line once per run: by the main process, or by any rank whose error is its
    own. Under torchrun / `accelerate launch` (TORCHELASTIC_RUN_ID) every UserError counts as
    reached by every rank (bad input is the same input everywhere), and a rank that exited first
    would make the launcher kill the main process before it printed: the other ranks wait to be
    ended instead (default signal actions, so a preemption handler does not keep them alive), and
    print their own line only if that does not happen within SIBLING_WAIT_S."""
    line = f"error: {error_line(e)}"
    launched = "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if os.environ.get("RANK", "0") == "0" or not (e.all_ranks or (launched and isinstance(e, UserError))):
        print(line, file=sys.stderr, flush=True)
        return
    if launched:
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", signal.SIGTERM)):
            signal.signal(sig, signal.SIG_DFL)
        time.sleep(SIBLING_WAIT_S)
        print(line, file=sys.stderr, flush=True)  # the main process did not end the run: say it here


# How long a command's end waits for torch.distributed's default group to shut down. Shutting it
# down is local (no other rank takes part) and takes milliseconds, unless one of its worker threads
# is still inside a collective that other ranks never joined (an error in the middle of DDP's
# backward): then the process exits without it, as it would have anyway.
END_GROUP_WAIT_S = 10.0


def end_process_group(wait_s: float = END_GROUP_WAIT_S) -> None:
    """Destroy torch.distributed's default group, if one was set up, while the interpreter is
    still whole. A rank that exits with a Gloo group alive can abort in the group's destructor
    during interpreter teardown ("terminate called without an active exception", SIGABRT) after
    its work is done: a finished command then fails, a refused one gives a second line and no
    exit 2 (pytorch/pytorch#179291). Done in a daemon thread waited on for at most `wait_s`."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return

    def destroy() -> None:
        with contextlib.suppress(Exception):  # the process is ending; teardown does the rest as before
            dist.destroy_process_group()

    thread = threading.Thread(target=destroy, name="end-process-group", daemon=True)
    thread.start()
    thread.join(wait_s)


_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
_python_formatwarning = warnings.formatwarning


def _format_warning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """Our own warnings (a bad sample skipped, an image that cannot be drawn) as one `warning: ...`
    line, without the source file, line number and code line Python adds (which read like a
    traceback); warnings of other libraries as Python formats them."""
    if str(filename).startswith(_PACKAGE_DIR) and issubclass(category, UserWarning):
        return f"warning: {message}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


def cli_main(fn: F) -> F:
    """Wrap a command's main(): UserError -> `error: ...` + exit 2; RunFailed -> exit 1; Ctrl-C
    (KeyboardInterrupt) -> `error: interrupted (Ctrl-C)` + exit 130, no traceback. Either
    way, and when main returns, the process group is ended first (end_process_group). Our own
    warnings print as `warning: ...` lines (`_format_warning`; loader workers inherit it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.formatwarning = _format_warning
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            _report(e)
            end_process_group()
            sys.exit(EXIT_USAGE)
        except RunFailed as e:
            _report(e)
            end_process_group()
            sys.exit(1)
        except KeyboardInterrupt as e:  # Ctrl-C: one line (from the main process), 128 + SIGINT
            if os.environ.get("RANK", "0") == "0":
                print("error: interrupted (Ctrl-C)" + (f": {e}" if str(e) else ""), file=sys.stderr, flush=True)
            end_process_group()
            sys.exit(EXIT_INTERRUPTED)
        end_process_group()
        return result

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


def umask() -> int:
    """This process's umask: from /proc (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(folder: str | os.PathLike, name: str) -> tuple[int, str]:
    """`tempfile.mkstemp` for a file that will be renamed to `name` in `folder`, with the mode a
    plain open() would give it (0666 & ~umask) instead of mkstemp's private 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def temp_dir(folder: str | os.PathLike, name: str) -> Path:
    """`tempfile.mkdtemp` for a folder that will be renamed to `name` in `folder`, with the mode
    mkdir would give it (0777 & ~umask) instead of mkdtemp's private 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def follow_umask(folder: str | os.PathLike) -> None:
    """Give every file below `folder` 0666 & ~umask and every folder 0777 & ~umask: for what
    libraries wrote privately (safetensors' save_file makes its files 0600)."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
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
