"""The shard writer's worker pool: independent of the caller's __main__, ordered, failures reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dist_train.errors import RunFailed
from dist_train.shardset.images import check_and_encode, check_image, encode_image
from dist_train.shardset.pool import WorkerPool, _chunks, pool_map

from conftest import ROOT


def test_write_shards_from_stdin_main_that_imported_torch(raw_mask, tmp_path):
    """`python -` (no main file to re-run) that imported torch: 2 workers finish and write the
    same bytes as 1 (multiprocessing's forkserver spun forever here)."""
    script = textwrap.dedent(f"""
        import contextlib, json, sys
        import torch  # a heavy __main__: workers must not import it again
        from dist_train.shardset.writer import write_shards
        shas = []
        for w in (2, 1):
            with contextlib.redirect_stdout(sys.stderr):
                info = write_shards({str(raw_mask / "train")!r}, {str(tmp_path)!r} + f"/w{{w}}", resize=16,
                                    workers=w, progress=False)
            shas.append(info["sha256"])
        print(json.dumps(shas))
    """)
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = json.loads(proc.stdout.strip().splitlines()[-1])
    assert two == one and len(two) > 2
    for name in one:
        assert (tmp_path / "w2" / name).read_bytes() == (tmp_path / "w1" / name).read_bytes()


def test_pool_map_keeps_order_and_equals_in_process(raw_mask):
    paths = sorted(str(p) for p in (raw_mask / "train" / "images").rglob("*")
                   if p.suffix in (".jpg", ".png") and not p.name.startswith("."))[:40]
    tasks = [(p, 8 + i % 3, 90) for i, p in enumerate(paths)]
    assert list(pool_map(encode_image, tasks, 2, "", False)) == [encode_image(t) for t in tasks]
    checks = [(p, 10**8) for p in paths]
    assert list(pool_map(check_image, checks, 3, "", False)) == [None] * len(paths)
    for resize in (None, 8):  # fingerprints and (with resize) the encoded member through the pipes
        one_pass = [(p, 10**8, resize, 90) for p in paths]
        results = list(pool_map(check_and_encode, one_pass, 2, "", False))
        assert results == [check_and_encode(t) for t in one_pass] and all(why is None for (why, _, _), _ in results)
        assert all(bool(data) == (resize is not None) for _, data in results)


def test_worker_failure_is_a_run_failed_line(tmp_path):
    missing = [(str(tmp_path / f"gone{i}.jpg"), 16, 90) for i in range(4)]
    with pytest.raises(RunFailed, match="gone0.jpg"):
        list(pool_map(encode_image, missing, 2, "", False))
    with pytest.raises(ValueError, match="not a shard worker function"):
        with WorkerPool(1) as pool:
            list(pool.imap(print, ["x", "y"], 1))


def test_requests_stay_under_the_pipe_buffer():
    long = ["/" + "x" * 4000 + str(i) for i in range(64)]
    requests = _chunks("check_image", long, 64)
    assert len(requests) > 1 and all(len(r) <= 32 * 1024 + 4 for r in requests)
    assert sum(len(json.loads(r[4:])[2]) for r in requests) == 64


def test_one_set_of_workers_for_the_check_and_write_passes(raw_mask):
    from dist_train.shardset import pool as pool_module

    paths = sorted(str(p) for p in (raw_mask / "train" / "images").rglob("*.jpg") if not p.name.startswith("."))[:8]
    pids = []

    @pool_module.reuse_workers
    def two_passes() -> list:
        checked = list(pool_map(check_image, [(p, 10**8) for p in paths], 2, "", False))
        pids.append([p.pid for p in pool_module._session[-1].procs])
        encoded = list(pool_map(encode_image, [(p, 8, 90) for p in paths], 2, "", False))
        pids.append([p.pid for p in pool_module._session[-1].procs])
        return [checked, encoded]

    checked, encoded = two_passes()
    assert checked == [None] * 8 and encoded == [encode_image((p, 8, 90)) for p in paths]
    assert pids[0] == pids[1] and len(pids[0]) == 2 and pool_module._session == []


def test_workers_keep_freed_memory_unless_the_user_says_otherwise(monkeypatch):
    """The workers start with glibc's malloc told to keep freed memory (no fresh pages per image);
    a setting the user exported wins."""
    from dist_train.shardset import pool as pool_module

    envs = []
    real = subprocess.Popen
    monkeypatch.setattr(pool_module.subprocess, "Popen", lambda *a, **k: envs.append(k["env"]) or real(*a, **k))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    with WorkerPool(2) as pool:
        assert list(pool.imap(check_image, [], 1)) == []
    assert len(envs) == 2
    assert envs[0]["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20) and envs[0]["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert envs[0]["PATH"] == os.environ["PATH"]  # the rest of the environment is the caller's
