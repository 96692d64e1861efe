"""Atomic writes: a failed write leaves the old file (or folder) whole and no temporary behind."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from pathlib import Path

import pytest

import dist_train.errors as errors
from dist_train.errors import atomic_write_bytes, atomic_write_json, atomic_write_text, replace_dir

OLD = b"old complete content\n" * 100  # 2100 bytes


def leftovers(folder: Path, name: str) -> list[str]:
    """Temporary files of `name` (atomic_write_* names them .NAME.*.tmp) left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "out.bin"
    path.write_bytes(OLD)
    return path


def test_success_writes_the_content_and_leaves_no_temp(tmp_path: Path, old_file: Path):
    atomic_write_bytes(old_file, b"new")
    assert old_file.read_bytes() == b"new"
    atomic_write_text(tmp_path / "sub" / "t.txt", "h\u00e9\n")  # the folder is created
    assert (tmp_path / "sub" / "t.txt").read_bytes() == b"h\xc3\xa9\n"
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert (tmp_path / "j.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.json", "out.bin", "sub"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["t.txt"]


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_bytes(p, b"new" * 1000),
    lambda p: atomic_write_text(p, "new" * 1000),
    lambda p: atomic_write_json(p, {"new": list(range(100))}),
], ids=["bytes", "text", "json"])
def test_failed_fsync_keeps_the_old_file_and_no_temp(old_file: Path, monkeypatch, write):
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(errors.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        write(old_file)
    assert old_file.read_bytes() == OLD
    assert leftovers(old_file.parent, old_file.name) == []
    assert sorted(p.name for p in old_file.parent.iterdir()) == ["out.bin"]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` in any file fail with EFBIG (a full disk as the writer sees it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_write_failing_midway_keeps_the_old_file_and_no_temp(old_file: Path):
    """The write itself stops after 64 KiB of 1 MiB, whatever writes the file: the old content
    must survive (a direct write over the file would have truncated it)."""
    with file_size_limit(64 * 1024), pytest.raises(OSError):
        atomic_write_bytes(old_file, b"n" * (1 << 20))
    assert old_file.read_bytes() == OLD
    assert leftovers(old_file.parent, old_file.name) == []


def test_failed_rename_keeps_the_old_file_and_no_temp(old_file: Path, monkeypatch):
    def failing_replace(src, dst) -> None:
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(errors.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        atomic_write_bytes(old_file, b"new")
    assert old_file.read_bytes() == OLD
    assert leftovers(old_file.parent, old_file.name) == []


def test_interrupt_during_write_keeps_the_old_file_and_no_temp(old_file: Path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, not an Exception) in the middle of the write."""
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(errors.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(old_file, b"new")
    assert old_file.read_bytes() == OLD
    assert leftovers(old_file.parent, old_file.name) == []


def make_tree(root: Path, tag: str) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(f"{tag} a")
    (root / "sub" / "b.txt").write_text(f"{tag} b")
    return root


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


OLD_TREE = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW_TREE = {"a.txt": "new a", "sub/b.txt": "new b"}


def test_replace_dir_swaps_in_the_new_folder(tmp_path: Path):
    final = make_tree(tmp_path / "final", "old")
    new = make_tree(tmp_path / ".final.x.tmp", "new")
    replace_dir(new, final)
    assert tree(final) == NEW_TREE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # neither the temp nor the old one left
    replace_dir(make_tree(tmp_path / "t2", "old"), tmp_path / "fresh")  # no folder of that name yet
    assert tree(tmp_path / "fresh") == OLD_TREE


def failing_nth_replace(monkeypatch, n: int) -> None:
    real, calls = os.replace, []

    def replace(src, dst) -> None:
        calls.append((src, dst))
        if len(calls) == n:
            raise OSError(16, "Device or resource busy (injected)")
        real(src, dst)

    monkeypatch.setattr(errors.os, "replace", replace)


def test_replace_dir_failing_first_rename_keeps_the_old_folder(tmp_path: Path, monkeypatch):
    final = make_tree(tmp_path / "final", "old")
    new = make_tree(tmp_path / "new.tmp", "new")
    failing_nth_replace(monkeypatch, 1)
    with pytest.raises(OSError, match="injected"):
        replace_dir(new, final)
    assert tree(final) == OLD_TREE and tree(new) == NEW_TREE


def test_replace_dir_failing_second_rename_keeps_the_old_folder_in_place(tmp_path: Path, monkeypatch):
    """The old folder is already aside when the new one fails to move in: it goes back to its
    name (readers never see the name missing), the new one stays where it was written, and the
    error propagates."""
    final = make_tree(tmp_path / "final", "old")
    new = make_tree(tmp_path / "new.tmp", "new")
    failing_nth_replace(monkeypatch, 2)
    with pytest.raises(OSError, match="injected"):
        replace_dir(new, final)
    assert tree(final) == OLD_TREE and tree(new) == NEW_TREE
    assert not (tmp_path / ".final.old").exists()


# ----------------------------------------------------------------------------- the line once under a launcher
@pytest.mark.parametrize("rank, launcher, error, printed_after_wait", [
    ("0", True, errors.UserError("bad"), False),  # the main process prints at once
    ("1", True, errors.UserError("bad"), True),  # waits for the launcher to end it; prints if it does not
    ("1", True, errors.RunFailed("rank 1 only"), False),  # a failure of its own: at once
    ("1", False, errors.UserError("bad", all_ranks=True), None),  # no launcher to end it: the main prints
])
def test_an_error_line_is_printed_once_per_run(monkeypatch, capsys, rank, launcher, error, printed_after_wait):
    slept = []
    monkeypatch.setattr(errors.time, "sleep", slept.append)
    monkeypatch.setattr(errors.signal, "signal", lambda *a: None)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    if launcher:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    @errors.cli_main
    def main():
        raise error

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == (2 if isinstance(error, errors.UserError) else 1)
    err = capsys.readouterr().err.splitlines()
    assert err == ([] if printed_after_wait is None else [f"error: {error}"])
    assert slept == ([errors.SIBLING_WAIT_S] if printed_after_wait else [])


@pytest.mark.parametrize("rank, printed", [("0", "error: interrupted (Ctrl-C)\n"), ("1", "")])
def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys, rank, printed):
    """Ctrl-C outside a training loop (or twice in one): no KeyboardInterrupt traceback, the
    main process's line, the shell's 128 + SIGINT."""
    monkeypatch.setenv("RANK", rank)

    @errors.cli_main
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 130
    assert capsys.readouterr().err == printed


# ----------------------------------------------------------------------------- the process group at the end
@pytest.mark.parametrize("raises", [None, errors.UserError("bad"), errors.RunFailed("failed")])
def test_a_command_ends_the_process_group_however_it_ends(tmp_path, monkeypatch, capsys, raises):
    """A launched rank that exits with its Gloo group alive can abort in the group's destructor
    (SIGABRT after its work is done, seen in CI on `predict --run CV` under 2 processes; a second
    line and no exit 2 after a refusal): every way out of a command destroys the group first."""
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        @errors.cli_main
        def main():
            dist.barrier()
            if raises is not None:
                raise raises
            return 7

        if raises is None:
            assert main() == 7
        else:
            with pytest.raises(SystemExit) as e:
                main()
            assert e.value.code == (2 if isinstance(raises, errors.UserError) else 1)
            assert capsys.readouterr().err == f"error: {raises}\n"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ending_the_process_group_waits_a_bounded_time(monkeypatch):
    """A shutdown stuck behind a collective no other rank joins does not keep the process alive."""
    import torch.distributed as dist

    stuck = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: stuck.wait(60))
    t0 = time.monotonic()
    errors.end_process_group(wait_s=0.2)
    assert time.monotonic() - t0 < 5
    stuck.set()


def test_own_warnings_print_as_one_line(monkeypatch):
    """A skipped bad sample under a command is one `warning: ...` line, not Python's
    `/path/files.py:137: UserWarning: ...` plus the code line (read as a traceback); other
    libraries' warnings keep Python's format."""
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    errors.cli_main(lambda: None)()
    own = warnings.formatwarning("skipping bad sample: x.jpg", UserWarning, errors.__file__, 10, "self._count_bad()")
    assert own == "warning: skipping bad sample: x.jpg\n"
    other = warnings.formatwarning("old", DeprecationWarning, "/usr/lib/x.py", 3, "call()")
    assert other.startswith("/usr/lib/x.py:3: DeprecationWarning: old")
