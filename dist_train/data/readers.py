"""Shard readers: which samples each (rank, DataLoader worker) reads, and in what order.

Why not `wds.WebDataset` + `split_by_node`: with uneven shards, ranks then run different step
counts (DDP hangs) and evaluation duplicates or drops samples. Here shards are assigned
explicitly to readers (one reader = one (rank, worker) pair):

- training: every reader yields exactly the same number of full batches per epoch by cycling
  its shards (as timm's ReaderWds does); all randomness comes from private RNGs seeded by
  (seed, epoch, rank, worker, sample index), so an epoch is reproducible and can be resumed
  mid-way without decoding the skipped samples;
- evaluation: every sample of the split is yielded exactly once over all readers.

Batches are collated in the workers into shared memory and stay uint8 (channels-last) until
the device-side preparation (`data.device`).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import random
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from dist_train.errors import UserError, is_out_of_memory
from dist_train.shardset.format import image_bytes

from .transforms import Transform, decode_rgb, mix_seed

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TargetFn = Callable[[dict, "int | None"], int]  # (sample json metadata, stored class) -> class


def train_batches_per_epoch(num_samples: int, batch_size: int, workers: int, world_size: int) -> int:
    """Batches per epoch on every rank: each reader's ceil(N / readers) samples, rounded up to
    whole batches, times the readers of one rank."""
    per_rank_readers = max(1, workers)
    per_reader = math.ceil(num_samples / (world_size * per_rank_readers))
    return per_rank_readers * math.ceil(per_reader / batch_size)



class ShardReader(IterableDataset):
    """What training and evaluation readers share: shard urls, decoding, bad-sample counting."""

    needs_label = False

    def __init__(
        self,
        urls: Sequence[str],
        lengths: Sequence[int],
        transform: Transform,
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

    def count_undecoded(self, ok: torch.Tensor, keys: Sequence[str] | None = None) -> None:
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
        Encoded mode: (the file's bytes as a 1-D uint8 tensor, target), checked by magic only.
        Only reading and decoding count as bad data; the transform's errors are the settings'."""
        try:
            data = image_bytes(sample)
            if data is None:
                raise ValueError(f"no image member (members: {sorted(sample)})")
            img = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.encoded:
                if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
                    raise ValueError("neither JPEG nor PNG data")
            else:
                img = decode_rgb(img)
            cls = int(sample["cls"]) if "cls" in sample else None
            if self.needs_label and ("json" if self.target_fn is not None else "cls") not in sample:
                raise ValueError(f"incomplete sample, no label (members: {sorted(sample)})")
            meta = json.loads(sample["json"]) if self.target_fn is not None and "json" in sample else {}
        except Exception as e:
            self._count_bad(f"{sample.get('__key__')} in {sample.get('__url__')}", e)
            return None
        if not self.encoded:
            img = self._transform(img, seed)
        # A failing target_fn is a code or config error, not bad data: let it raise.
        if self.target_fn is not None:
            return img, int(self.target_fn(meta, cls))
        return img, -1 if cls is None else cls

    def _transform(self, img: torch.Tensor, seed: int | None) -> torch.Tensor:
        """The augmentation; one that cannot allocate its output means the image size does not
        fit this machine, which ends the run with one line instead of skipping every sample."""
        try:
            return self.transform(img, seed)
        except Exception as e:
            if is_out_of_memory(e):
                raise too_big(self.transform.aug.img_size, self.batch_size) from None
            raise

    def _worker(self) -> tuple[int, int]:
        """(DataLoader worker id, workers per rank); (0, 1) in the main process."""
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)


class TrainReader(ShardReader):
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
            random.Random(mix_seed(self.seed, epoch, reader, "shards")).shuffle(order)
            return order
        random.Random(mix_seed(self.seed, epoch)).shuffle(order)
        return order[reader :: self.readers]

    def _raw_samples(self, epoch: int, reader: int, shards: list[int]) -> Iterator[dict]:
        """Undecoded samples of `shards`, cycled without end. Each pass is shuffled on its own
        (buffer drained at the pass end) so a quota >= the reader's share sees every sample
        once, and the shard order is reshuffled between passes."""
        shards = list(shards)
        keep = reader % self.stride if self.stride else None
        cycle_rng = random.Random(mix_seed(self.seed, epoch, reader, "cycles"))
        buffer_rng = random.Random(mix_seed(self.seed, epoch, reader, "buffer"))
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
            seed = mix_seed(self.seed, epoch, reader, index)
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
                    yield (*pack(images), target, torch.tensor(seeds, dtype=torch.int64))
                else:
                    yield _stack(images), target
                images, targets, seeds = [], [], []
                remaining -= 1


class EvalReader(ShardReader):
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
                    yield eval_collate(batch, self.encoded)
                    batch = []
        if batch:
            yield eval_collate(batch, self.encoded)


def eval_collate(batch: list[tuple[torch.Tensor, int, str, int]], encoded: bool = False) -> dict[str, Any]:
    """Encoded mode: "image" is (bytes, lengths) as `pack` makes them."""
    images, targets, keys, order = zip(*batch)
    return {
        "image": pack(images) if encoded else _stack(images),
        "target": torch.tensor(targets, dtype=torch.int64),
        "key": list(keys),
        "order": torch.tensor(order, dtype=torch.int64),
    }


def too_big(img_size: int, batch_size: int) -> UserError:
    """The line for images or batches that do not fit in memory: the sizes, and what to change."""
    image = 3 * img_size * img_size
    return UserError(f"--img-size {img_size}: out of memory making a batch of {batch_size} images of "
                     f"{img_size}x{img_size} ({image * batch_size:,} bytes as uint8, {image:,} per image): "
                     "use a smaller --img-size or --batch-size")


def _batch_buffer(numel: int) -> torch.Tensor:
    """A uint8 buffer, in shared memory when in a DataLoader worker (default_collate's trick):
    a batch built in it crosses to the main process without a second copy."""
    if get_worker_info() is None:
        return torch.empty(numel, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, C, H, W] in the first image's memory layout (channels-last from `Transform`):
    converting layouts here would cost more than the resize that made the images."""
    c, h, w = images[0].shape
    try:
        buf = _batch_buffer(len(images) * images[0].numel())
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise too_big(h, len(images)) from None
    if images[0].stride(0) == 1 and c > 1:  # channels innermost
        out = buf.view(len(images), h, w, c).permute(0, 3, 1, 2)
    else:
        out = buf.view(len(images), c, h, w)
    for slot, img in zip(out, images):
        slot.copy_(img)
    return out


def pack(encoded: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images -> (all bytes in one uint8 tensor, int64 lengths): one shared-memory
    segment per batch between worker and main process instead of one per image."""
    lengths = [len(e) for e in encoded]
    return torch.cat(list(encoded), out=_batch_buffer(sum(lengths))), torch.tensor(lengths, dtype=torch.int64)


def unpack(flat: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(flat, lengths.tolist()))

