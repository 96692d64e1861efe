"""Throughput benchmarks of the input pipeline, the trainer's step and the shard writer.

    python -m dist_train.bench loader --data SHARDS [--img-size 224] [--workers N] [--batch-size B]
                                      [--seconds S] [--decode-only | --gpu-decode] [--seed-baseline RAW]
    python -m dist_train.bench train --model M --img-size S --batch-size B (--data SHARDS | --synthetic)
                                     [--steps K] [--mixed-precision bf16] [--channels-last] [--compile]
                                     [--gpu-decode] [--no-bare]
    python -m dist_train.bench shard --src SRC [--resize 224]

Each prints ONE JSON line on stdout (its settings and figures) so runs can be collected and
compared; progress and the trainer's own output go to stderr. Warm-up is never timed.

`train` runs the real trainer (`engine.train`) and times it from outside: the trainer's loader
is wrapped so every batch's hand-out and the request for the next one are time-stamped. With
`--synthetic` the wrapper hands out one cached batch again and again (the trainer's cost with
free input: compare it with the bare loop); with `--data` it passes the real batches through
(end to end, loader included). The bare loop's steps alternate with the trainer's, one each,
so a machine shared with other jobs slows both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import transforms as T

from . import engine
from .config import Config
from .data import IMAGE_KEYS, AugmentConfig, build_train_loader, decode_rgb, load_info, shard_urls
from .errors import ArgParser, UserError, cli_main
from .model import create_model
from .shard import usable_cpus, write_shards
from .synth import make_dataset

PRECISIONS = ("no", "bf16", "fp16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and of its live children (the DataLoader
    workers), from /proc; None without /proc. Unlike images/s, CPU time per image hardly
    moves when other jobs share the machine."""
    if not os.path.isdir("/proc"):
        return None
    me, ticks = os.getpid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        if int(entry.name) == me or int(fields[1]) == me:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def rate(batch_sizes: Iterator[int], seconds: float, warmup: int, device: torch.device) -> dict:
    """Images/s of a batch stream: `warmup` batches untimed (worker start-up, prefetch queue
    drained), then every batch until `seconds` have passed (at least one); with /proc also
    the CPU milliseconds per image of this process and its workers."""
    for _ in range(warmup):
        next(batch_sizes)
    _sync(device)
    cpu = cpu_seconds()
    start = time.perf_counter()
    images = batches = 0
    while True:
        images += next(batch_sizes)
        batches += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    _sync(device)
    elapsed = time.perf_counter() - start
    out = {"images": images, "batches": batches, "elapsed_s": round(elapsed, 3),
           "images_per_s": round(images / elapsed, 1)}
    if cpu is not None:
        out["cpu_ms_per_image"] = round(1000 * (cpu_seconds() - cpu) / images, 3)
    return out


def _loader_warmup(workers: int) -> int:
    """Batches to drain before timing: the first of each worker plus the prefetch queue
    (DataLoader's prefetch_factor 2 per worker), so timing starts in the steady state."""
    return 3 * workers + 1 if workers else 2


# ----------------------------------------------------------------------------- loader
class DecodeOnly(IterableDataset):
    """The pipeline's limit: the same shard bytes read and decoded by the same workers, with no
    augmentation and no collation. Yields the image count of every `batch_size` decoded."""

    def __init__(self, urls: Sequence[str], batch_size: int):
        self.urls = list(urls)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.urls[worker::workers] or self.urls
        count = 0
        for url in itertools.cycle(mine):
            for sample in wds.tarfile_samples([dict(url=url)]):
                data = next(sample[k] for k in IMAGE_KEYS if k in sample)
                decode_rgb(data)
                count += 1
                if count == self.batch_size:
                    yield count
                    count = 0


