"""WebDataset input pipelines for training and evaluation.

Why not `wds.WebDataset` + `split_by_node`: with uneven shards, ranks then run different step
counts (DDP hangs) and evaluation duplicates or drops samples. Here shards are assigned
explicitly to readers (one reader = one (rank, DataLoader worker) pair):

- training: every reader yields exactly the same number of full batches per epoch by cycling
  its shards (as timm's ReaderWds does); all randomness comes from private RNGs seeded by
  (seed, epoch, rank, worker, sample index), so an epoch is reproducible and can be resumed
  mid-way without decoding the skipped samples;
- evaluation: every sample of the split is yielded exactly once over all readers.

Images are decoded to uint8 tensors (`torchvision.io.decode_image`) and cropped, resized
(torchvision's antialiased resize) and flipped in the workers in channels-last memory, the
decoder's own layout and the one torch's vectorised uint8 resize wants; batches stay uint8 (and
channels-last) until `normalize()` runs on the device, which keeps worker CPU time and
host-to-device bytes low.

With `gpu_decode=True` the workers only read: they ship each batch's encoded JPEG/PNG bytes
(one flat uint8 tensor, so one shared-memory segment per batch) and the loader decodes them on
the device in one `torchvision.io.decode_jpeg(list, device=...)` call, then applies the same
crop/flip there with the same per-sample seeds, so a CPU run of that path gives exactly the
normal path's batches. It is for hosts whose cores cannot decode as fast as the GPU trains.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import signal
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.transforms import str_to_pil_interp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from webdataset.gopen import Pipe

from dist_train.errors import UserError

INFO_NAME = "_info.json"
SHARD_HINT = "expected a shard set written by python -m dist_train.shard"
IMAGE_KEYS = ("jpg", "png")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

TargetFn = Callable[[dict, "int | None"], int]


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """s3:// through the AWS CLI, the way webdataset's docs stream S3 shards."""
    if mode[0] != "r":
        raise ValueError(f"{url}: s3 shards are read-only here")
    return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141, 23])


# webdataset 1.0 has no s3 handler; a user-registered one wins.
wds.gopen_schemes.setdefault("s3", _gopen_s3)


# ---------------------------------------------------------------------------------------------
# Shard set info


def _is_url(root: str) -> bool:
    """http(s)://, s3://, gs://, file://, pipe:... (a one-letter scheme would be a drive)."""
    return len(urlparse(root).scheme) > 1


def join_url(root: str, name: str) -> str:
    """A file of the shard set: path join for folders, '/' for URLs; in a `pipe:` root, `{}`
    stands for the file name (e.g. `pipe:aws s3 cp s3://b/shards/{} -`)."""
    if not _is_url(root):
        return os.path.join(root, name)
    if root.startswith("pipe:") and "{}" in root:
        return root.replace("{}", name)
    return root.rstrip("/") + "/" + name


def load_info(root: str) -> dict:
    """Read `_info.json` of a local or remote shard set (through webdataset's gopen)."""
    if not _is_url(root):
        if not os.path.isdir(root):
            raise UserError(f"{root}: no such folder: {SHARD_HINT}")
        if not os.path.isfile(os.path.join(root, INFO_NAME)):
            raise UserError(f"{root}: no {INFO_NAME} (incomplete or not a shard set): {SHARD_HINT}")
    url = join_url(root, INFO_NAME)
    try:
        with wds.gopen(url) as f:
            info = json.load(f)
    except Exception as e:  # remote errors come as many types (IOError from curl, ValueError, ...)
        raise UserError(f"{url}: cannot read shard info ({e}): {SHARD_HINT}") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise UserError(f"{url}: no 'splits' in the shard info: {SHARD_HINT}")
    return info


