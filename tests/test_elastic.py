"""A resume on another world size, worker count or batch size continues the same run: the
interrupted epoch delivers the samples it had not delivered (each once, up to padding under one
global batch), the epoch ends where it did, and the LR curve continues at the same point.
Checked through --log-samples (every rank, every step: keys and LR) and metrics.jsonl."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import launch, run_main

BASE = ["--model", "test_resnet", "--img-size", "32", "--lr", "0.01", "--seed", "0", "--warmup-epochs", "0.5",
        "--val-split", "none", "--epochs", "2", "--sched", "cosine", "--min-lr", "0.0001", "--no-plots"]


def train(shards: Path, out: Path, log: Path, nproc: int, *args: str) -> None:
    argv = ["--data", str(shards), "--output", str(out), "--log-samples", str(log), *BASE, *args]
    if nproc == 1:
        p = run_main(argv)
        assert p.returncode == 0, p.stderr[-3000:]
    else:
        launch(["dist_train/run.py", *argv], nproc=nproc, timeout=180)


def lines(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(mask_shards, tmp_path_factory) -> tuple[list[dict], list[dict], set[str]]:
    """One uninterrupted run: its log, its metrics, and the train split's keys."""
    out = tmp_path_factory.mktemp("elastic") / "full"
    train(mask_shards, out, out.parent / "full.jsonl", 1, "--batch-size", "8", "--workers", "0")
    log = lines(out.parent / "full.jsonl")
    keys = {k for line in log if line["epoch"] == 0 for k in line["keys"]}
    return log, metrics(out), keys


CASES = {  # name: (first launch: processes, flags), (resumed launch: processes, flags), stop step
    "2->1 processes": ((2, ["--batch-size", "8", "--workers", "1"]), (1, ["--batch-size", "8", "--workers", "0"]), 4),
    "1->2 processes": ((1, ["--batch-size", "8", "--workers", "0"]), (2, ["--batch-size", "8", "--workers", "1"]), 9),
    "0->2 workers": ((1, ["--batch-size", "8", "--workers", "0"]), (1, ["--batch-size", "8", "--workers", "2"]), 8),
    "batch 8->4": ((1, ["--batch-size", "8", "--workers", "0"]), (1, ["--batch-size", "4", "--workers", "1"]), 13),
}


@pytest.mark.ranks
@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_layout_continues_the_run(mask_shards, tmp_path, reference, case):
    (n1, first), (n2, second), stop = CASES[case]
    full_log, full_metrics, all_keys = reference
    out, log = tmp_path / "run", tmp_path / "samples.jsonl"
    train(mask_shards, out, log, n1, *first, "--max-steps", str(stop))
    before = len(lines(log))
    train(mask_shards, out, log, n2, *second, "--resume", "auto")
    got = lines(log)
    assert len(got) > before and {x["rank"] for x in got} == set(range(max(n1, n2)))
    largest_global_batch = max(n * int(f[f.index("--batch-size") + 1]) for n, f in ((n1, first), (n2, second)))
    for epoch in (0, 1):
        counts = Counter(k for x in got if x["epoch"] == epoch for k in x["keys"])
        assert set(counts) == all_keys, f"epoch {epoch}: samples missing or foreign"
        extra = sum(counts.values()) - len(all_keys)
        assert 0 <= extra < largest_global_batch, f"epoch {epoch}: {extra} repeats"
    # the interrupted epoch: what the first launch delivered is not delivered again (padding aside)
    early = Counter(k for x in got[:before] for k in x["keys"])
    late = Counter(k for x in got[before:] if x["epoch"] == 0 for k in x["keys"])
    assert sum((early & late).values()) < largest_global_batch
    # the schedule is a function of the samples delivered: the same LR at every epoch end
    assert [m["epoch"] for m in metrics(out)] == [m["epoch"] for m in full_metrics] == [0, 1]
    for mine, ref in zip(metrics(out), full_metrics):
        assert mine["lr"] == pytest.approx(ref["lr"], rel=1e-9, abs=1e-12), (mine, ref)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["epoch"] == 2


def test_log_samples_lines_and_lr(mask_shards, reference):
    """One line per optimizer step and rank; the LR column follows warmup then cosine decay."""
    log, _, keys = reference
    assert [x["step"] for x in log] == list(range(len(log)))
    assert all(len(x["keys"]) == 8 and x["rank"] == 0 for x in log)
    lrs = [x["lr"] for x in log]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[0] < lrs[peak] and lrs[-1] < lrs[peak]
    assert len(keys) == 168
