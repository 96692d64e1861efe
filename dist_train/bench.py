"""Throughput benchmarks of the input pipeline, the trainer's step and the shard writer.

    python -m dist_train.bench loader --data SHARDS [--img-size 224] [--workers N] [--batch-size B]
                                      [--seconds S] [--decode-only | --gpu-decode] [--seed-baseline RAW]
    python -m dist_train.bench train --model M --img-size S --batch-size B (--data SHARDS | --synthetic)
                                     [--steps K] [--mixed-precision bf16] [--channels-last] [--compile]
                                     [--gpu-decode] [--grad-checkpointing] [--no-bare]
    python -m dist_train.bench memory --model M --img-size S --batch-size B [--steps K] [--mixed-precision bf16]
    python -m dist_train.bench shard --src SRC [--resize 224] [--rounds R]
    python -m dist_train.bench peers --src SRC [--resize 256] [--workers N] [--rounds R] [--seconds S]

Each prints ONE JSON line on stdout (its settings and figures) so runs can be collected and
compared; progress and the trainer's own output go to stderr. Warm-up is never timed.

`train` runs the real Trainer and times it from outside (dist_train.perf.trainer), and reports its
peak memory; `memory` runs it with and without --grad-checkpointing, each in a fresh process
(dist_train.perf.memory); `loader` times the input pipeline (dist_train.perf.loader); `peers`
writes and reads the same images with dist_train, LitData, MosaicML Streaming, timm's wds reader
and a per-file PIL loader, beside the limit (decode + the loader's transform alone), rounds
alternating (dist_train.perf.peers); `peers` prints one JSON line per system before its summary
line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dist_train.errors import ArgParser, UserError, cli_main, scratch_dir
from dist_train.perf.loader import bench_loader
from dist_train.perf.memory import bench_memory
from dist_train.perf.peers import SYSTEMS, bench_peers
from dist_train.perf.trainer import PRECISIONS, bench_train
from dist_train.shardset.images import check_and_encode, check_image
from dist_train.shardset.sources import FOLDER_EXTENSIONS
from dist_train.trust.media import DEFAULT_MAX_PIXELS
from dist_train.system import usable_cpus


def bench_shard(a: argparse.Namespace) -> dict:
    """The CLI's own path (`dist_train.shard.main`, pool start included) with 1 worker and with all
    cores, in alternating rounds; medians. Start-up (the worker processes' first answer) is
    reported beside, so that a run too small for its start-up shows as such."""
    from dist_train.shard import main as shard_main
    from dist_train.shardset.pool import startup_seconds

    cpus = usable_cpus()
    src = Path(a.src)
    if not src.is_dir():
        raise UserError(f"--src {src}: no such folder")
    if a.rounds < 1:
        raise UserError(f"--rounds {a.rounds}: expected at least 1")
    for f in src.rglob("*"):  # page cache warm for both runs alike
        if f.is_file():
            f.read_bytes()
    result: dict[str, Any] = {"bench": "shard", "src": str(src), "resize": a.resize, "workers": cpus,
                              "rounds": a.rounds, "timed": "python -m dist_train.shard's main(), pool start included"}
    rates: dict[int, list[float]] = {w: [] for w in dict.fromkeys((1, cpus))}
    with (tempfile.TemporaryDirectory(prefix="dist_train-bench-", dir=scratch_dir()) as tmp,
          contextlib.redirect_stdout(sys.stderr)):
        for r in range(a.rounds):
            for workers in rates:
                out = Path(tmp) / f"w{workers}-{r}"
                args = ["--src", str(src), "--out", str(out), "--workers", str(workers), "--quiet"]
                start = time.perf_counter()
                shard_main([*args, *(["--resize", str(a.resize)] if a.resize else [])])
                elapsed = time.perf_counter() - start
                info = json.loads((out / "_info.json").read_text())
                images = sum(s["num_samples"] for s in info["splits"].values()) + info.get("rejected", 0)
                rates[workers].append(images / elapsed)
                shutil.rmtree(out)
        startup = startup_seconds(cpus) if cpus > 1 else 0.0
    one, all_ = statistics.median(rates[1]), statistics.median(rates[cpus])
    result.update(images=images, images_per_s_1=round(one, 1), images_per_s_all=round(all_, 1),
                  speedup=round(all_ / one, 3), rounds_1=[round(x, 1) for x in rates[1]],
                  rounds_all=[round(x, 1) for x in rates[cpus]], pool_start_s=round(startup, 3),
                  pool_start_fraction=round(startup / (images / all_), 3))
    result.update(_check_cost(src, 1000 / one))
    if result["pool_start_fraction"] > 0.1:
        print(f"bench shard: pool start-up is {result['pool_start_fraction']:.0%} of the {cpus}-worker run; "
              "use more images for a figure about throughput", file=sys.stderr)
    return result


def _check_cost(src: Path, ms_per_image: float, limit: int = 300) -> dict:
    """The check pass per image, the draft decode it was vs the full decode + fingerprints it is,
    on the same images in this run; the difference as a share of a 1-worker shard run's time."""
    paths = [str(p) for p in sorted(src.rglob("*")) if p.suffix.lower() in FOLDER_EXTENSIONS
             and not p.name.startswith(".") and ".ipynb_checkpoints" not in p.parts][:limit]
    ms = {}
    checks = (("check_draft_ms", check_image, ()), ("check_fingerprint_ms", check_and_encode, (None, 95)))
    for name, fn, rest in checks * 2:
        start = time.perf_counter()
        for p in paths:
            fn((p, DEFAULT_MAX_PIXELS, *rest))
        ms[name] = round((time.perf_counter() - start) / max(len(paths), 1) * 1e3, 3)  # the second round counts
    return {**ms, "fingerprint_overhead_pct": round(100 * (ms["check_fingerprint_ms"] - ms["check_draft_ms"]) / ms_per_image, 1)}


def _add_peers(sub: Any) -> None:
    pe = sub.add_parser("peers", help="write + read images/s against LitData, MosaicML Streaming, timm wds, PIL files, "
                                        "and the limit (decode + transform alone)")
    pe.add_argument("--src", required=True, help="raw image set (as python -m dist_train.shard --src)")
    pe.add_argument("--resize", type=int, default=256, help="shorter side written by every system (default 256)")
    pe.add_argument("--quality", type=int, default=95)
    pe.add_argument("--img-size", type=int, default=224)
    pe.add_argument("--batch-size", type=int, default=64)
    pe.add_argument("--workers", type=int, help="writer and loader workers of every system (default: all cores)")
    pe.add_argument("--seconds", type=float, default=10.0, help="timed reading per system and round (default 10)")
    pe.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians (default 3)")
    pe.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list (default {','.join(SYSTEMS)})")


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m dist_train.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgParser)

    lo = sub.add_parser("loader", help="images/s of the training input pipeline")
    lo.add_argument("--data", required=True, help="shard set folder or URL")
    lo.add_argument("--split", default="train")
    lo.add_argument("--img-size", type=int, default=224)
    lo.add_argument("--workers", type=int, help="loader worker processes (default: all cores)")
    lo.add_argument("--batch-size", type=int, default=64)
    lo.add_argument("--seconds", type=float, default=10.0, help="timed duration after warm-up (default 10)")
    mode = lo.add_mutually_exclusive_group()
    mode.add_argument("--decode-only", action="store_true", help="read + decode only: the pipeline's limit")
    mode.add_argument("--gpu-decode", action="store_true", help="workers read bytes; decode + crop on the GPU")
    lo.add_argument("--seed-baseline", metavar="RAW", help="also time the PIL Resize/ToTensor/Normalize loader on "
                    "the raw mask layout RAW (train/images/<person>/*) and report the ratio")

    tr = sub.add_parser("train", help="images/s of the trainer vs a bare PyTorch loop")
    tr.add_argument("--model", default="resnet18", help="any timm model name")
    tr.add_argument("--img-size", type=int, default=224)
    tr.add_argument("--batch-size", type=int, default=64)
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="time the trainer end to end on this shard set")
    src.add_argument("--synthetic", action="store_true", help="time the trainer on one cached batch (free input)")
    tr.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    tr.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    tr.add_argument("--workers", type=int, help="loader workers with --data (default: all cores)")
    tr.add_argument("--mixed-precision", choices=PRECISIONS, default="no")
    tr.add_argument("--channels-last", action="store_true")
    tr.add_argument("--compile", action="store_true", help="torch.compile (bare loop; the trainer's --compile)")
    tr.add_argument("--gpu-decode", action="store_true", help="the trainer's loader decodes on the device")
    tr.add_argument("--grad-checkpointing", action="store_true", help="timm's gradient checkpointing (both loops)")
    tr.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the bare loop and report the ratio (default: on)")

    me = sub.add_parser("memory", help="peak memory of the trainer with and without --grad-checkpointing")
    me.add_argument("--model", default="resnet50", help="any timm model name (default resnet50)")
    me.add_argument("--img-size", type=int, default=224)
    me.add_argument("--batch-size", type=int, default=32)
    me.add_argument("--steps", type=int, default=2, help="timed steps per setting (default 2)")
    me.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    me.add_argument("--mixed-precision", choices=PRECISIONS, default="no")
    me.add_argument("--channels-last", action="store_true")

    sh = sub.add_parser("shard", help="images/s of the shard writer, 1 worker vs all cores")
    sh.add_argument("--src", required=True, help="raw image set (as python -m dist_train.shard --src)")
    sh.add_argument("--resize", type=int, help="as python -m dist_train.shard --resize")
    sh.add_argument("--rounds", type=int, default=1, help="alternating 1-worker / all-core rounds (default 1)")

    _add_peers(sub)
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> dict:
    a = _parser().parse_args(argv)
    for name in ("img_size", "batch_size", "seconds"):
        if getattr(a, name, 1) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: expected a positive number")
    if getattr(a, "workers", None) is not None and a.workers < 0:
        raise UserError(f"--workers {a.workers}: expected 0 or more")
    if getattr(a, "gpu_decode", False) and not torch.cuda.is_available():
        print("bench: --gpu-decode without CUDA: the GPU decode path runs on the CPU (\"device\": \"cpu\"); "
              "its figure says nothing about a GPU", file=sys.stderr, flush=True)
    result = {"loader": bench_loader, "train": bench_train, "memory": bench_memory, "shard": bench_shard,
              "peers": bench_peers}[a.command](a)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
