"""Files and folders written atomically (temp name, rename) get the mode any plain write would:
0666 & ~umask for files, 0777 & ~umask for folders, not mkstemp's private 0600 / mkdtemp's 0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dist_train.errors import atomic_write_bytes, temp_dir, umask


@pytest.fixture(params=[0o022, 0o077, 0o002])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_reads_the_process_umask(mask):
    assert umask() == mask


def test_atomic_writes_and_folders_follow_the_umask(tmp_path, mask):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert mode(tmp_path / "a.json") == 0o666 & ~mask
    folder = temp_dir(tmp_path, "best")
    assert mode(folder) == 0o777 & ~mask


def test_shards_info_and_best_follow_the_umask(tmp_path):
    """The shard writer's tars and _info.json under umask 077 then 022, and a best/-style export."""
    from PIL import Image

    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), "red").save(src / c / f"{i}.png")
    old = os.umask(0o077)
    try:
        check_writers(src, tmp_path)
    finally:
        os.umask(old)


def check_writers(src: Path, tmp_path: Path) -> None:
    from dist_train.model.build import create_model
    from dist_train.model.export import save_for_timm
    from dist_train.shardset.writer import write_shards

    out = tmp_path / "shards"
    write_shards(src, out, layout="folder", samples_per_shard=4, workers=1, progress=False)
    written = [p for p in out.iterdir() if p.is_file()]
    assert any(p.suffix == ".tar" for p in written) and (out / "_info.json") in written
    assert {mode(p) for p in written} == {0o600}
    os.umask(0o022)
    write_shards(src, out, layout="folder", samples_per_shard=4, workers=1, progress=False, overwrite=True)
    assert {mode(p) for p in out.iterdir() if p.is_file()} == {0o644}
    model = create_model("test_resnet", 2, img_size=16)
    save_for_timm(model, tmp_path / "best", model_name="test_resnet", num_classes=2, label_names=["a", "b"],
                  img_size=16, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert mode(tmp_path / "best") == 0o755
    assert {mode(p) for p in (tmp_path / "best").iterdir()} == {0o644}


def test_a_run_folder_follows_the_umask(mask_shards, tmp_path):
    """Everything a 1-step run writes (config.yaml, run.json, metrics, confusion.csv/png, best/,
    the checkpoint's safetensors and progress.json) under umask 027: files 0640, folders 0750."""
    from conftest import run_main

    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        p = run_main(["--data", str(mask_shards), "--output", str(out), "--model", "test_resnet", "--img-size", "32",
                      "--batch-size", "8", "--workers", "0", "--max-steps", "1", "--eval-every", "1",
                      "--log-with", "none", "--plots"])
    finally:
        os.umask(old)
    assert p.returncode == 0, p.stderr[-2000:]
    files = [q for q in out.rglob("*") if q.is_file()]
    names = {q.name for q in files}
    assert {"config.yaml", "run.json", "model.safetensors", "progress.json", "confusion.png"} <= names, names
    assert {str(q.relative_to(out)): oct(mode(q)) for q in files if mode(q) != 0o640} == {}
    assert {str(q.relative_to(out)): oct(mode(q)) for q in out.rglob("*") if q.is_dir() and mode(q) != 0o750} == {}
