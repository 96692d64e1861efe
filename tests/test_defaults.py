"""Defaults that depend on the machine: loader workers from the cores per process, and
--gpu-decode refused for training where there is no CUDA (benchmarks say so in one line)."""

from __future__ import annotations

import pytest
import torch

import dist_train.bench as bench
import dist_train.system as system
from conftest import run_main
from dist_train.config import parse_config


@pytest.mark.parametrize("cpus, local, workers", [(2, None, 1), (2, "2", 0), (16, None, 8), (16, "2", 7),
                                                  (64, "8", 7), (1, None, 0)])
def test_workers_default_follows_the_cores_per_process(monkeypatch, cpus, local, workers):
    monkeypatch.setattr(system, "usable_cpus", lambda: cpus)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert system.default_workers() == workers
    assert parse_config(["--data", "x"]).data.workers == workers  # config.yaml records the number
    assert parse_config(["--data", "x", "--workers", "0"]).data.workers == 0


def test_config_yaml_records_the_precision_that_ran(folder_shards, tmp_path):
    """No --mixed-precision: Accelerate's launch config decides (`accelerate launch --config_file
    launch/single_gpu.yaml`: bf16). config.yaml said `mixed_precision: null`, so the same file
    re-run under another launcher trained in another precision; it records the resolved one."""
    import yaml

    out = tmp_path / "run"
    p = run_main(["--data", str(folder_shards), "--output", str(out), "--model", "test_resnet", "--img-size", "32",
                  "--max-steps", "1", "--workers", "0", "--batch-size", "4", "--val-split", "none"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == "no"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_decode_without_cuda_is_refused_for_training(mask_shards, tmp_path):
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), "--model", "test_resnet", "--gpu-decode"])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --gpu-decode: no CUDA GPU here") and "drop it" in lines[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the line is for machines without CUDA")
def test_bench_gpu_decode_without_cuda_says_it_runs_on_the_cpu(capsys, mask_shards):
    bench.main(["loader", "--data", str(mask_shards), "--img-size", "32", "--workers", "0", "--batch-size", "4",
                "--seconds", "0.2", "--gpu-decode"])
    captured = capsys.readouterr()
    assert '"device": "cpu"' in captured.out and '"mode": "gpu_decode"' in captured.out
    assert captured.err.strip().splitlines() == [
        'bench: --gpu-decode without CUDA: the GPU decode path runs on the CPU ("device": "cpu"); its figure says '
        "nothing about a GPU"]
