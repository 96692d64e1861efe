"""dist_train against what users would pick instead, on the same raw images, in one run.

Each system writes the same images (shorter side `--resize`, JPEG at `--quality`, the same
bytes dist_train's shard writer stores: the peers' per-image function is the plain-PIL one their
users write, dist_train's writer resizes with its compiled copy of PIL's LANCZOS) with `--workers` processes, and reads them back with the
same augmentation (RandomResizedCrop to `--img-size`, scale 0.5-1, ratio 3/4-4/3, bilinear,
horizontal flip), batch `--batch-size`, `--workers` loader workers. Rounds alternate between the
systems (write: each system once per round; read: likewise) so a machine shared with other jobs
slows each alike; every figure is the median of the rounds.

- dist_train: `write_shards` (pool start included) and the training loader, which hands uint8
  batches to the device-side prep (normalisation happens there, on the GPU when there is one).
- litdata: `litdata.optimize(fn, inputs, num_workers=W, chunk_bytes="64MB")` and a
  `StreamingDataset(shuffle=True, transform=...)` read by `StreamingDataLoader`, as its README.
- mosaicml_streaming: `MDSWriter` per worker process on its part of the inputs, then
  `merge_index` (its docs' parallel conversion), read by a `StreamingDataset(shuffle=True)`
  subclass whose `__getitem__` decodes and transforms, in a torch `DataLoader`.
- timm_wds: timm's own WebDataset reader (`create_dataset("wds/...")` + `create_loader`) on
  dist_train's shards, with `create_loader`'s and train.py's default prefetcher: PIL decode and
  crop in the workers, uint8 batches, normalised on the device (read below its `PrefetchLoader`,
  as dist_train's loader is read below its device prep); it has no writer.
- limit: the loader's limit, its own tar reader, decoder and `Transform` alone: dist_train's shards
  read, decoded and transformed by as many workers, nothing else (`perf.loader.DecodeOnly`); each
  read target also gives the limit's ratio to the peer (`limit_ratio`).
- seed: the per-file starting point, a `Dataset` opening each raw file with PIL; writes nothing.
Every loader keeps its workers across epochs (timm's and dist_train's default; set for the
others), and all run under the platform's start method (litdata's `optimize` leaves "spawn" set:
put back). litdata, streaming and seed decode with PIL and normalise to float in the worker
(ToTensor + Normalize), as their docs do. Deviation: litdata and streaming store the JPEG bytes
as a `bytes` column (not their PIL `jpeg` encoders) so that every system reads identical bytes;
streaming's `jpeg` encoder would re-encode at PIL's default quality 75.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import io
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dist_train.data.loaders import build_train_loader
from dist_train.data.transforms import AugmentConfig, Transform
from dist_train.errors import UserError, scratch_dir
from dist_train.shardset.format import load_info, shard_urls
from dist_train.shardset.images import encode_image, target_size
from dist_train.shardset.sources import load_source
from dist_train.shardset.writer import write_shards
from dist_train.system import usable_cpus

from .loader import DecodeOnly
from .timing import loader_warmup, rate, stdout_to_stderr

SYSTEMS = ("dist_train", "limit", "litdata", "mosaicml_streaming", "timm_wds", "seed")
ON_OUR_SHARDS = ("limit", "timm_wds")  # readers of dist_train's shards, with no writer of their own
PACKAGES = {"litdata": "litdata", "mosaicml_streaming": "streaming"}  # system -> module
# mosaicml-streaming pins numpy<2.2 and transformers<5: the bench extra holds what it imports, and
# the package itself goes in without its pins (README, "Against the peers")
INSTALL = {"litdata": "pip install 'dist_train[bench]'",
           "mosaicml_streaming": "pip install 'dist_train[bench]' && pip install --no-deps 'mosaicml-streaming>=0.11'"}
SCALE, RATIO = (0.5, 1.0), (3 / 4, 4 / 3)
OUTPUTS = {"dist_train": "uint8 batches, normalised on the device",
           "limit": "nothing: decode, crop, flip and resize into a batch buffer each worker reuses",
           "timm_wds": "uint8 batches (PIL decode, fast_collate), normalised on the device by timm's PrefetchLoader"}


def peer_transform(img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    return T.Compose([T.RandomResizedCrop(img_size, scale=SCALE, ratio=RATIO), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def _jpeg(data: bytes, transform: Callable) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return transform(im.convert("RGB"))


def _encoded(item: tuple[str, int], resize: int | None, quality: int) -> dict:
    """litdata's `fn` and streaming's sample, in plain PIL as their docs' image examples do it:
    the shorter side shrunk to `resize` with LANCZOS (JPEGs decoded at a reduced DCT scale where
    that halves them, as dist_train's writer does), JPEG at `quality`. These are the bytes
    dist_train's writer stores (tested), which resizes with its compiled copy of PIL's LANCZOS
    (`shardset.resample`); without resize, the file's own bytes as the writer stores them."""
    path, label = item
    if resize is None:
        return {"image": encode_image((path, resize, quality))[1], "label": label}
    with Image.open(path) as im:
        size = target_size(im.size, resize)  # the size rule alone is shared: the rest is the user's PIL
        if im.format == "JPEG" and size != im.size:
            im.draft("RGB", size)
        rgb = im.convert("RGB")
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
    return {"image": buf.getvalue(), "label": label}


class DecodeBytes:
    """JPEG bytes to the augmented float tensor (picklable: spawned workers get it too)."""

    def __init__(self, img_size: int):
        self.transform = peer_transform(img_size)

    def __call__(self, data: bytes) -> torch.Tensor:
        return _jpeg(data, self.transform)


class DecodeSample(DecodeBytes):
    """litdata's `transform`: a sample dict to (tensor, label)."""

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        return super().__call__(sample["image"]), sample["label"]


class FileDataset(Dataset):
    """The seed loader: every raw file opened with PIL in the worker."""

    def __init__(self, items: list[tuple[str, int]], transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


# ---------------------------------------------------------------- writers (seconds)


def write_dist_train(src: Path, out: Path, a: argparse.Namespace, items: list) -> None:
    write_shards(src, out, resize=a.resize, quality=a.quality, workers=a.workers, progress=False)


def write_litdata(src: Path, out: Path, a: argparse.Namespace, items: list) -> None:
    import litdata

    litdata.optimize(fn=partial(_encoded, resize=a.resize, quality=a.quality), inputs=items, output_dir=str(out),
                     num_workers=a.workers, chunk_bytes="64MB", verbose=False)


def _mds_part(job: tuple[str, list, int | None, int]) -> None:
    from streaming import MDSWriter

    out, items, resize, quality = job
    with MDSWriter(out=out, columns={"image": "bytes", "label": "int"}) as w:
        for item in items:
            w.write(_encoded(item, resize, quality))


def write_streaming(src: Path, out: Path, a: argparse.Namespace, items: list) -> None:
    from streaming.base.util import merge_index

    jobs = [(str(out / str(i)), items[i::a.workers], a.resize, a.quality) for i in range(a.workers)]
    with multiprocessing.get_context("fork").Pool(a.workers) as pool:
        pool.map(_mds_part, jobs)
    merge_index(str(out), keep_local=True)


WRITERS = {"dist_train": write_dist_train, "litdata": write_litdata, "mosaicml_streaming": write_streaming}


# ---------------------------------------------------------------- readers (batch-size streams)


def _forever(make_iter: Callable[[int], Any]) -> Iterator[int]:
    epoch = 0
    while True:
        for batch in make_iter(epoch):
            yield len(batch[1])
        epoch += 1


def read_dist_train(out: Path, a: argparse.Namespace, items: list) -> Iterator[int]:
    info = load_info(str(out))
    loader = build_train_loader(str(out), info, "train", aug=_augment(a),
                                batch_size=a.batch_size, workers=a.workers, world_size=1, rank=0, seed=0,
                                pin_memory=False)

    def epoch(e: int) -> Any:
        loader.set_epoch(e)
        return loader
    return _forever(epoch)


def _augment(a: argparse.Namespace) -> AugmentConfig:
    return AugmentConfig(img_size=a.img_size, scale=SCALE, ratio=RATIO, hflip=0.5)


def read_limit(out: Path, a: argparse.Namespace, items: list) -> Iterator[int]:
    urls = shard_urls(str(out), load_info(str(out)), "train")
    ds = DecodeOnly(urls, a.batch_size, Transform(_augment(a), train=True))
    yield from DataLoader(ds, batch_size=None, num_workers=a.workers, persistent_workers=a.workers > 0)


def read_litdata(out: Path, a: argparse.Namespace, items: list) -> Iterator[int]:
    import litdata

    ds = litdata.StreamingDataset(str(out), shuffle=True, drop_last=True, transform=DecodeSample(a.img_size))
    loader = litdata.StreamingDataLoader(ds, batch_size=a.batch_size, num_workers=a.workers,
                                         persistent_workers=a.workers > 0)
    return _forever(lambda e: loader)


def read_streaming(out: Path, a: argparse.Namespace, items: list) -> Iterator[int]:
    from .peer_mds import MDSImages

    ds = MDSImages(str(out), a.batch_size, DecodeBytes(a.img_size))
    loader = DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers, drop_last=True,
                        persistent_workers=a.workers > 0)
    return _forever(lambda e: loader)


def timm_wds_loader(out: Path, a: argparse.Namespace) -> tuple[Any, DataLoader]:
    """timm's wds dataset and the DataLoader its `create_loader` builds with its default
    `use_prefetcher=True` (train.py's too, unless --no-prefetcher): the workers hand uint8 batches
    (`fast_collate`) to a `PrefetchLoader` that moves and normalises them on the device. The bench
    reads that DataLoader, the point where dist_train's loader is read too (its device prep
    normalises likewise); the PrefetchLoader's work would be GPU work on a GPU machine."""
    from timm.data import create_dataset, create_loader

    ds = create_dataset("wds/peers", root=str(out), split="train", is_training=True, batch_size=a.batch_size)
    loader = create_loader(ds, input_size=(3, a.img_size, a.img_size), batch_size=a.batch_size, is_training=True,
                           scale=SCALE, ratio=RATIO, hflip=0.5, color_jitter=None, interpolation="bilinear",
                           num_workers=a.workers, use_prefetcher=True, device=torch.device("cpu"), pin_memory=False)
    return ds, loader.loader


def read_timm_wds(out: Path, a: argparse.Namespace, items: list) -> Iterator[int]:
    ds, loader = timm_wds_loader(out, a)

    def epoch(e: int) -> Any:
        ds.set_epoch(e)
        return loader
    return _forever(epoch)


def read_seed(out: Path, a: argparse.Namespace, items: list) -> Iterator[int]:
    loader = DataLoader(FileDataset(items, peer_transform(a.img_size)), batch_size=a.batch_size, shuffle=True,
                        num_workers=a.workers, drop_last=True, persistent_workers=a.workers > 0)
    return _forever(lambda e: loader)


READERS = {"dist_train": read_dist_train, "limit": read_limit, "litdata": read_litdata,
           "mosaicml_streaming": read_streaming, "timm_wds": read_timm_wds, "seed": read_seed}


# ---------------------------------------------------------------- the run


def _unusable(system: str) -> str | None:
    """Why the peer cannot run here (its package absent, or installed without a module it imports:
    streaming is installed with --no-deps), or None."""
    module = PACKAGES[system]
    if importlib.util.find_spec(module) is None:
        return f"package {module!r} is not installed"
    try:
        importlib.import_module(module)
    except Exception as e:  # a third party's import: any failure means the peer cannot run
        return f"package {module!r} does not import ({type(e).__name__}: {e})"
    return None


def _systems(a: argparse.Namespace) -> tuple[list[str], list[dict]]:
    wanted = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SYSTEMS]
    if unknown or "dist_train" not in wanted:
        raise UserError(f"--systems {a.systems}: expected dist_train and any of {', '.join(SYSTEMS[1:])}")
    why = {s: _unusable(s) for s in wanted if s in PACKAGES}
    skipped = [{"bench": "peers", "system": s, "skipped": f"{why[s]} ({INSTALL[s]})"} for s in wanted if why.get(s)]
    return [s for s in wanted if s not in {x["system"] for x in skipped}], skipped


