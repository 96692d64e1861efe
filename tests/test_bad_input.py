"""Bad input that used to end in a traceback or a misleading message (issue 12): outputs that
cannot be written, sizes that do not fit in memory, remote shard sets that do not answer, and
`_info.json` file names that would run a command or leave the shard set's folder.

Every command is run in-process through its `main([...])`, as a user would call it.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import run_main
from dist_train import bench, ensemble, evaluate, predict, run, shard, synth
from dist_train.data.readers import eval_collate
from dist_train.errors import UserError, check_writable_dir
from dist_train.shardset.format import load_info, shard_urls

BASE = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--lr", "0.01", "--seed", "0",
        "--warmup-epochs", "0", "--val-split", "none", "--epochs", "1", "--workers", "0"]
# Not writable even for root (tests run as root, where mode 0o500 stops nothing and os.access
# says yes): /proc takes no new files, whatever the permission bits say.
UNWRITABLE = Path("/proc/dist_train-test/out")


def call(main: Callable, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of a command's main run in this process."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line(code: int, stderr: str, *parts: str) -> str:
    """Exit 2, no traceback, and exactly one `error: ...` line holding every part."""
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- 1. outputs
def _commands(raw: Path, shards: Path) -> dict[str, tuple[Callable, Callable[[str], list[str]], str]]:
    """command -> (main, argv for an output path, what the output is)."""
    return {
        "train": (run.main, lambda o: ["--data", str(shards), "--output", o, *BASE], "dir"),
        "shard": (shard.main, lambda o: ["--src", str(raw / "train"), "--out", o, "--workers", "1", "--quiet"], "dir"),
        "predict": (predict.main, lambda o: ["--run", "no-run", "--data", str(shards), "--out", o], "file"),
        "evaluate": (evaluate.main, lambda o: ["--run", "no-run", "--data", str(shards), "--out", o], "dir"),
        "ensemble": (ensemble.main, lambda o: ["--out", o, "a.probs.npz"], "file"),
        "synth": (synth.main, lambda o: ["--out", o, "--persons", "1"], "dir"),
    }


COMMANDS = ("train", "shard", "predict", "evaluate", "ensemble", "synth")
CASES = ("exists as the other kind", "under a file", "in /proc")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_is_one_line(command, case, raw_mask, mask_shards, tmp_path, capsys):
    main, argv, kind = _commands(raw_mask, mask_shards)[command]
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "a_dir").mkdir()
    out, expected = {
        "exists as the other kind": (tmp_path / ("a_file" if kind == "dir" else "a_dir"),
                                     "exists and is not a folder" if kind == "dir" else "is a folder"),
        "under a file": (tmp_path / "a_file" / "sub" / "out", f"{tmp_path / 'a_file'} is a file, not a folder"),
        "in /proc": (UNWRITABLE, "cannot create files in /proc"),
    }[case]
    code, err = call(main, argv(str(out)), capsys)
    assert_one_line(code, err, f"--out{'put' if command == 'train' else ''} {out}: {expected}")
    assert (tmp_path / "a_file").read_text() == "keep me" and not any((tmp_path / "a_dir").iterdir())


def test_read_only_folder_is_refused_exactly_when_a_write_fails(tmp_path):
    """Mode 0o500 stops everyone but root: the check must agree with an actual write (refused for a
    user, accepted for root), not with the permission bits."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        (locked / "probe").write_text("")
        (locked / "probe").unlink()
        writable = True
    except PermissionError:
        writable = False
    if writable:
        assert check_writable_dir(locked / "out", "--out") == locked / "out"
    else:
        with pytest.raises(UserError, match=f"--out {locked}/out: cannot create files in {locked}"):
            check_writable_dir(locked / "out", "--out")
    assert not any(locked.iterdir())


