"""Shared fixtures: one tiny synthetic mask dataset, sharded once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def raw_mask(tmp_path_factory) -> Path:
    """Synthetic competition layout: DIR/train/{train.csv,images/}, DIR/eval/{info.csv,images/}."""
    from dist_train.synth import make_dataset

    out = tmp_path_factory.mktemp("raw") / "data"
    make_dataset(out, persons=30, seed=0, size=32, eval_persons=4)
    return out


@pytest.fixture(scope="session")
def mask_shards(raw_mask, tmp_path_factory) -> Path:
    """Train/validation shards of the synthetic set: an uneven shard count (7 for train)."""
    from dist_train.shard import write_shards

    out = tmp_path_factory.mktemp("shards") / "mask"
    info = write_shards(raw_mask / "train", out, samples_per_shard=25, workers=1, progress=False)
    assert len(info["splits"]["train"]["filenames"]) >= 5
    return out


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