def _items(src: Path) -> list[tuple[str, int]]:
    source = load_source(src)
    return [(str(r.path), r.label if r.label is not None else 0) for r in source.records]


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def bench_peers(a: argparse.Namespace) -> dict:
    src = Path(a.src)
    if not src.is_dir():
        raise UserError(f"--src {src}: no such folder")
    if a.rounds < 1 or a.workers is not None and a.workers < 1:
        raise UserError("--rounds and --workers: expected at least 1")
    a.workers = a.workers or usable_cpus()
    systems, skipped = _systems(a)
    items = _items(src)
    if len(items) < a.batch_size * 2:
        raise UserError(f"--src {src}: {len(items)} images; expected at least 2 x --batch-size ({a.batch_size})")
    for line in skipped:
        print(f"peers: skipping {line['system']}: {line['skipped']}", file=sys.stderr)
        print(json.dumps(line), flush=True)
    writes: dict[str, list[float]] = {s: [] for s in systems if s in WRITERS}
    reads: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="dist_train-peers-", dir=scratch_dir()) as tmp, stdout_to_stderr():
        root = Path(tmp)
        method = multiprocessing.get_start_method()
        for r in range(a.rounds):
            for s in writes:
                start = time.perf_counter()
                WRITERS[s](src, root / f"{s}-{r}", a, items)
                multiprocessing.set_start_method(method, force=True)  # litdata leaves "spawn" set
                writes[s].append(len(items) / (time.perf_counter() - start))
                print(f"peers: round {r + 1} {s} wrote {writes[s][-1]:.1f} images/s", file=sys.stderr)
                if r:
                    shutil.rmtree(root / f"{s}-{r}")
        if "dist_train" not in writes:  # the readers ON_OUR_SHARDS read dist_train's shards
            write_dist_train(src, root / "dist_train-0", a, items)
        where = {s: root / f"{'dist_train' if s in ON_OUR_SHARDS else s}-0" for s in systems}
        for r in range(a.rounds):
            for s in systems:
                start = time.perf_counter()
                reads[s].append(_read_round(s, where[s], a, items, method))
                print(f"peers: round {r + 1} {s} read {reads[s][-1]['images_per_s']:.1f} images/s "
                      f"({time.perf_counter() - start:.1f} s with warm-up)", file=sys.stderr)
    return _report(a, len(items), systems, writes, reads)