@pytest.mark.parametrize("tmpdir", ["a_file", "missing", "/proc"])
@pytest.mark.parametrize("sub", ["shard", "train"])
def test_bench_with_unwritable_tmpdir_is_one_line(sub, tmpdir, raw_mask, tmp_path, capsys, monkeypatch):
    """bench writes temporary folders; tempfile would quietly put them in /tmp instead."""
    (tmp_path / "a_file").write_text("")
    path = tmpdir if tmpdir.startswith("/") else str(tmp_path / tmpdir)
    monkeypatch.setenv("TMPDIR", path)
    argv = (["shard", "--src", str(raw_mask / "train")] if sub == "shard" else
            ["train", "--synthetic", "--model", "test_resnet", "--img-size", "32", "--batch-size", "4"])
    code, err = call(bench.main, argv, capsys)
    assert_one_line(code, err, f"TMPDIR {path}: ", "no such folder" if tmpdir != "/proc" else "cannot create files")


# ----------------------------------------------------------------------------- 2. sizes
@pytest.mark.parametrize("workers", ["0", "1"])
def test_image_size_that_cannot_be_allocated_names_the_setting(mask_shards, tmp_path, workers, monkeypatch):
    """3 x 10^14 bytes per image exceed any address space, so the allocation fails at once on any
    machine; before, each failure was counted as a bad sample until "the shards look broken".
    The config's range stops such a size first; widened, the loader's own check still names it."""
    from dist_train.config.ranges import RANGES, Range

    p = run_main(["--data", str(mask_shards), *BASE, "--workers", workers, "--img-size", "10000000"])
    assert_one_line(p.returncode, p.stderr, "--img-size 10000000: expected an integer in 1..8192")
    monkeypatch.setitem(RANGES, "img_size", Range(1, 10**8, integer=True))
    p = run_main(["--data", str(mask_shards), "--output", str(tmp_path / "o"),
                  *BASE, "--workers", workers, "--img-size", "10000000"])
    line = assert_one_line(p.returncode, p.stderr, "--img-size 10000000: out of memory",
                           "a batch of 8 images", "2,400,000,000,000,000 bytes", "smaller --img-size or --batch-size")
    assert "bad sample" not in p.stderr and "broken" not in line


def test_image_size_the_model_cannot_take_is_refused_before_anything_is_written(mask_shards, tmp_path):
    """A ConvNeXt at 8 px failed in its first training step (a traceback, exit 1, after config.yaml
    and run.json were written); now: one line naming the sizes it takes, exit 2, no run folder."""
    out = tmp_path / "o"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *BASE, "--model", "test_convnext",
                  "--img-size", "8"])
    assert_one_line(p.returncode, p.stderr, "--img-size 8: test_convnext cannot take 8x8 images",
                    "pass --img-size 32")
    assert not out.exists()


def test_batch_that_cannot_be_allocated_names_the_setting():
    """One image may fit where the batch does not (an expanded view: 3 x 10^14 elements, no memory)."""
    image = torch.zeros(3, 1, 1, dtype=torch.uint8).expand(3, 10**7, 10**7)
    with pytest.raises(UserError, match=r"--img-size 10000000: out of memory making a batch of 4 images"):
        eval_collate([(image, 0, f"k{i}", i) for i in range(4)])


def _raising(error: Exception) -> Callable:
    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise error
    return criterion