class SeedDataset(Dataset):
    """The user's starting point: every file of the raw mask layout opened with PIL, then
    Resize((S, S)), ToTensor, Normalize (ImageNet mean/std). Hidden names (._ AppleDouble,
    .ipynb_checkpoints, .DS_Store) are skipped."""

    def __init__(self, raw: str | Path, img_size: int):
        root = Path(raw)
        images = next((p for p in (root / "train" / "images", root / "images") if p.is_dir()), None)
        if images is None:
            raise UserError(f"--seed-baseline {raw}: no train/images/ or images/ folder (expected the raw mask layout)")
        self.paths = [
            f for person in sorted(images.iterdir()) if person.is_dir() and not person.name.startswith(".")
            for f in sorted(person.iterdir()) if f.is_file() and not f.name.startswith(".")
        ]
        if not self.paths:
            raise UserError(f"--seed-baseline {raw}: no image files in {images}/<person>/")
        self.transform = T.Compose([
            T.Resize((img_size, img_size)), T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), 0


def _forever(loader: Any, count: Callable[[Any], int], epochs: bool) -> Iterator[int]:
    """Batch sizes of `loader` over endless epochs (`set_epoch` each time if `epochs`)."""
    for epoch in itertools.count():
        if epochs:
            loader.set_epoch(epoch)
        for batch in loader:
            yield count(batch)


def bench_loader(a: argparse.Namespace) -> dict:
    info = load_info(a.data)
    workers = usable_cpus() if a.workers is None else a.workers
    cuda = torch.cuda.is_available()
    mode = "decode_only" if a.decode_only else "gpu_decode" if a.gpu_decode else "pipeline"
    result: dict[str, Any] = {"bench": "loader", "mode": mode, "data": a.data, "split": a.split,
                              "img_size": a.img_size, "workers": workers, "batch_size": a.batch_size,
                              "seconds": a.seconds, "device": "cuda" if cuda else "cpu"}
    device = torch.device("cuda" if cuda and a.gpu_decode else "cpu")
    seed_set = SeedDataset(a.seed_baseline, a.img_size) if a.seed_baseline else None
    if seed_set is not None and len(seed_set) < a.batch_size:
        raise UserError(f"--seed-baseline {a.seed_baseline}: fewer images than --batch-size {a.batch_size}")
    if a.decode_only:
        ds = DecodeOnly(shard_urls(a.data, info, a.split), a.batch_size)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        stream = _forever(loader, int, epochs=False)
    else:
        loader = build_train_loader(a.data, info, a.split, aug=AugmentConfig(img_size=a.img_size),
                                    batch_size=a.batch_size, workers=workers, world_size=1, rank=0, seed=0,
                                    pin_memory=cuda, gpu_decode=a.gpu_decode)
        stream = _forever(loader, lambda b: len(b[1]), epochs=True)
    result.update(rate(stream, a.seconds, _loader_warmup(workers), device))
    del stream, loader  # stop the workers before the baseline's start
    if seed_set is not None:
        seed = DataLoader(seed_set, batch_size=a.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                          persistent_workers=workers > 0, pin_memory=cuda)
        base = rate(_forever(seed, lambda b: len(b[1]), epochs=False), a.seconds, _loader_warmup(workers),
                    torch.device("cpu"))
        result["seed_images_per_s"] = base["images_per_s"]
        result["vs_seed"] = round(result["images_per_s"] / base["images_per_s"], 3)
        if "cpu_ms_per_image" in base:
            result["seed_cpu_ms_per_image"] = base["cpu_ms_per_image"]
            result["vs_seed_cpu"] = round(base["cpu_ms_per_image"] / max(result["cpu_ms_per_image"], 1e-9), 3)
    return result


# ----------------------------------------------------------------------------- train
class BareLoop:
    """The plainest loop on the same model and batch: fused AdamW (the trainer's default),
    cross-entropy, one fixed batch already on the device; the trainer's overhead limit."""

    def __init__(self, model_name: str, num_classes: int, img_size: int, batch_size: int, device: torch.device,
                 precision: str, channels_last: bool, compile: bool):
        torch.manual_seed(0)
        model = create_model(model_name, num_classes, img_size=img_size).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as the trainer's default
        self.model = torch.compile(model) if compile else model
        self.x = torch.randn(batch_size, 3, img_size, img_size, device=device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, num_classes, (batch_size,), device=device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.device = device

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def timed_step(self) -> float:
        """Seconds of one step, the device synchronized on both ends."""
        _sync(self.device)
        start = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - start


class TimedLoader:
    """Stands in for the trainer's TrainLoader and time-stamps its use.

    A step is the time from handing out a batch to the trainer's request for the next (or
    its leaving the epoch loop); a wait is the time the trainer spends in `next()`. The
    timed window covers steps warmup+1 .. warmup+steps and leaves out what the trainer does
    between epochs (evaluation, checkpoint). `repeat` hands out the first batch forever.

    `between` (a bare-loop step returning its seconds) runs before each timed step, so the two
    loops alternate step by step and see the same machine even when other jobs come and go;
    each trainer step is then synchronized like the bare ones.
    """

    def __init__(self, loader: Any, warmup: int, steps: int, device: torch.device, repeat: bool,
                 between: Callable[[], float] | None = None):
        self._loader = loader
        self._device = device
        self._repeat = repeat
        self._between = between
        self._first = warmup + 1
        self._last = warmup + steps
        self._cached: Any = None
        self.handed = 0
        self.window_s = 0.0
        self.wait_s = 0.0
        self.between_s = 0.0

    def __getattr__(self, name: str) -> Any:  # set_epoch, bad_samples, batch_size, ...
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return self._last + 1 if self._repeat else len(self._loader)

    def _batches(self) -> Iterator[Any]:
        if not self._repeat:
            yield from self._loader
            return
        if self._cached is None:
            self._cached = next(iter(self._loader))
        while True:
            yield self._cached

    def __iter__(self) -> Iterator[Any]:
        batches = self._batches()
        while True:
            k = self.handed + 1
            timed = self._first <= k <= self._last
            if timed and self._between is not None:
                self.between_s += self._between()
            if k == self._first:
                _sync(self._device)
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            got = time.perf_counter()
            self.handed = k
            try:
                yield batch
            finally:  # the trainer asks for the next batch, or leaves the loop (GeneratorExit)
                if k == self._last or (timed and self._between is not None):
                    _sync(self._device)
                if timed:
                    self.window_s += time.perf_counter() - asked
                    self.wait_s += got - asked


def synthetic_shards(out: Path, batch_size: int) -> str:
    """A small shard set (16 px synthetic faces, 18 classes) the trainer can start on; in
    --synthetic runs only its first batch is ever used."""
    persons = math.ceil(batch_size / 7 / 0.7) + 2  # the train split (~80% of persons) holds a batch
    make_dataset(out / "raw", persons=persons, size=16, eval_persons=1)
    write_shards(out / "raw" / "train", out / "shards", workers=1, progress=False)
    return str(out / "shards")


def bench_train(a: argparse.Namespace) -> dict:
    if a.steps < 1 or a.warmup < 1:
        raise UserError("--steps and --warmup: expected at least 1")
    workers = usable_cpus() if a.workers is None else a.workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="dist_train-bench-") as tmp, contextlib.redirect_stdout(sys.stderr):
        data = synthetic_shards(Path(tmp), a.batch_size) if a.synthetic else a.data
        info = load_info(data)
        num_classes = len(info["classes"])
        result: dict[str, Any] = {
            "bench": "train", "input": "synthetic" if a.synthetic else "shards", "data": None if a.synthetic else data,
            "model": a.model, "img_size": a.img_size, "batch_size": a.batch_size, "steps": a.steps,
            "warmup": a.warmup, "mixed_precision": a.mixed_precision, "channels_last": a.channels_last,
            "compile": a.compile, "gpu_decode": a.gpu_decode, "workers": 0 if a.synthetic else workers,
            "device": str(device),
        }
        bare = BareLoop(a.model, num_classes, a.img_size, a.batch_size, device, a.mixed_precision,
                        a.channels_last, a.compile) if a.bare else None
        for _ in range(a.warmup if bare else 0):
            bare.step()
        timed = _time_trainer(a, data, Path(tmp) / "run", 0 if a.synthetic else workers, device,
                              bare.timed_step if bare else None)
        if bare:
            result["bare_images_per_s"] = round(a.batch_size * a.steps / timed.between_s, 1)
    result["trainer_images_per_s"] = round(a.batch_size * a.steps / timed.window_s, 1)
    result["data_wait_fraction"] = round(timed.wait_s / timed.window_s, 4)
    if a.bare:
        result["ratio"] = round(result["trainer_images_per_s"] / result["bare_images_per_s"], 3)
    return result


def _time_trainer(a: argparse.Namespace, data: str, output: Path, workers: int, device: torch.device,
                  between: Callable[[], float] | None) -> TimedLoader:
    """engine.train for warmup + steps + 1 steps (the last one also checkpoints: untimed),
    with `between` run before each timed step."""
    cfg = Config(data=data, output=str(output), val_split=None, model=a.model, img_size=a.img_size,
                 batch_size=a.batch_size, workers=workers, mixed_precision=a.mixed_precision,
                 channels_last=a.channels_last, compile=a.compile, gpu_decode=a.gpu_decode, epochs=10**6,
                 warmup_epochs=0.0, max_steps=a.warmup + a.steps + 1, seed=0).validate()
    timed: list[TimedLoader] = []

    def build(*args: Any, **kw: Any) -> TimedLoader:
        if a.gpu_decode:  # also while the engine does not pass cfg.gpu_decode on to the loader
            kw.setdefault("gpu_decode", True)
            kw.setdefault("device", device)
        timed.append(TimedLoader(build_train_loader(*args, **kw), a.warmup, a.steps, device, a.synthetic, between))
        return timed[-1]

    with mock.patch.object(engine, "build_train_loader", build):
        engine.train(cfg)
    if not timed or timed[0].handed < a.warmup + a.steps:
        raise RuntimeError("the trainer stopped before the timed steps were done")
    return timed[0]


# ----------------------------------------------------------------------------- shard
def bench_shard(a: argparse.Namespace) -> dict:
    cpus = usable_cpus()
    src = Path(a.src)
    if not src.is_dir():
        raise UserError(f"--src {src}: no such folder")
    for f in src.rglob("*"):  # page cache warm for both runs alike
        if f.is_file():
            f.read_bytes()
    result: dict[str, Any] = {"bench": "shard", "src": str(src), "resize": a.resize, "workers": cpus}
    rates = {}
    with tempfile.TemporaryDirectory(prefix="dist_train-bench-") as tmp, contextlib.redirect_stdout(sys.stderr):
        for workers in dict.fromkeys((1, cpus)):
            start = time.perf_counter()
            info = write_shards(src, Path(tmp) / f"w{workers}", resize=a.resize, workers=workers, progress=False)
            elapsed = time.perf_counter() - start
            images = sum(s["num_samples"] for s in info["splits"].values()) + info.get("rejected", 0)
            rates[workers] = images / elapsed
    result.update(images=images, images_per_s_1=round(rates[1], 1), images_per_s_all=round(rates[cpus], 1),
                  speedup=round(rates[cpus] / rates[1], 3))
    return result


# ----------------------------------------------------------------------------- command line
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
    tr.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the bare loop and report the ratio (default: on)")

    sh = sub.add_parser("shard", help="images/s of the shard writer, 1 worker vs all cores")
    sh.add_argument("--src", required=True, help="raw image set (as python -m dist_train.shard --src)")
    sh.add_argument("--resize", type=int, help="as python -m dist_train.shard --resize")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> dict:
    a = _parser().parse_args(argv)
    for name in ("img_size", "batch_size", "seconds"):
        if getattr(a, name, 1) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: expected a positive number")
    if getattr(a, "workers", None) is not None and a.workers < 0:
        raise UserError(f"--workers {a.workers}: expected 0 or more")
    result = {"loader": bench_loader, "train": bench_train, "shard": bench_shard}[a.command](a)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
