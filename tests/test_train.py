"""The trainer end to end on CPU: DDP with gloo, exact validation, resume, debug, bad config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, run_main

BASE = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--lr", "0.01", "--seed", "0",
        "--warmup-epochs", "0", "--no-plots"]


def run_py(args: list[str]) -> subprocess.CompletedProcess:
    """dist_train/run.py in this process (conftest.run_main): the same exit code and output."""
    return run_main(args)


def run_script(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python dist_train/run.py ARGS` as its own process."""
    return subprocess.run([sys.executable, "dist_train/run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                "HF_HUB_OFFLINE": "1", "TMPDIR": os.environ["TMPDIR"]})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ranks
def test_ddp_two_ranks_uneven_shards(mask_shards, tmp_path):
    """Uneven shards over 2 ranks x 2 workers, with model EMA and a stage change (one launch for
    both): the ranks stay identical, the EMA too. The EMA is updated after each step on every
    rank from the same weights (BatchNorm statistics taken from rank 0, as DDP's next forward
    would) and follows the stage change."""
    info = json.loads((mask_shards / "_info.json").read_text())
    assert len(info["splits"]["train"]["filenames"]) % 2 == 1  # uneven over 2 ranks x 2 workers
    out = tmp_path / "run"
    launch(["dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "2",
            "--workers", "2", "--model-ema", "--model-ema-decay", "0.9", "--unfreeze", "head:1,all", "--plots"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(set(summary["steps_per_rank"])) == 1 and summary["steps_per_rank"][0] > 0
    assert len(set(summary["batches_per_rank"])) == 1
    assert len(set(summary["param_hash_per_rank"])) == 1  # DDP kept the ranks identical
    ema = summary["ema_hash_per_rank"]
    assert len(set(ema)) == 1 and ema[0] != summary["param_hash_per_rank"][0]
    assert all("val_macro_f1_ema" in r for r in metrics(out))
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["val_samples"] == info["splits"]["validation"]["num_samples"] for r in rows)
    for key in ("step", "lr", "train_loss", "val_loss", "val_acc", "val_macro_f1", "images_per_s",
                "trainable_params", "stage", "val_mask_acc"):
        assert key in rows[0]
    assert all(0 < r["data_wait"] <= 1 for r in rows)  # the slower rank's share of time waiting for batches
    assert (out / "config.yaml").is_file() and (out / "best" / "model.safetensors").is_file()
    assert (out / "best" / "config.json").is_file() and (out / "confusion.png").is_file()
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and all((c / "model.safetensors").is_file() for c in ckpts)
    assert list((out / "tb").rglob("events.out.tfevents*"))



@pytest.mark.ranks
def test_ddp_multi_head_cutmix_focal(mask_shards, tmp_path):
    """Soft targets under DDP: each rank mixes its own batches (its own lambda), the three heads'
    focal losses on the marginals all-reduce, and the ranks stay identical."""
    out = tmp_path / "run"
    launch(["dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1",
            "--workers", "0", "--head", "multi", "--cutmix", "1.0", "--loss", "focal", "--max-steps", "4",
            "--eval-every", "4", "--val-split", "none"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_per_rank"] == [4, 4]
    assert len(set(summary["param_hash_per_rank"])) == 1
    row = metrics(out)[-1]
    assert row["step"] == 4 and 0 < row["train_loss"] < float("inf")

@pytest.mark.parametrize("workers", [0, 3])
def test_val_samples_exact_single_process(mask_shards, tmp_path, workers):
    info = json.loads((mask_shards / "_info.json").read_text())
    out = tmp_path / "run"
    proc = run_py(["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1",
                   "--workers", str(workers), "--max-steps", "2", "--eval-every", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    assert rows and all(r["val_samples"] == info["splits"]["validation"]["num_samples"] for r in rows)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1


def test_resume_equals_uninterrupted(mask_shards, tmp_path):
    common = ["--data", str(mask_shards), *BASE, "--epochs", "2", "--workers", "0", "--drop", "0.2",
              "--hflip", "0.5", "--val-split", "none"]
    full, part = tmp_path / "full", tmp_path / "part"
    p = run_py([*common, "--output", str(full)])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_py([*common, "--output", str(part), "--max-steps", "5"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((part / "summary.json").read_text())["step"] == 5
    p = run_py([*common, "--output", str(part), "--resume", "auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    last = lambda d: sorted((d / "checkpoints").iterdir())[-1]  # noqa: E731
    assert last(full).name == last(part).name
    a, b = load_file(last(full) / "model.safetensors"), load_file(last(part) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_existing_checkpoints_need_resume_flag(mask_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1", "--workers", "0",
            "--max-steps", "1", "--val-split", "none"]
    assert run_py(args).returncode == 0
    p = run_py(args)
    assert p.returncode == 2 and "--resume auto" in p.stderr and "Traceback" not in p.stderr


def test_debug_mode(mask_shards):
    p = run_script(["--debug", "--data", str(mask_shards), *BASE, "--debug-steps", "2"])  # the README's command
    assert p.returncode == 0, p.stderr[-3000:]
    assert "debug: images (8, 3, 32, 32)" in p.stdout and "label histogram" in p.stdout
    assert "world size 1" in p.stdout


def test_overfit_batches(mask_shards):
    """A healthy model with the default --smoothing 0.1: its loss cannot reach 0, it falls to the
    floor the smoothed loss can reach (tests/test_run_output.py: the floor, and a broken model)."""
    p = run_py(["--data", str(mask_shards), *BASE, "--overfit-batches", "2", "--max-steps", "80", "--lr", "0.003"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(lowest reachable with this loss: 0.58" in p.stdout and "falls to the floor (OK)" in p.stdout, p.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--data is required"),
    (["--data", "/nonexistent/shards"], "/nonexistent/shards"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--img-size", "-3"], "--img-size -3"),
    (["--epochs", "0"], "--epochs 0"),
    (["--model", "no_such_model_xyz"], "no_such_model_xyz"),
    (["--train-split", "nope"], "nope"),
    (["--batch-size", "100000"], "larger than split"),
    (["--mixed-precision", "fp8"], "fp8"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
])
def test_bad_input_one_line_exit_2(mask_shards, tmp_path, args, message):
    data = [] if args[:1] == ["--data"] or not args else ["--data", str(mask_shards)]
    if args == []:
        data = []
    p = run_py([*data, "--output", str(tmp_path / "o"), "--model", "test_resnet", *args])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_config_file_errors(mask_shards, tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("model: test_resnet\nlearning_rate: 0.1\n")
    p = run_py(["--config", str(bad_key), "--data", str(mask_shards)])
    assert p.returncode == 2 and "unknown key 'learning_rate'" in p.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    p = run_py(["--config", str(broken), "--data", str(mask_shards)])
    assert p.returncode == 2 and "not valid YAML" in p.stderr and "Traceback" not in p.stderr


def test_yaml_values_and_flag_override(tmp_path):
    from dist_train.config import parse_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: resnet50\nlr: 0.5\nscale: [0.3, 0.9]\nunfreeze: head:1,all\n")
    cfg = parse_config(["--config", str(cfg_file), "--data", "x", "--lr", "0.1"])
    assert (cfg.model.model, cfg.optim.lr, cfg.augment.scale, cfg.stages.unfreeze) == ("resnet50", 0.1, [0.3, 0.9],
                                                                                      "head:1,all")


def test_resume_other_model_refused(mask_shards, tmp_path):
    out = tmp_path / "run"
    assert run_py(["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1", "--workers", "0",
                   "--max-steps", "1", "--val-split", "none"]).returncode == 0
    p = run_py(["--data", str(mask_shards), "--output", str(out), *BASE, "--model", "test_efficientnet",
                "--epochs", "1", "--workers", "0", "--resume", "auto", "--val-split", "none"])
    assert p.returncode == 2 and "test_resnet" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.ranks
def test_torchrun_two_ranks(mask_shards, tmp_path):
    from conftest import free_port

    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "dist_train/run.py", "--data", str(mask_shards),
                        "--output", str(out), *BASE, "--epochs", "1", "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                            "TMPDIR": os.environ["TMPDIR"]})
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert len(set(summary["steps_per_rank"])) == 1 and len(set(summary["param_hash_per_rank"])) == 1