@pytest.fixture
def own_signal_handlers():
    """A Trainer run in-process installs SIGTERM/SIGUSR1 handlers (train.guard); left behind, they
    would keep later tests' forked pool workers from dying on terminate()."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_out_of_memory_in_the_step_names_batch_and_image_size(mask_shards, tmp_path, own_signal_handlers):
    from dist_train.config import Config, validate
    from dist_train.train.trainer import Trainer

    cfg = validate(Config.from_flat(dict(model="test_resnet", img_size=32, batch_size=4, grad_accum_steps=2, epochs=1,
                                         workers=0, val_split=None, data=str(mask_shards), output=str(tmp_path / "o"))))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(UserError) as e:
        Trainer(cfg, criterion=_raising(oom)).train()
    for part in ("--batch-size 4", "--img-size 32", f"{4 * 3 * 32 * 32 * 4:,} bytes", "--grad-accum-steps",
                 "smaller --batch-size"):
        assert part in str(e.value), str(e.value)
    with pytest.raises(RuntimeError, match="a bug, not memory"):  # other errors are not dressed up
        Trainer(cfg.replace(output=str(tmp_path / "o2")), criterion=_raising(RuntimeError("a bug, not memory"))).train()


# ----------------------------------------------------------------------------- 3. remote shard sets
@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """The local servers below must be reached directly, never through a proxy of the environment."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@contextlib.contextmanager
def http_folder(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/x"
    finally:
        server.shutdown()
        server.server_close()


def test_http_404_names_url_and_status(tmp_path):
    with http_folder(tmp_path) as url, pytest.raises(UserError) as e:
        load_info(url)
    assert str(e.value).startswith(f"{url}/_info.json: cannot read shard info (HTTP 404 File not found)")


def test_http_refused_is_one_line(mask_shards, tmp_path, capfd):
    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    code, err = call(run.main, ["--data", url, "--output", str(tmp_path / "o"), *BASE], capfd)
    line = assert_one_line(code, err, f"{url}/_info.json: cannot read shard info (Connection refused)")
    assert "curl" not in line and "(['" not in line


def test_http_timeout_is_one_line_and_configurable(monkeypatch):
    with socket.socket() as s:  # accepts connections (the kernel's backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/x"
        monkeypatch.setenv("DIST_TRAIN_HTTP_TIMEOUT", "0.3")
        with pytest.raises(UserError, match=r"cannot read shard info \(no answer within 0.3 s; set "
                                            r"DIST_TRAIN_HTTP_TIMEOUT to wait longer\)"):
            load_info(url)
        monkeypatch.setenv("DIST_TRAIN_HTTP_TIMEOUT", "soon")
        with pytest.raises(UserError, match="DIST_TRAIN_HTTP_TIMEOUT='soon': expected a positive number"):
            load_info(url)


def test_failing_pipe_command_gives_status_and_stderr_not_a_tuple(tmp_path, capfd):
    """The command's stderr goes into the line instead of straight to the terminal (capfd sees
    file descriptor 2, where the child writes)."""
    root = f"pipe:cat {tmp_path}/missing/{{}}"
    code, err = call(run.main, ["--data", root, "--output", str(tmp_path / "o"), *BASE], capfd)
    line = assert_one_line(code, err, f"pipe:cat {tmp_path}/missing/_info.json: cannot read shard info "
                                      "(command exited with status 1: cat: ", "No such file or directory")
    assert len(err.strip().splitlines()) == 1 and "(('" not in line


def test_pipe_command_that_succeeds_keeps_its_stderr(mask_shards, capfd):
    info = load_info(f"pipe:echo a note >&2; cat {mask_shards}/{{}}")
    assert "train" in info["splits"]
    assert "a note" in capfd.readouterr().err


# ----------------------------------------------------------------------------- 4. file names
BAD_NAMES = ["../x-000000.tar", "a-000000.tar; touch {marker}", "$(touch {marker})-000000.tar",
             "`touch {marker}`.tar", "/etc/passwd", "train-000000.tar\n"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("root", ["local", "pipe"])
def test_shard_names_that_could_run_code_or_escape_are_refused(root, name, mask_shards, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted"
    shutil.copytree(mask_shards, crafted)
    info = json.loads((crafted / "_info.json").read_text())
    bad = name.format(marker=marker)
    info["splits"]["train"]["filenames"][1] = bad
    (crafted / "_info.json").write_text(json.dumps(info))
    data = str(crafted) if root == "local" else f"pipe:cat {crafted}/{{}}"
    code, err = call(run.main, ["--data", data, "--output", str(tmp_path / "o"), *BASE], capsys)
    assert_one_line(code, err, f"split 'train': shard name {bad!r} in _info.json refused")
    with pytest.raises(UserError, match="shard name .* refused"):
        shard_urls(data, info, "train")
    assert not marker.exists()


def test_inspect_refuses_a_checksum_entry_outside_the_folder(mask_shards, tmp_path, capsys):
    crafted = tmp_path / "crafted"
    shutil.copytree(mask_shards, crafted)
    info = json.loads((crafted / "_info.json").read_text())
    info["sha256"]["../../etc/passwd"] = "0" * 64
    (crafted / "_info.json").write_text(json.dumps(info))
    code, err = call(shard.main, ["--inspect", str(crafted)], capsys)
    assert_one_line(code, err, "shard name '../../etc/passwd' in _info.json refused")
