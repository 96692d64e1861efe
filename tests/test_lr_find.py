"""The LR range test (`python -m dist_train.lr_find`): one JSON line, only the plot written, the
same suggestion on every rank, bad input in one line."""

from __future__ import annotations

import json
import math
import os

import pytest
from PIL import Image

from conftest import launch

FLAGS = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--seed", "0", "--workers", "0"]
SWEEP = ["--start-lr", "1e-5", "--end-lr", "10", "--num-steps", "16"]


def lr_find(args: list[str], capsys) -> tuple[int, str, str]:
    """dist_train.lr_find's main in this process: (exit code, stdout, stderr)."""
    from dist_train.lr_find import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def check_result(stdout: str, world_size: int) -> float:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, lines  # one JSON line, nothing else on stdout
    result = json.loads(lines[0])
    assert result["world_size"] == world_size and result["steps"] > 11
    assert math.isfinite(result["lr"]) and 1e-5 <= result["lr"] <= 10
    return result["lr"]


def test_lr_find_writes_only_the_plot_and_prints_the_suggestion(mask_shards, tmp_path, monkeypatch, capsys):
    """Default --output is the current folder; it ends up holding lr_find.png and nothing else.
    A second run in the same process suggests the same LR: nothing of the first one carried over."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = lr_find(["--data", str(mask_shards), *FLAGS, *SWEEP], capsys)
    assert code == 0, err[-3000:]
    lr = check_result(out, 1)
    assert sorted(os.listdir(here)) == ["lr_find.png"]
    with Image.open(here / "lr_find.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    code, out, err = lr_find(["--data", str(mask_shards), *FLAGS, *SWEEP, "--output", str(tmp_path / "again")], capsys)
    assert code == 0, err[-3000:]
    assert check_result(out, 1) == lr
    assert os.listdir(tmp_path / "again") == ["lr_find.png"]


@pytest.mark.ranks
def test_lr_find_under_accelerate_launch_agrees_and_prints_once(mask_shards, tmp_path):
    out = tmp_path / "lr"
    p = launch(["dist_train/lr_find.py", "--data", str(mask_shards), *FLAGS, *SWEEP, "--output", str(out)])
    check_result(p.stdout, 2)  # the ranks' suggestions are compared by the tool itself (exit 1 if they differ)
    assert os.listdir(out) == ["lr_find.png"]


@pytest.mark.parametrize("args, words", [
    (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr 1.0 >= --end-lr 0.1"),
    (["--num-steps", "15"], "--num-steps 15: expected at least 16"),
    (["--early-stop-threshold", "0.5"], "--early-stop-threshold 0.5"),
    (["--start-lr", "abc"], "--start-lr"),
])
def test_lr_find_bad_input_is_one_line(mask_shards, tmp_path, capsys, args, words):
    code, out, err = lr_find(["--data", str(mask_shards), *FLAGS, "--output", str(tmp_path / "o"), *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0], err[-2000:]
    assert out == "" and not (tmp_path / "o").exists()


def test_lr_find_that_diverges_at_once_says_so(mask_shards, tmp_path, capsys):
    """LRs far too high: the loss explodes within a few steps, too few for a suggestion; one
    line, exit 1, and the plot is still there to look at."""
    code, out, err = lr_find(["--data", str(mask_shards), *FLAGS, "--output", str(tmp_path / "o"),
                              "--start-lr", "1e3", "--end-lr", "1e8", "--num-steps", "20"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "too few for a suggestion; lower --start-lr" in lines[-1], err[-2000:]
    assert out == "" and os.listdir(tmp_path / "o") == ["lr_find.png"]


def test_plot_keeps_the_lowest_loss_and_cuts_a_diverging_tail():
    from dist_train.train.lr_find import y_limits

    raw = [3.0, 2.9, 1.2, 2.5, 2.0, 40.0, float("nan")]  # a dip the smoothed curve never reaches, then divergence
    smoothed = [3.0, 2.95, 2.5, 2.5, 2.4, 9.0, float("inf")]
    lo, hi = y_limits(raw, smoothed)
    assert lo < 1.2 < 3.0 < hi  # the raw minimum and the start are on the plot
    assert hi < 9.0  # the divergence leaves the top: start + as much as it fell (3.0 + 1.8), padded
    assert y_limits([float("nan")], [float("nan")]) is None