def split_info(info: dict, split: str) -> dict:
    """The `splits[split]` entry, checked for the keys the loaders rely on."""
    splits = info.get("splits", {})
    if split not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise UserError(f"split {split!r} is not in the shard set (available: {available})")
    s = splits[split]
    try:
        names, lengths, n = list(s["filenames"]), [int(x) for x in s["shard_lengths"]], int(s["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"split {split!r}: bad entry in {INFO_NAME} ({e!r}): {SHARD_HINT}") from None
    if len(names) != len(lengths) or sum(lengths) != n:
        raise UserError(
            f"split {split!r}: {len(names)} filenames, {len(lengths)} shard_lengths summing to "
            f"{sum(lengths)}, num_samples {n}: inconsistent {INFO_NAME}: {SHARD_HINT}"
        )
    return s


def shard_urls(root: str, info: dict, split: str) -> list[str]:
    return [join_url(root, name) for name in split_info(info, split)["filenames"]]


def train_batches_per_epoch(num_samples: int, batch_size: int, workers: int, world_size: int) -> int:
    """Batches per epoch on every rank: each reader's ceil(N / readers) samples, rounded up to
    whole batches, times the readers of one rank."""
    per_rank_readers = max(1, workers)
    per_reader = math.ceil(num_samples / (world_size * per_rank_readers))
    return per_rank_readers * math.ceil(per_reader / batch_size)


# ---------------------------------------------------------------------------------------------
# Transforms


@dataclass
class AugmentConfig:
    """Augmentation options with timm train.py's names and meaning."""

    img_size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop; faces must stay in the crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    aa: str | None = None  # timm auto-augment string, e.g. 'rand-m9-mstd0.5-inc1'
    crop_pct: float = 0.875  # eval (and train_crop="center"): resize to img_size/crop_pct, center crop
    train_crop: str = "random"  # "random" (RandomResizedCrop) or "center" (face-centred data)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN  # auto-augment fill colour, as in timm


def _check_aug(aug: AugmentConfig) -> None:
    if aug.img_size <= 0:
        raise UserError(f"image size {aug.img_size}: expected a positive integer")
    lo, hi = aug.scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"scale {aug.scale}: expected 0 < MIN <= MAX <= 1")
    if not 0 < aug.ratio[0] <= aug.ratio[1]:
        raise UserError(f"ratio {aug.ratio}: expected 0 < MIN <= MAX")
    if not 0 <= aug.hflip <= 1:
        raise UserError(f"hflip {aug.hflip}: expected a probability in [0, 1]")
    if not 0 < aug.crop_pct <= 1:
        raise UserError(f"crop pct {aug.crop_pct}: expected 0 < crop_pct <= 1")
    if aug.train_crop not in ("random", "center"):
        raise UserError(f"train crop {aug.train_crop!r}: expected 'random' or 'center'")
    if aug.interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation {aug.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")


def _auto_augment(aug: AugmentConfig) -> Callable:
    """timm's auto-augment transform for `aug.aa`, with the hparams timm's transforms_factory uses."""
    hparams: dict[str, Any] = dict(
        translate_const=int(aug.img_size * 0.45),
        img_mean=tuple(min(255, round(255 * x)) for x in aug.mean),
        interpolation=str_to_pil_interp(aug.interpolation),
    )
    try:
        if aug.aa.startswith("rand"):
            return rand_augment_transform(aug.aa, hparams)
        if aug.aa.startswith("augmix"):
            return augment_and_mix_transform(aug.aa, dict(hparams, translate_pct=0.3))
        return auto_augment_transform(aug.aa, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise UserError(
            f"auto-augment {aug.aa!r}: not a timm policy string ({e!r}); e.g. 'rand-m9-mstd0.5-inc1', "
            "'augmix-m5-w4-d2', 'original'"
        ) from None


def _crop_params(
    rng: random.Random, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's `RandomResizedCrop.get_params`
    with draws from a per-sample `random.Random` (~2 us) instead of torch's global RNG (~30 us
    of scalar tensor ops plus saving and restoring the generator's state)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop closest to the ratio range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Transform:
    """uint8 [3, H, W] -> uint8 [3, S, S]: timm's train steps (random resized crop, flip,
    auto-augment) or eval steps (resize to S / crop_pct, center crop), with torchvision's resize.

    Why not a `transforms.v2.Compose`: the decoder's output is HWC in memory, and torch's
    vectorised uint8 antialiased resize wants exactly that (channels-last); v2 reads the
    cropped view as CHW and resizes at half the speed. Here the crop is copied once into
    channels-last memory and resized there, and crop/flip draws come from `random.Random(seed)`,
    so a sample's augmentation depends on its seed alone, never on a global RNG.
    """

    def __init__(self, aug: AugmentConfig, train: bool):
        _check_aug(aug)
        self.aug = aug
        self.random_crop = train and aug.train_crop == "random"
        self.hflip = aug.hflip if train else 0.0
        self.interpolation = InterpolationMode(aug.interpolation)
        # torch's nearest-neighbour uint8 resize is the one mode faster on CHW memory
        self.memory_format = torch.contiguous_format if aug.interpolation == "nearest" else torch.channels_last
        # timm's auto-augment works on PIL images and draws from `random` and `np.random`.
        self.auto_augment = _auto_augment(aug) if train and aug.aa else None
        self.draws = self.random_crop or self.hflip > 0 or self.auto_augment is not None

    def __call__(self, img: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """`seed` fixes the random choices (None: fresh entropy); the result is channels-last
        in memory except with nearest-neighbour interpolation."""
        # No generator for the deterministic eval steps: seeding one from OS entropy costs ~11 us.
        rng = random.Random(seed) if self.draws else None
        size = self.aug.img_size
        if self.random_crop:
            top, left, h, w = _crop_params(rng, img.shape[-2], img.shape[-1], self.aug.scale, self.aug.ratio)
            crop = img[None, :, top : top + h, left : left + w]
            # Flip the crop, not the result: the copy the resize needs anyway, and the same
            # pixels with bilinear/bicubic (mirror-symmetric kernels; tested against v2's order).
            if self.hflip > 0 and rng.random() < self.hflip:
                crop = crop.flip(-1)
            crop = crop.contiguous(memory_format=self.memory_format)
            img = TF.resize(crop, [size, size], interpolation=self.interpolation, antialias=True)[0]
        else:
            short = math.floor(size / self.aug.crop_pct)
            img = img[None].contiguous(memory_format=self.memory_format)
            img = TF.center_crop(TF.resize(img, [short], interpolation=self.interpolation, antialias=True), [size])[0]
            if self.hflip > 0 and rng.random() < self.hflip:
                img = TF.horizontal_flip(img)
        if self.auto_augment is not None:
            pil = TF.to_pil_image(img)
            img = TF.pil_to_tensor(_seeded_call(self.auto_augment, pil, rng.getrandbits(63)))
        return img


def _mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _seeded_call(fn: Callable, arg: Any, seed: int) -> Any:
    """fn(arg) with `random` and `np.random` seeded by `seed`, restoring them afterwards so the
    caller's streams never move (resume needs that with workers=0, where this runs in the
    training process)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return fn(arg)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def decode_rgb(data: bytes | torch.Tensor) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 [3, H, W] (HWC in memory, as the decoder writes it). 16-bit PNGs
    decode to uint16 and are scaled to 8 bits here: copied into a uint8 batch as they are, their
    values would wrap around."""
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = decode_image(data, mode=ImageReadMode.RGB)
    return img if img.dtype == torch.uint8 else TF.to_dtype(img, torch.uint8, scale=True)


# ---------------------------------------------------------------------------------------------
# Readers


class _ShardReader(IterableDataset):
    """What training and evaluation readers share: shard urls, decoding, bad-sample counting."""

    needs_label = False

    def __init__(
        self,
        urls: Sequence[str],
        lengths: Sequence[int],
        transform: _Transform,
        target_fn: TargetFn | None,
        batch_size: int,
        world_size: int,
        rank: int,
        encoded: bool = False,
    ):
        self.urls = list(urls)
        self.lengths = list(lengths)
        self.offsets = [0, *itertools.accumulate(self.lengths)][:-1]
        self.num_samples = sum(self.lengths)
        self.transform = transform
        self.target_fn = target_fn
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.encoded = encoded  # yield the image file bytes; decoding happens on the device
        self.bad = mp.Value("q", 0)  # summed over workers; reset by the owner each epoch

    def _count_bad(self, what: str, exn: BaseException) -> None:
        warnings.warn(f"skipping bad sample: {what}: {exn!r}", stacklevel=2)
        with self.bad.get_lock():
            self.bad.value += 1

    def _count_undecoded(self, ok: torch.Tensor, keys: Sequence[str] | None = None) -> None:
        """Count the images a device-side decode dropped (`ok` False)."""
        for i in (~ok).nonzero().flatten().tolist():
            what = keys[i] if keys is not None else f"image {i} of a batch"
            self._count_bad(what, ValueError("does not decode (gpu_decode)"))

    def _tar_error(self, exn: Exception) -> bool:
        """webdataset handler: a truncated or unreadable tar is warned about, counted, skipped."""
        self._count_bad("tar read error", exn)
        return True

    def _shard_samples(self, shard: int) -> Iterator[tuple[int, dict]]:
        """(position in the split, raw sample) for the samples of one shard, in tar order."""
        samples = wds.tarfile_samples([dict(url=self.urls[shard])], handler=self._tar_error)
        for i, sample in enumerate(samples):
            yield self.offsets[shard] + i, sample

    def _load(self, sample: dict, seed: int | None) -> tuple[torch.Tensor, int] | None:
        """(uint8 image, target), or None for an undecodable sample (warned and counted).
        Encoded mode: (the file's bytes as a 1-D uint8 tensor, target), checked by magic only."""
        try:
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                raise ValueError(f"no {'/'.join(IMAGE_KEYS)} member (members: {sorted(sample)})")
            img = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.encoded:
                if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
                    raise ValueError("neither JPEG nor PNG data")
            else:
                img = self.transform(decode_rgb(img), seed)
            cls = int(sample["cls"]) if "cls" in sample else None
            if self.needs_label and ("json" if self.target_fn is not None else "cls") not in sample:
                raise ValueError(f"incomplete sample, no label (members: {sorted(sample)})")
            meta = json.loads(sample["json"]) if self.target_fn is not None and "json" in sample else {}
        except Exception as e:
            self._count_bad(f"{sample.get('__key__')} in {sample.get('__url__')}", e)
            return None
        # A failing target_fn is a code or config error, not bad data: let it raise.
        if self.target_fn is not None:
            return img, int(self.target_fn(meta, cls))
        return img, -1 if cls is None else cls

    def _worker(self) -> tuple[int, int]:
        """(DataLoader worker id, workers per rank); (0, 1) in the main process."""
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)


class _TrainReader(_ShardReader):
    """Infinite, per-epoch reshuffled shard cycle per reader, cut to an equal batch quota."""

    needs_label = True  # a sample cut short by a truncated tar may lack its cls/json member

    def __init__(self, *args: Any, workers: int, seed: int, shuffle_buffer: int, **kw: Any):
        super().__init__(*args, **kw)
        self.workers = max(1, workers)
        self.readers = self.world_size * self.workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_reader = train_batches_per_epoch(
            self.num_samples, self.batch_size, workers, self.world_size
        ) // self.workers
        # Fewer shards than readers: every reader reads all shards and keeps every stride-th sample.
        self.stride = min(self.readers, self.num_samples) if len(self.urls) < self.readers else 0
        self.epoch = mp.Value("q", 0, lock=False)
        self.skip = mp.Value("q", 0, lock=False)

    def _cycle_length(self, reader: int, first_cycle: list[int]) -> int:
        if self.stride:
            keep = reader % self.stride
            return (self.num_samples - keep + self.stride - 1) // self.stride
        return sum(self.lengths[s] for s in first_cycle)

    def _first_cycle(self, epoch: int, reader: int) -> list[int]:
        """This reader's shards for the epoch's first pass: a slice of the shard order all
        ranks share, or (fewer shards than readers) all shards in the reader's own order."""
        order = list(range(len(self.urls)))
        if self.stride:
            random.Random(_mix_seed(self.seed, epoch, reader, "shards")).shuffle(order)
            return order
        random.Random(_mix_seed(self.seed, epoch)).shuffle(order)
        return order[reader :: self.readers]

    def _raw_samples(self, epoch: int, reader: int, shards: list[int]) -> Iterator[dict]:
        """Undecoded samples of `shards`, cycled without end. Each pass is shuffled on its own
        (buffer drained at the pass end) so a quota >= the reader's share sees every sample
        once, and the shard order is reshuffled between passes."""
        shards = list(shards)
        keep = reader % self.stride if self.stride else None
        cycle_rng = random.Random(_mix_seed(self.seed, epoch, reader, "cycles"))
        buffer_rng = random.Random(_mix_seed(self.seed, epoch, reader, "buffer"))
        while True:
            samples: Iterator[dict] = (
                sample
                for s in shards
                for pos, sample in self._shard_samples(s)
                if keep is None or pos % self.stride == keep
            )
            if self.shuffle_buffer > 1:
                initial = max(1, self.shuffle_buffer // 10)
                samples = wds.shuffle(self.shuffle_buffer, initial, rng=buffer_rng)(samples)
            n = 0
            for sample in samples:
                n += 1
                yield sample
            if n == 0:
                raise RuntimeError(f"no readable sample in shards {[self.urls[s] for s in shards]}")
            cycle_rng.shuffle(shards)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """(uint8 images, targets) batches; encoded mode: (bytes, lengths, targets, seeds)."""
        dl_worker, nworkers = self._worker()
        if nworkers != self.workers:
            raise RuntimeError(f"reader built for {self.workers} workers runs in {nworkers}")
        epoch, skip = self.epoch.value, self.skip.value
        # The DataLoader asks its workers round-robin from worker 0; after skipping `skip`
        # batches the next batch belongs to worker skip % W, so DataLoader worker j plays
        # worker (j + skip) % W and the resumed stream continues the full epoch's order.
        worker = (dl_worker + skip) % nworkers
        reader = self.rank * nworkers + worker
        skipped = max(0, -(-(skip - worker) // nworkers))  # batches i < skip with i % W == worker
        first = self._first_cycle(epoch, reader)
        cycle_len = self._cycle_length(reader, first)
        samples = self._raw_samples(epoch, reader, first)
        # Skipped samples are dropped undecoded; the sample index keeps their augmentation seeds.
        indexed = itertools.islice(enumerate(samples), skipped * self.batch_size, None)
        remaining = self.batches_per_reader - skipped
        images: list[torch.Tensor] = []
        targets: list[int] = []
        seeds: list[int] = []
        bad_run = 0
        while remaining > 0:
            index, sample = next(indexed)
            seed = _mix_seed(self.seed, epoch, reader, index)
            item = self._load(sample, seed)
            if item is None:
                bad_run += 1
                if bad_run >= max(1, cycle_len):
                    raise RuntimeError(f"{bad_run} bad samples in a row on reader {reader}: the shards look broken")
                continue
            bad_run = 0
            images.append(item[0])
            targets.append(item[1])
            seeds.append(seed)
            if len(images) == self.batch_size:
                target = torch.tensor(targets, dtype=torch.int64)
                if self.encoded:
                    yield (*_pack(images), target, torch.tensor(seeds, dtype=torch.int64))
                else:
                    yield _stack(images), target
                images, targets, seeds = [], [], []
                remaining -= 1


class _EvalReader(_ShardReader):
    """Each sample of the split exactly once over all readers; partial last batches."""

    def reader_samples(self, reader: int, readers: int) -> int:
        if len(self.urls) >= readers:
            return sum(self.lengths[reader::readers])
        return len(range(reader, self.num_samples, readers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dl_worker, nworkers = self._worker()
        readers = self.world_size * nworkers
        reader = self.rank * nworkers + dl_worker
        if len(self.urls) >= readers:
            shards, stride = list(range(reader, len(self.urls), readers)), 0
        else:
            shards, stride = list(range(len(self.urls))), readers
        batch: list[tuple[torch.Tensor, int, str, int]] = []
        for shard in shards:
            for pos, sample in self._shard_samples(shard):
                if stride and pos % stride != reader:
                    continue
                item = self._load(sample, None)
                if item is None:
                    continue
                batch.append((item[0], item[1], sample["__key__"], pos))
                if len(batch) == self.batch_size:
                    yield _eval_collate(batch, self.encoded)
                    batch = []
        if batch:
            yield _eval_collate(batch, self.encoded)


def _eval_collate(batch: list[tuple[torch.Tensor, int, str, int]], encoded: bool = False) -> dict[str, Any]:
    """Encoded mode: "image" is (bytes, lengths) as `_pack` makes them."""
    images, targets, keys, order = zip(*batch)
    return {
        "image": _pack(images) if encoded else _stack(images),
        "target": torch.tensor(targets, dtype=torch.int64),
        "key": list(keys),
        "order": torch.tensor(order, dtype=torch.int64),
    }


def _batch_buffer(numel: int) -> torch.Tensor:
    """A uint8 buffer, in shared memory when in a DataLoader worker (default_collate's trick):
    a batch built in it crosses to the main process without a second copy."""
    if get_worker_info() is None:
        return torch.empty(numel, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, C, H, W] in the first image's memory layout (channels-last from `_Transform`):
    converting layouts here would cost more than the resize that made the images."""
    c, h, w = images[0].shape
    buf = _batch_buffer(len(images) * images[0].numel())
    if images[0].stride(0) == 1 and c > 1:  # channels innermost
        out = buf.view(len(images), h, w, c).permute(0, 3, 1, 2)
    else:
        out = buf.view(len(images), c, h, w)
    for slot, img in zip(out, images):
        slot.copy_(img)
    return out


def _pack(encoded: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images -> (all bytes in one uint8 tensor, int64 lengths): one shared-memory
    segment per batch between worker and main process instead of one per image."""
    lengths = [len(e) for e in encoded]
    return torch.cat(list(encoded), out=_batch_buffer(sum(lengths))), torch.tensor(lengths, dtype=torch.int64)


def _unpack(flat: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(flat, lengths.tolist()))


# ---------------------------------------------------------------------------------------------
# Decoding on the device (gpu_decode)


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One image decoded on the CPU and moved to `device`; None if it does not decode."""
    try:
        img = decode_rgb(data)
    except Exception:  # torchvision raises RuntimeError or ValueError for bad bytes
        return None
    return img.to(device, non_blocking=True)


def _decode_on_device(
    encoded: Sequence[torch.Tensor], transform: _Transform, device: torch.device, seeds: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [B', 3, S, S] on `device`, bool [B] mask of the images that decoded).

    JPEGs go through one batched `decode_jpeg(list, device=...)` (nvJPEG on CUDA); PNGs, and
    every image of a batch whose batched decode fails, are decoded on the CPU one by one, so a
    single bad or exotic (e.g. CMYK) JPEG costs speed, not the batch.
    """
    decoded: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg = [i for i, e in enumerate(encoded) if bytes(e[:3].tolist()) == JPEG_MAGIC]
    if jpeg:
        try:
            for i, img in zip(jpeg, decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
                decoded[i] = img
        except Exception:  # one undecodable image fails the whole batched call
            pass
    for i, img in enumerate(decoded):
        if img is None:
            decoded[i] = _decode_one(encoded[i], device)
    images = []
    for i, img in enumerate(decoded):
        if img is None:
            continue
        # Crop/flip parameters come from the sample's seed, as in the workers.
        images.append(transform(img, None if seeds is None else int(seeds[i])))
    ok = torch.tensor([img is not None for img in decoded], dtype=torch.bool)
    if not images:
        raise RuntimeError(f"none of the {len(encoded)} images of a batch decodes: the shards look broken")
    return torch.stack(images), ok


def decode_batch_on_device(
    encoded: Sequence[torch.Tensor],
    aug: AugmentConfig,
    device: torch.device | str,
    train: bool,
    seeds: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode JPEG/PNG file bytes (1-D uint8 CPU tensors) on `device` and crop/flip them there.

    Returns (uint8 [B', 3, img_size, img_size] on `device`, bool [B] mask of the inputs that
    decoded; B' = its sum). `train` selects the training transform (RandomResizedCrop + flip)
    or the eval one (resize + center crop), as in the loaders. `seeds` (one per image) make the
    random crop and flip reproducible; the loaders pass the seeds their CPU path uses, so on
    device='cpu' the result equals that path's batch. Auto-augment (`aug.aa`) works on PIL
    images in the workers and is not available here.
    """
    _check_gpu_aug(aug)
    if seeds is not None and len(seeds) != len(encoded):
        raise ValueError(f"{len(seeds)} seeds for {len(encoded)} images")
    seed_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds
    return _decode_on_device(encoded, _Transform(aug, train), torch.device(device), seed_list)


def _check_gpu_aug(aug: AugmentConfig) -> None:
    if aug.aa:
        raise UserError(
            f"--gpu-decode cannot apply auto-augment {aug.aa!r} (timm's policies run on PIL images in the "
            "loader workers): drop --aa or --gpu-decode"
        )


def _loader_device(gpu_decode: bool, device: torch.device | str | None) -> torch.device | None:
    """Where gpu_decode decodes: `device`, else cuda when there is one, else the CPU; None
    without gpu_decode (so callers may always pass their device)."""
    if not gpu_decode:
        return None
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------------------------
# Loaders


def _check_loader_args(batch_size: int, workers: int, world_size: int, rank: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: expected a positive integer")
    if workers < 0:
        raise UserError(f"workers {workers}: expected 0 or more")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")


def _ignore_stop_signals(_worker_id: int) -> None:
    """SIGTERM/SIGUSR1 reach the workers too (SLURM signals every process of the job; torchrun
    forwards its own SIGTERM with killpg), and torch's worker handler dies of a SIGTERM not sent
    by its parent, which crashes the rank mid-step. Only the rank acts on them (engine.StepGuard)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def _kill_workers_at_exit() -> None:
    """Runs before multiprocessing's exit hook, whose terminate() (SIGTERM) the workers ignore
    and whose join() would then wait forever. SIGCHLD is reset first so torch does not report
    the deaths as worker failures."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in mp.active_children():
        if p.daemon:
            p.kill()


def _data_loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    """Batches come whole from the workers. The private generator keeps DataLoader from
    drawing its base seed from the global torch RNG at every epoch (resume must not see it)."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
    )


class TrainLoader:
    """Equal batches per epoch on every rank; `set_epoch` before iterating each epoch.

    Persistent workers read the epoch and skip count from shared values when their iterator
    is re-created, so the DataLoader is built once.
    """

    def __init__(self, reader: _TrainReader, loader: DataLoader, shards_per_rank: int,
                 device: torch.device | None = None):
        self._reader = reader
        self._loader = loader
        self._device = device  # gpu_decode: where batches are decoded (images arrive there)
        self.shards_per_rank = shards_per_rank
        self.batch_size = reader.batch_size
        self.num_samples = reader.num_samples

    def __len__(self) -> int:
        return self._reader.batches_per_reader * self._reader.workers

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch; skip_batches=k continues after the first k batches of that epoch."""
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches {skip_batches} outside 0..{len(self)}")
        self._reader.epoch.value = epoch
        self._reader.skip.value = skip_batches
        with self._reader.bad.get_lock():
            self._reader.bad.value = 0

    @property
    def bad_samples(self) -> int:
        """Bad samples and tar errors skipped so far this epoch, over all workers of this rank."""
        return self._reader.bad.value

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self._loader)
        return batches if self._device is None else self._decoded(batches)

    def _decoded(self, batches: Iterator[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """gpu_decode: images decoded and augmented on the device; a batch loses the rare image
        that fails there (counted in bad_samples) instead of being refilled as on the CPU path."""
        for flat, lengths, targets, seeds in batches:
            images, ok = _decode_on_device(_unpack(flat, lengths), self._reader.transform, self._device, seeds.tolist())
            if not ok.all():
                self._reader._count_undecoded(ok)
            yield images, targets[ok]


class EvalLoader:
    """Yields dicts: image uint8 [B,3,H,W], target int64 [B] (-1 unlabeled), key list[str],
    order int64 [B] (position in the split, to restore source order after gathering)."""

    def __init__(self, reader: _EvalReader, loader: DataLoader, workers: int, device: torch.device | None = None):
        self._reader = reader
        self._loader = loader
        self._device = device  # gpu_decode: where batches are decoded (images arrive there)
        per_rank = max(1, workers)
        readers = reader.world_size * per_rank
        counts = [reader.reader_samples(reader.rank * per_rank + w, readers) for w in range(per_rank)]
        self.num_samples = sum(counts)  # this rank's share, on data without bad samples
        self._batches = sum(math.ceil(c / reader.batch_size) for c in counts)

    def __len__(self) -> int:
        return self._batches

    @property
    def bad_samples(self) -> int:
        """Bad samples and tar errors skipped in the current / last pass."""
        return self._reader.bad.value

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self._reader.bad.get_lock():
            self._reader.bad.value = 0
        batches = iter(self._loader)
        return batches if self._device is None else self._decoded(batches)

    def _decoded(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            images, ok = _decode_on_device(_unpack(*batch["image"]), self._reader.transform, self._device, None)
            if not ok.all():
                self._reader._count_undecoded(ok, batch["key"])
            yield {
                "image": images,
                "target": batch["target"][ok],
                "key": [k for k, keep in zip(batch["key"], ok.tolist()) if keep],
                "order": batch["order"][ok],
            }


def build_train_loader(
    root: str,
    info: dict,
    split: str,
    *,
    aug: AugmentConfig,
    batch_size: int,
    workers: int,
    world_size: int,
    rank: int,
    seed: int,
    pin_memory: bool = False,
    target_fn: TargetFn | None = None,
    shuffle_buffer: int = 1000,
    gpu_decode: bool = False,
    device: torch.device | str | None = None,
) -> TrainLoader:
    """Training batches (uint8 images [B,3,H,W], int64 targets [B]); see the module docstring.

    gpu_decode: workers only read; images are decoded and augmented on `device` (default cuda
    if available, else cpu; ignored without gpu_decode) and arrive there; targets stay on the
    CPU. Not with `aug.aa`.
    """
    _check_loader_args(batch_size, workers, world_size, rank)
    decode_device = _loader_device(gpu_decode, device)
    if gpu_decode:
        _check_gpu_aug(aug)
    s = split_info(info, split)
    if split not in info.get("label_counts", {}) and target_fn is None:
        raise UserError(f"split {split!r} is unlabeled (no class in its samples): cannot train on it")
    n = int(s["num_samples"])
    if batch_size * world_size > n:
        raise UserError(
            f"global batch {batch_size} x {world_size} processes = {batch_size * world_size} is larger than "
            f"split {split!r} ({n} samples): lower --batch-size"
        )
    reader = _TrainReader(
        shard_urls(root, info, split),
        s["shard_lengths"],
        _Transform(aug, train=True),
        target_fn,
        batch_size,
        world_size,
        rank,
        workers=workers,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        encoded=gpu_decode,
    )
    num_shards = len(reader.urls)
    if reader.stride:
        shards_per_rank = num_shards
        if rank == 0:
            warnings.warn(
                f"split {split!r} has {num_shards} shards for {reader.readers} readers "
                f"({world_size} processes x {max(1, workers)} workers): every reader reads all shards and "
                f"keeps 1 sample in {reader.stride}; write more, smaller shards (python -m dist_train.shard "
                "--samples-per-shard) or use fewer workers",
                stacklevel=2,
            )
    else:
        per_rank = range(rank * reader.workers, (rank + 1) * reader.workers)
        shards_per_rank = sum(len(range(r, num_shards, reader.readers)) for r in per_rank)
    # Encoded bytes need no pinning: decode_jpeg copies them to the GPU itself.
    loader = _data_loader(reader, workers, pin_memory and not gpu_decode)
    return TrainLoader(reader, loader, shards_per_rank, decode_device)


def build_eval_loader(
    root: str,
    info: dict,
    split: str,
    *,
    aug: AugmentConfig,
    batch_size: int,
    workers: int,
    world_size: int,
    rank: int,
    pin_memory: bool = False,
    target_fn: TargetFn | None = None,
    gpu_decode: bool = False,
    device: torch.device | str | None = None,
) -> EvalLoader:
    """Every sample of the split exactly once over all ranks and workers (no padding, no drop).

    gpu_decode / device: as in `build_train_loader` ("image" arrives on the device).
    """
    _check_loader_args(batch_size, workers, world_size, rank)
    decode_device = _loader_device(gpu_decode, device)
    s = split_info(info, split)
    reader = _EvalReader(
        shard_urls(root, info, split),
        s["shard_lengths"],
        _Transform(aug, train=False),
        target_fn,
        batch_size,
        world_size,
        rank,
        encoded=gpu_decode,
    )
    return EvalLoader(reader, _data_loader(reader, workers, pin_memory and not gpu_decode), workers, decode_device)


@functools.lru_cache(maxsize=16)
def _norm_consts(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean*255 and std*255 as [1,C,1,1] on the device, built once (no per-step host copy)."""
    m = torch.tensor(mean, dtype=dtype, device=device).mul_(255).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=device).mul_(255).view(1, -1, 1, 1)
    return m, s


def normalize(
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x / 255 - mean) / std on the images' device, in the memory layout the model wants
    whatever the batch's (the loaders' batches are channels-last); run it after
    `.to(device, non_blocking=True)`."""
    m, s = _norm_consts(tuple(mean), tuple(std), images_uint8.device, dtype)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images_uint8.to(dtype, memory_format=layout).sub_(m).div_(s)