def _read_round(system: str, where: Path, a: argparse.Namespace, items: list, method: str) -> dict:
    """One timed read from a fresh loader of `system`, whose workers are ended before the next
    system's round (idle peers' workers beside it took its CPU and counted in its CPU time:
    dist_train read 2,188 images/s alone, 1,414 beside them); `children_left`: still alive 10 s after."""
    stream = READERS[system](where, a, items)
    multiprocessing.set_start_method(method, force=True)  # litdata leaves "spawn" set
    try:
        result = rate(stream, a.seconds, loader_warmup(a.workers), torch.device("cpu"))
    finally:
        stream.close()
        del stream
        gc.collect()  # the loaders' iterators end their workers when collected
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {**result, "children_left": len(multiprocessing.active_children())}


def _report(a: argparse.Namespace, images: int, systems: list[str], writes: dict, reads: dict) -> dict:
    med: dict[str, dict] = {}
    for s in systems:
        r = [x["images_per_s"] for x in reads[s]]
        line = {"bench": "peers", "system": s, "images": images, "workers": a.workers,
                "write_images_per_s": round(statistics.median(writes[s]), 1) if s in writes else None,
                "write_rounds": [round(x, 1) for x in writes.get(s, [])],
                "read_images_per_s": round(statistics.median(r), 1), "read_rounds": r,
                "output": OUTPUTS.get(s, "float batches: PIL decode, ToTensor + Normalize in the workers")}
        cpu = [x["cpu_ms_per_image"] for x in reads[s] if x.get("cpu_ms_per_image", -1) >= 0]  # < 0: a child left
        if cpu:
            line["read_cpu_ms_per_image"] = round(statistics.median(cpu), 3)
        line["children_left"] = max(x.get("children_left", 0) for x in reads[s])  # > 0: workers outlived a round
        med[s] = line
        print(json.dumps(line), flush=True)
    ours = med["dist_train"]
    ratios = {f"read_vs_{s}": _ratio(ours["read_images_per_s"], med[s]["read_images_per_s"])
              for s in systems if s != "dist_train"}
    ratios.update({f"write_vs_{s}": _ratio(ours["write_images_per_s"], med[s]["write_images_per_s"])
                   for s in systems if s in WRITERS and s != "dist_train"})
    limit = med.get("limit", {}).get("read_images_per_s")
    targets = {k: {"ratio": ratios[k], "target": v, "met": ratios[k] >= v} for k, v in TARGETS.items()
               if ratios.get(k) is not None}
    for k, t in targets.items():
        if k.startswith("read_vs_") and limit:  # as far as a leaner loader of ours could get
            t["limit_ratio"] = _ratio(limit, med[k[len("read_vs_"):]]["read_images_per_s"])
    return {"bench": "peers", "src": str(a.src), "images": images, "resize": a.resize, "quality": a.quality,
            "img_size": a.img_size, "batch_size": a.batch_size, "workers": a.workers, "rounds": a.rounds,
            "seconds": a.seconds, "ratios": ratios,
            "targets": targets}


TARGETS = {"read_vs_litdata": 2.0, "read_vs_mosaicml_streaming": 3.0, "read_vs_timm_wds": 3.0, "write_vs_litdata": 2.0}
