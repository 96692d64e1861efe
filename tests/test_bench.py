"""Benchmarks print one parseable JSON line; the gpu_decode path equals the CPU path on the CPU."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from dist_train import bench
from dist_train.data.device import decode_batch_on_device
from dist_train.data.loaders import build_eval_loader, build_train_loader
from dist_train.data.transforms import AugmentConfig
from dist_train.data.transforms import Transform as _Transform
from dist_train.errors import UserError
from dist_train.perf.loader import SeedDataset
from dist_train.shardset.format import load_info
from dist_train.system import usable_cpus
from dist_train.trust.media import tar_samples

ROOT = Path(__file__).resolve().parent.parent
AUG = AugmentConfig(img_size=24)
LOADER_KEYS = {"bench", "mode", "data", "split", "img_size", "workers", "batch_size", "seconds", "device",
               "images", "batches", "elapsed_s", "images_per_s"}
TRAIN_KEYS = {"bench", "input", "model", "img_size", "batch_size", "steps", "warmup", "mixed_precision",
              "channels_last", "compile", "grad_checkpointing", "gpu_decode", "workers", "device",
              "trainer_images_per_s", "data_wait_fraction", "peak_memory_mb", "memory_kind"}


def one_json_line(text: str) -> dict:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stdout, got {lines!r}"
    return json.loads(lines[0])


def run_main(capsys, argv: list[str]) -> dict:
    bench.main(argv)
    return one_json_line(capsys.readouterr().out)


def run_cli(argv: list[str]) -> dict:
    """A subprocess: the trainer's Accelerator is process-wide state."""
    proc = subprocess.run([sys.executable, "-m", "dist_train.bench", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one_json_line(proc.stdout)


# ----------------------------------------------------------------------------- commands
def test_loader_pipeline_with_seed_baseline(capsys, mask_shards, raw_mask):
    r = run_main(capsys, ["loader", "--data", str(mask_shards), "--img-size", "32", "--workers", "1",
                          "--batch-size", "4", "--seconds", "1", "--seed-baseline", str(raw_mask)])
    assert LOADER_KEYS | {"seed_images_per_s", "vs_seed"} <= set(r)
    assert r["mode"] == "pipeline" and r["workers"] == 1 and r["batch_size"] == 4 and r["img_size"] == 32
    assert r["images"] == 4 * r["batches"] > 0 and r["images_per_s"] > 0 and r["seed_images_per_s"] > 0
    assert r["vs_seed"] == pytest.approx(r["images_per_s"] / r["seed_images_per_s"], rel=1e-2)


@pytest.mark.parametrize("mode", ["--decode-only", "--gpu-decode"])
def test_loader_modes(capsys, mask_shards, mode):
    r = run_main(capsys, ["loader", "--data", str(mask_shards), "--img-size", "32", "--workers", "0",
                          "--batch-size", "4", "--seconds", "0.5", mode])
    assert LOADER_KEYS <= set(r) and "vs_seed" not in r
    assert r["mode"] == mode[2:].replace("-", "_") and r["images_per_s"] > 0


def test_seed_dataset_walks_the_raw_layout(raw_mask):
    ds = SeedDataset(raw_mask, 16)
    assert len(ds) == 30 * 7  # AppleDouble files, .ipynb_checkpoints and .DS_Store skipped
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_shard_speedup(capsys, raw_mask):
    r = run_main(capsys, ["shard", "--src", str(raw_mask / "train"), "--resize", "24"])
    assert {"bench", "src", "resize", "workers", "images", "images_per_s_1", "images_per_s_all", "speedup"} <= set(r)
    assert r["images"] == 30 * 7 and r["resize"] == 24 and r["workers"] == usable_cpus()
    assert r["speedup"] == pytest.approx(r["images_per_s_all"] / r["images_per_s_1"], rel=1e-2)
    assert r["check_draft_ms"] > 0 and r["check_fingerprint_ms"] > 0 and "fingerprint_overhead_pct" in r


def test_peers_write_and_read_the_same_images(capfd, raw_mask, monkeypatch):
    """The systems that need no extra package on a tiny set, rounds alternating; a peer whose
    package is absent (both optional peers made absent here, as in a plain install: LitData alone
    costs ~1 min of process start-ups) gets one printed skip line, the others a figure each."""
    from dist_train.perf import peers

    monkeypatch.setattr(peers, "PACKAGES", {k: f"absent_{v}" for k, v in peers.PACKAGES.items()})
    alive = []  # processes alive while a system is timed: its own worker only, no other system's

    def timed(stream, *args):
        result = rate(stream, *args)
        alive.append(len(multiprocessing.active_children()))
        return result

    rate = peers.rate
    monkeypatch.setattr(peers, "rate", timed)
    bench.main(["peers", "--src", str(raw_mask / "train"), "--resize", "24", "--img-size", "16", "--batch-size", "8",
                "--workers", "1", "--seconds", "0.2", "--rounds", "2"])
    assert alive == [1] * 8
    out, err = capfd.readouterr()
    *lines, summary = [json.loads(line) for line in out.strip().splitlines()]
    by = {x["system"]: x for x in lines}
    assert set(by) == set(bench.SYSTEMS) and len(lines) == len(bench.SYSTEMS)
    for name in ("litdata", "mosaicml_streaming"):
        assert "not installed" in by[name]["skipped"] and f"peers: skipping {name}" in err
    ran = [x for x in lines if "skipped" not in x]
    assert {x["system"] for x in ran} == {"dist_train", "limit", "seed", "timm_wds"}
    for x in ran:
        assert x["read_images_per_s"] > 0 and len(x["read_rounds"]) == 2 and x["images"] == 210
        assert x["children_left"] == 0
        assert (x["write_images_per_s"] is None) == (x["system"] in ("limit", "seed", "timm_wds"))
    assert summary["bench"] == "peers" and summary["rounds"] == 2
    assert summary["ratios"]["read_vs_seed"] == pytest.approx(
        by["dist_train"]["read_images_per_s"] / by["seed"]["read_images_per_s"], rel=1e-2)
    assert "read_vs_timm_wds" in summary["ratios"] and "read_vs_timm_wds" in summary["targets"]
    assert summary["ratios"]["read_vs_limit"] == pytest.approx(
        by["dist_train"]["read_images_per_s"] / by["limit"]["read_images_per_s"], rel=1e-2)
    assert summary["targets"]["read_vs_timm_wds"]["limit_ratio"] == pytest.approx(
        by["limit"]["read_images_per_s"] / by["timm_wds"]["read_images_per_s"], rel=1e-2)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_the_limit_does_the_loaders_work_on_every_image(mask_shards, interpolation):
    """`bench peers`' limit decodes every sample of the shards and puts each through the
    loader's own Transform, into a slot of a batch laid out as the loader's batches are: the
    same work per image as the loader, less its checks and collation."""
    from dist_train.perf.loader import DecodeOnly
    from dist_train.shardset.format import shard_urls

    urls = shard_urls(str(mask_shards), load_info(str(mask_shards)), "train")
    transform = _Transform(AugmentConfig(img_size=24, interpolation=interpolation), train=True)
    calls = []

    def spy(img, seed, out):
        calls.append((seed, out.shape, out.stride(0) == 1))  # channels innermost
        return transform(img, seed=seed, out=out)
    spy.aug, spy.channels_last = transform.aug, transform.channels_last
    samples = sum(1 for _ in tar_samples(urls, handler=lambda e: True))
    stream = iter(DecodeOnly(urls, 5, spy))
    batches = [next(stream) for _ in range(samples)]  # 5 passes over the shards
    assert batches == [5] * samples and [c[0] for c in calls] == list(range(5 * samples))
    assert {c[1:] for c in calls} == {((3, 24, 24), transform.channels_last)}
    assert transform.channels_last == (interpolation != "nearest")


def test_peers_skip_a_package_that_does_not_import(tmp_path, monkeypatch):
    """A peer installed without a module it imports (mosaicml-streaming goes in with --no-deps) is
    skipped with the import's error and how to install it, not a traceback mid-run."""
    import argparse

    from dist_train.perf import peers

    (tmp_path / "broken_peer.py").write_text("import absent_dependency_of_the_peer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(peers, "PACKAGES", {"litdata": "absent_litdata", "mosaicml_streaming": "broken_peer"})
    ran, skipped = peers._systems(argparse.Namespace(systems="dist_train,litdata,mosaicml_streaming"))
    assert ran == ["dist_train"]
    why = {x["system"]: x["skipped"] for x in skipped}
    assert why["litdata"].startswith("package 'absent_litdata' is not installed (pip install")
    assert "'broken_peer' does not import (ModuleNotFoundError" in why["mosaicml_streaming"]
    assert "absent_dependency_of_the_peer" in why["mosaicml_streaming"]
    assert "pip install --no-deps 'mosaicml-streaming" in why["mosaicml_streaming"]


def test_peers_encode_in_plain_pil_the_bytes_the_writer_stores(raw_mask, monkeypatch):
    """LitData's fn and Streaming's samples are the plain-PIL function their users write (PIL's own
    LANCZOS), and give the bytes dist_train's writer stores with its compiled resize."""
    from dist_train.perf import peers
    from dist_train.shardset import resample
    from dist_train.shardset.images import encode_image

    monkeypatch.setitem(resample._state, "resized", resample.COMPILE_AFTER)  # the kernels from now on
    calls, real = [], resample.resize_array
    monkeypatch.setattr(resample, "resize_array", lambda *a, **k: calls.append(1) or real(*a, **k))
    items = peers._items(raw_mask / "train")[:20]
    assert {Path(p).suffix for p, _ in items} > {".jpg"}  # more formats than JPEG
    for path, label in items:
        for size in (24, 20):
            assert peers._encoded((path, label), size, 95) == {"image": encode_image((path, size, 95))[1], "label": label}
    assert calls  # the writer's side went through the kernels


def test_peers_mosaicml_stores_the_same_bytes_and_reads_them(raw_mask, tmp_path):
    """Where mosaicml-streaming is installed (the bench extra + --no-deps, not in CI): its parallel
    conversion stores the bytes dist_train's writer stores, and its dataset reads augmented batches."""
    pytest.importorskip("streaming", exc_type=ImportError)
    import argparse

    from streaming import StreamingDataset

    from dist_train.perf import peers

    items = peers._items(raw_mask / "train")[:12]
    a = argparse.Namespace(resize=24, quality=95, workers=2, img_size=16, batch_size=4)
    peers.write_streaming(raw_mask / "train", tmp_path / "mds", a, items)
    ds = StreamingDataset(local=str(tmp_path / "mds"), batch_size=4)
    stored = sorted(ds[i]["image"] for i in range(len(ds)))
    assert stored == sorted(peers._encoded(item, 24, 95)["image"] for item in items)
    a.workers = 0
    images = next(iter(peers.read_streaming(tmp_path / "mds", a, items)))
    assert images == 4


def test_peers_read_timm_as_its_defaults_do(mask_shards):
    """timm's wds pipeline is read with create_loader's (and train.py's) default prefetcher: the
    DataLoader under its PrefetchLoader hands uint8 batches, the point where dist_train's is read."""
    import argparse

    from dist_train.perf.peers import timm_wds_loader

    _, loader = timm_wds_loader(mask_shards, argparse.Namespace(img_size=16, batch_size=4, workers=0))
    images, targets = next(iter(loader))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 3, 16, 16) and targets.dtype == torch.int64

def test_train_synthetic_against_bare_loop():
    r = run_cli(["train", "--synthetic", "--model", "test_resnet", "--img-size", "32", "--batch-size", "4",
                 "--steps", "3", "--warmup", "1"])
    assert TRAIN_KEYS | {"bare_images_per_s", "ratio"} <= set(r)
    assert r["input"] == "synthetic" and r["steps"] == 3 and r["device"] == "cpu"
    assert r["trainer_images_per_s"] > 0 and r["bare_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["trainer_images_per_s"] / r["bare_images_per_s"], rel=1e-2)
    assert r["data_wait_fraction"] < 0.5  # one cached batch: the trainer never waits for data


WINDOW_SCRIPT = """
import argparse, json, sys, tempfile
import torch
from pathlib import Path
from dist_train.perf.trainer import _time_trainer, synthetic_shards
out = []
for data in (None, sys.argv[1]):  # the 2-batch-epoch synthetic set, then a small real set (5-batch epochs)
    with tempfile.TemporaryDirectory() as tmp:
        a = argparse.Namespace(synthetic=data is None, model="test_resnet", img_size=16, batch_size=32, warmup=2,
                               steps=9, mixed_precision="no", channels_last=False, compile=False,
                               grad_checkpointing=False, gpu_decode=False)
        src = synthetic_shards(Path(tmp), a.batch_size) if data is None else data
        t = _time_trainer(a, src, Path(tmp) / "run", 0, torch.device("cpu"), lambda: 0.001)
        out.append(dict(timed_steps=t.timed_steps, events=t.events, inside=t.events_in_window, handed=t.handed))
print(json.dumps(out))
"""


def test_train_window_holds_the_timed_steps_and_nothing_else(mask_shards):
    """Epochs several times shorter than the run (synthetic: 2 batches; real: 5): the trainer's
    epoch is the run, and no epoch end, evaluation or checkpoint falls inside the timed window."""
    proc = subprocess.run([sys.executable, "-c", WINDOW_SCRIPT, str(mask_shards)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert run["timed_steps"] == 9 and run["inside"] == [] and run["handed"] == 2 + 9 + 1
        assert run["events"][0] == ["epoch start", 0]
        assert ["checkpoint", 12] in run["events"]  # the final save: recorded, after the window
        assert all(k == 0 or k > 11 for _, k in run["events"])


def test_memory_with_and_without_grad_checkpointing():
    """Two fresh processes (peaks are process-lifetime figures); the saving is their difference."""
    r = run_cli(["memory", "--model", "test_resnet", "--img-size", "32", "--batch-size", "4", "--steps", "1"])
    assert r["bench"] == "memory" and r["memory_kind"] == "cpu_peak_rss" and r["device"] == "cpu"
    assert r["peak_memory_mb_without"] > 100 and r["peak_memory_mb_with"] > 100  # a whole process: torch alone
    assert r["saving_mb"] == pytest.approx(r["peak_memory_mb_without"] - r["peak_memory_mb_with"], abs=0.2)
    assert r["images_per_s_without"] > 0 and r["images_per_s_with"] > 0


def test_train_on_shards_with_gpu_decode(mask_shards):
    r = run_cli(["train", "--data", str(mask_shards), "--model", "test_resnet", "--img-size", "32",
                 "--batch-size", "4", "--steps", "2", "--warmup", "1", "--workers", "1", "--gpu-decode", "--no-bare"])
    assert TRAIN_KEYS <= set(r) and "ratio" not in r
    assert r["input"] == "shards" and r["gpu_decode"] is True and r["trainer_images_per_s"] > 0


def test_bad_input_is_one_line_exit_2(capsys, tmp_path, mask_shards):
    with pytest.raises(SystemExit) as e:
        bench.main(["loader", "--data", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        bench.main(["train", "--model", "test_resnet"])  # neither --data nor --synthetic
    with pytest.raises(SystemExit):
        bench.main(["loader", "--data", "x", "--decode-only", "--gpu-decode"])
    with pytest.raises(SystemExit):
        bench.main(["loader", "--data", str(mask_shards), "--seed-baseline", str(tmp_path)])  # no images/


# ----------------------------------------------------------------------------- gpu_decode on the CPU
def loaders(root: Path, **kw):
    info = load_info(str(root))
    args = dict(aug=AUG, batch_size=5, workers=0, world_size=1, rank=0, seed=11)
    args.update(kw)
    normal = build_train_loader(str(root), info, "train", **args)
    device = build_train_loader(str(root), info, "train", gpu_decode=True, device="cpu", **args)
    return normal, device


def epoch(loader, e: int) -> list:
    loader.set_epoch(e)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decode_train_batches_equal_the_cpu_path(mask_shards, workers):
    normal, device = loaders(mask_shards, workers=workers)
    a, b = epoch(normal, 1), epoch(device, 1)
    assert len(a) == len(b) == len(device) > 0
    for (ia, ta, ka), (ib, tb, kb) in zip(a, b):
        assert ka == kb
        assert ib.shape == ia.shape == (5, 3, 24, 24) and ib.dtype == ia.dtype == torch.uint8
        assert ib.device.type == "cpu" and ib.is_contiguous()
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    assert int(torch.stack([x for x, _, _ in b]).float().std()) > 0  # real pixels, not a constant fill


def test_gpu_decode_is_deterministic_and_resumable(mask_shards):
    _, one = loaders(mask_shards)
    _, two = loaders(mask_shards)
    first, again = epoch(one, 2), epoch(two, 2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, again))
    other = epoch(two, 3)
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(first, other))
    two.set_epoch(2, skip_batches=2)
    tail = list(two)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first[2:], tail))


def test_gpu_decode_eval_equals_the_cpu_path(mask_shards):
    info = load_info(str(mask_shards))
    args = dict(aug=AUG, batch_size=6, workers=2, world_size=1, rank=0)
    a = list(build_eval_loader(str(mask_shards), info, "validation", **args))
    b = list(build_eval_loader(str(mask_shards), info, "validation", gpu_decode=True, device="cpu", **args))
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["order"], y["order"])
        assert torch.equal(x["target"], y["target"])


def encoded(fmt: str, seed: int, mode: str = "RGB") -> torch.Tensor:
    arr = np.random.default_rng(seed).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_decode_batch_on_device_formats_and_bad_bytes():
    batch = [encoded("JPEG", 0), encoded("PNG", 1, "RGBA"), torch.tensor([0xFF, 0xD8, 0xFF, 1, 2], dtype=torch.uint8),
             encoded("JPEG", 2, "L")]
    images, ok = decode_batch_on_device(batch, AUG, "cpu", train=True, seeds=[1, 2, 3, 4])
    assert ok.tolist() == [True, True, False, True]
    assert images.shape == (3, 3, 24, 24) and images.dtype == torch.uint8 and images.device.type == "cpu"
    again, _ = decode_batch_on_device(batch, AUG, "cpu", train=True, seeds=torch.tensor([1, 2, 3, 4]))
    assert torch.equal(images, again)
    # eval: the deterministic resize + center crop of the CPU path
    ev, ok = decode_batch_on_device(batch[:2], AUG, "cpu", train=False)
    ref = _Transform(AUG, train=False)
    expected = torch.stack([ref(decode_image(b, mode=ImageReadMode.RGB)) for b in batch[:2]])
    assert ok.all() and torch.equal(ev, expected)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        decode_batch_on_device(batch[2:3], AUG, "cpu", train=False)
    with pytest.raises(ValueError, match="2 seeds for 4 images"):
        decode_batch_on_device(batch, AUG, "cpu", train=True, seeds=[1, 2])


def test_gpu_decode_refuses_auto_augment(mask_shards):
    aa = AugmentConfig(img_size=24, aa="rand-m9-mstd0.5-inc1")
    with pytest.raises(UserError, match="--gpu-decode cannot apply auto-augment"):
        loaders(mask_shards, aug=aa)
    with pytest.raises(UserError, match="auto-augment"):
        decode_batch_on_device([encoded("JPEG", 0)], aa, "cpu", train=True)
