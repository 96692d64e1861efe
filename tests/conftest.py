"""Shared fixtures: one tiny synthetic mask dataset, sharded once per test session."""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has set up its factory
def pytest_configure(config):
    """TMPDIR for everything the suite starts (torchrun's `torchelastic_*` folders, multiprocessing's
    `pymp-*`, wandb's media folders, our own temporary folders): a folder in this session's pytest
    temporary folder (pytest keeps the last three sessions' and removes older ones), not /tmp, where
    each run of the suite left ~200 of them. Set here, before any test module is imported: some
    copy os.environ at import for the processes they start."""
    import tempfile

    path = config._tmp_path_factory.getbasetemp() / "tmpdir"
    path.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # tempfile caches its choice: made again from TMPDIR


@pytest.fixture(scope="session")
def raw_mask(tmp_path_factory) -> Path:
    """Synthetic competition layout: DIR/train/{train.csv,images/}, DIR/eval/{info.csv,images/}."""
    from dist_train.tasks.mask.synth import make_dataset

    out = tmp_path_factory.mktemp("raw") / "data"
    make_dataset(out, persons=30, seed=0, size=32, eval_persons=4)
    return out


@pytest.fixture(scope="session")
def mask_shards(raw_mask, tmp_path_factory) -> Path:
    """Train/validation shards of the synthetic set: an uneven shard count (7 for train)."""
    from dist_train.shardset.writer import write_shards

    out = tmp_path_factory.mktemp("shards") / "mask"
    info = write_shards(raw_mask / "train", out, samples_per_shard=25, workers=1, progress=False)
    assert len(info["splits"]["train"]["filenames"]) >= 5
    return out


@pytest.fixture(scope="session")
def folder_shards(tmp_path_factory) -> Path:
    """A class-folder set (3 classes x 10 plain-colour 32 px images), sharded: plain classification."""
    from PIL import Image, ImageColor

    from dist_train.shardset.writer import write_shards

    src = tmp_path_factory.mktemp("folder") / "colours"
    for c, colour in enumerate(["red", "green", "blue"]):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(10):  # shades apart: identical images would be exact duplicates, kept in one split
            shade = tuple(max(0, v - 3 * i) for v in ImageColor.getrgb(colour))
            Image.new("RGB", (32, 32), shade).save(src / f"class{c}" / f"{i:03d}.png")
    out = src.parent / "shards"
    info = write_shards(src, out, layout="folder", samples_per_shard=10, workers=1, progress=False)
    assert len(info["classes"]) == 3
    return out


# --- the suite under pytest-xdist -------------------------------------------------------------
# `launch/test.sh` runs 2 xdist workers with `--dist loadscope` and the scheduler below: tests
# marked `ranks` start several processes at once (a DDP launch keeps ~1.5 cores busy) and run one
# after another on one worker, so two launches never share the 2 cores and their timeouts keep
# their margins; every other test runs with the rest of its module (its fixtures built once).
# (xdist's own `--dist loadgroup` cannot be used: with pytest 9 it drops every group.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # In-process runs set 2 torch threads when OMP_NUM_THREADS is unset; beside the other worker's
    # ranks that oversubscribes the cores, and OpenMP's waiting threads then slow a test 10-30x.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@functools.lru_cache(maxsize=None)
def ranks_tests(path: Path) -> frozenset[str]:
    """Names of the test functions of a test file marked `@pytest.mark.ranks` (read from its
    source: the xdist controller schedules before any test module is imported)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return frozenset()
    return frozenset(node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                     and any(ast.unparse(d).split("(")[0] == "pytest.mark.ranks" for d in node.decorator_list))


def xdist_scope(nodeid: str) -> str:
    """The scheduling unit of a test: "ranks" for the DDP launches, else its module."""
    path, _, rest = nodeid.partition("::")
    name = rest.split("[")[0].rsplit("::", 1)[-1]
    return "ranks" if name in ranks_tests(ROOT / path) else path


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RanksTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return RanksTogether(config, log)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` N CPU processes of dist_train/run.py (or another script)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if nproc > 1:
        cmd += ["--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", str(free_port())]
    else:
        cmd += ["--num_processes", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd + args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def with_plots_off(args: list[str]) -> list[str]:
    """Runs in tests draw no pictures unless the test asks (`--plots`): matplotlib costs ~2 s of a
    5 s tiny run. The pictures' own tests pass --plots."""
    return args if {"--plots", "--no-plots"} & set(args) else [*args, "--no-plots"]


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    """`python dist_train/run.py ARGS` in this process (its imports already paid for): the exit
    code, stdout and stderr as a subprocess would give them. Process-wide state a run sets
    (signal handlers, webdataset's secure mode, anomaly detection) is put back afterwards."""
    import contextlib
    import io
    import signal

    import torch
    import webdataset

    from dist_train.run import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    secure, secure_env = webdataset.utils.enforce_security, os.environ.get("WDS_SECURE")
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(with_plots_off(list(args)))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        webdataset.utils.enforce_security = secure
        if secure_env is None:
            os.environ.pop("WDS_SECURE", None)
        torch.autograd.set_detect_anomaly(False)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def fold_shards(raw_mask, tmp_path_factory) -> Path:
    """The synthetic set sharded with --folds 3 (every sample in train, no validation split)."""
    from dist_train.shardset.writer import write_shards

    out = tmp_path_factory.mktemp("shards") / "mask_folds"
    info = write_shards(raw_mask / "train", out, samples_per_shard=25, workers=1, progress=False, folds=3,
                        val_fraction=0.0)
    assert info["splits"]["train"]["folds"] == 3 and "validation" not in info["splits"]
    return out
