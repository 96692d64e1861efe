"""Shard readers: which samples each (rank, DataLoader worker) reads, and in what order.

Why not `wds.WebDataset` + `split_by_node`: with uneven shards, ranks then run different step
counts (DDP hangs) and evaluation duplicates or drops samples. Here shards are assigned
explicitly to readers (one reader = one (rank, worker) pair):

- training: every reader yields exactly the same number of full batches per epoch by cycling
  its shards (as timm's ReaderWds does); all randomness comes from private RNGs seeded by (seed,
  epoch, rank, worker, sample index): an epoch is reproducible and resumes without decoding;
- evaluation: every sample of the split is yielded exactly once over all readers.

Training batches are made in the workers in shared memory: a batch's buffer is taken first,
then each sample is decoded and transformed straight into its slot (the resize writes there);
they stay uint8 (channels-last) until the device-side preparation (`data.device`).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dist_train.errors import RunFailed, is_out_of_memory
from dist_train.shardset.format import image_bytes, is_url
from dist_train.trust.files import parse_json
from dist_train.trust.schema import Dict
from dist_train.trust.media import MAX_META_BYTES, check_image_bytes, check_local_shards, max_pixels_for, refused, tar_samples

from .batches import BatchPool, new_batch, pack, stack, too_big
from .plan import Plan, mix_seed, shard_groups, with_replacements
from .transforms import Transform, decode_rgb

IMAGE_FORMATS = ("JPEG", "PNG")  # what a shard's image member may hold (shards/README.md)
CHANNELS = 3  # `decode_rgb` gives RGB whatever the file holds

TargetFn = Callable[[dict, "int | None"], int]  # (sample json metadata, stored class) -> class


def train_batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per epoch on every rank: the split padded to whole global batches (batch x world)."""
    return math.ceil(num_samples / (batch_size * world_size))


class ShardReader(IterableDataset):
    """What training and evaluation readers share: shard urls, decoding, bad-sample counting."""

    image_formats: tuple[str, ...] = IMAGE_FORMATS  # what an image member may hold

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
        folds: frozenset[int] | None = None,
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
        self.folds = folds  # a fold view: only samples of these folds exist (lengths count them alone)
        self.bad = mp.Value("q", 0)  # summed over workers; reset by the owner each epoch
        # images whose header declares more pixels are bad samples, never decoded (trust.media)
        self.max_pixels = max_pixels_for(transform.aug.img_size)
        check_local_shards(u for u in self.urls if not is_url(u))  # missing / not a tar: one line now

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
        samples = tar_samples([self.urls[shard]], handler=self._tar_error)
        if self.folds is not None:
            samples = (s for s in samples if self._in_folds(s))
        for i, sample in enumerate(samples):
            yield self.offsets[shard] + i, sample

    def _in_folds(self, sample: dict) -> bool:
        """Whether a sample belongs to the view, read from its small `fold` member (no decoding)."""
        try:
            return int(sample["fold"]) in self.folds
        except (KeyError, ValueError) as e:
            self._count_bad(f"{sample.get('__key__')} in {sample.get('__url__')}", ValueError(f"no fold ({e!r})"))
            return False

    @staticmethod
    def _meta(sample: dict) -> dict:
        """The sample's `json` member, an object, through the trust layer (size, depth, finite numbers)."""
        return parse_json(sample["json"], f"{sample.get('__key__')}.json", spec=Dict(), max_bytes=MAX_META_BYTES)

    def _load(self, sample: dict, seed: int | None) -> tuple[torch.Tensor, int] | None:
        """(uint8 image, target), or None for an undecodable sample (warned and counted).
        Encoded mode: (the file's bytes as a 1-D uint8 tensor, target), checked from its header only.
        Only reading and decoding count as bad data; the transform's errors are the settings'."""
        item = self._read(sample)
        if item is None or self.encoded:
            return item
        return self._transform(item[0], seed), item[1]

    def _read(self, sample: dict) -> tuple[torch.Tensor, int] | None:
        """`_load` without the transform: (decoded image, or the bytes in encoded mode, target)."""
        try:
            if refused(sample):
                raise ValueError(refused(sample))
            data = image_bytes(sample)
            if data is None:
                raise ValueError(f"no image member (members: {sorted(sample)})")
            check_image_bytes(data, self.max_pixels, self.image_formats)  # from the header, before decoding
            img = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.encoded else decode_rgb(data)
            cls = int(sample["cls"]) if "cls" in sample else None
            if self.needs_label and ("json" if self.target_fn is not None else "cls") not in sample:
                raise ValueError(f"incomplete sample, no label (members: {sorted(sample)})")
            meta = self._meta(sample) if self.target_fn is not None and "json" in sample else {}
        except Exception as e:
            self._count_bad(f"{sample.get('__key__')} in {sample.get('__url__')}", e)
            return None
        # A failing target_fn is a code or config error, not bad data: let it raise.
        if self.target_fn is not None:
            return img, int(self.target_fn(meta, cls))
        return img, -1 if cls is None else cls

    def _transform(self, img: torch.Tensor, seed: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The augmentation (into `out` if given); one that cannot allocate its output means the
        image size does not fit this machine, which ends the run with one line instead of
        skipping every sample."""
        try:
            return self.transform(img, seed, out=out)
        except Exception as e:
            if is_out_of_memory(e):
                raise too_big(self.transform.aug.img_size, self.batch_size) from None
            raise

    def _worker(self) -> tuple[int, int]:
        """(DataLoader worker id, workers per rank); (0, 1) in the main process."""
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)


class TrainReader(ShardReader):
    """One (rank, worker) reader of an epoch's Plan (data.plan): whole batches of its piece, each
    shuffle window read in canonical order (a few tar passes) and delivered permuted.

    A sample that does not decode is replaced by another of its window, so every batch is full
    and which positions were delivered stays exactly what the plan says.
    """

    needs_label = True  # a sample cut short by a truncated tar may lack its cls/json member

    def __init__(self, *args: Any, workers: int, seed: int, shuffle_buffer: int,
                 class_weights: Sequence[float] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.class_weights = None if class_weights is None else np.asarray(class_weights, dtype=np.float64)
        self.workers = max(1, workers)
        self.readers = self.world_size * self.workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = mp.Value("q", 0, lock=False)
        self.skip = mp.Value("q", 0, lock=False)
        self.has_done = mp.Value("b", 0, lock=False)
        self.done_bits = mp.RawArray("B", self.num_samples)  # positions delivered under an earlier plan
        self.pool = BatchPool(self.workers)  # shared-memory batch buffers the workers reuse

    def plan(self, epoch: int, done: np.ndarray | None = None) -> Plan:
        return Plan(self.seed, epoch, tuple(self.lengths), self.world_size, self.workers, self.batch_size,
                    max(1, self.shuffle_buffer), done)

    def set_plan(self, epoch: int, skip: int, done: np.ndarray | None) -> None:
        """Shared with persistent workers: they read it when their iterator is created."""
        self.epoch.value, self.skip.value = epoch, skip
        self.has_done.value = int(done is not None)
        if done is not None:
            np.frombuffer(self.done_bits, dtype=np.uint8)[:] = done

    def current_plan(self) -> Plan:
        done = np.frombuffer(self.done_bits, dtype=np.uint8).astype(bool) if self.has_done.value else None
        return self.plan(self.epoch.value, done)

    def _samples_at(self, shard: int, indices: list[int]) -> dict[int, dict]:
        """Raw samples at increasing `indices` of one shard; a tar pass goes on from the last
        one when it can (consecutive windows read on in the same shard)."""
        cursor = getattr(self, "_cursor", None)
        if cursor is None or cursor[0] != shard or cursor[1] > indices[0]:
            cursor = [shard, 0, iter(self._shard_samples(shard))]
        out: dict[int, dict] = {}
        for want in indices:
            while cursor[1] <= want:
                item = next(cursor[2], None)
                if item is None:  # a truncated tar ends early: the rest counts as bad
                    self._cursor = None
                    return out
                index = item[0] - self.offsets[shard]
                cursor[1] = index + 1
                if index == want:
                    out[want] = item[1]
        self._cursor = cursor
        return out

    def _read_window(self, plan: Plan, positions: np.ndarray) -> dict[int, dict]:
        """position -> raw sample for a window's positions, read in canonical order."""
        unique = np.unique(positions)
        shards, indices = plan.locate(unique)
        found: dict[int, dict] = {}
        for shard, wanted in shard_groups(shards.tolist(), indices.tolist()):
            start = int(plan._starts[shard])
            found.update({start + i: sample for i, sample in self._samples_at(int(shard), wanted).items()})
        return found

    def _decoded(self, raw: dict, pos: int, copy: int, epoch: int) -> tuple[Any, int, str, int] | None:
        """(decoded image or encoded bytes, target, key, seed) of one slot, or None if it is bad."""
        seed = mix_seed(self.seed, epoch, pos, copy)
        sample = raw.get(pos)
        if sample is None:
            self._count_bad(f"position {pos} of the epoch", ValueError("missing from its shard (truncated tar?)"))
            return None
        item = self._read(sample)
        return None if item is None else (item[0], item[1], sample["__key__"], seed)

    def _reweighted(self, raw: dict, pos: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """--sampler: the window's slots drawn again from its own samples, with replacement, each
        with probability proportional to its class's weight (repeats get their own copy number)."""
        labels = np.array([self._label(raw.get(int(p))) for p in pos])
        w = np.where(labels >= 0, self.class_weights[np.clip(labels, 0, None)], 0.0)
        if w.sum() <= 0:
            return pos, np.zeros(len(pos), dtype=np.int64)
        pick = np.random.default_rng(seed).choice(len(pos), size=len(pos), p=w / w.sum())
        copy = np.zeros(len(pos), dtype=np.int64)
        seen: dict[int, int] = {}
        for q, i in enumerate(pick.tolist()):
            copy[q] = seen.get(i, 0)
            seen[i] = copy[q] + 1
        return pos[pick], copy

    def _label(self, sample: dict | None) -> int:
        """A raw sample's training class without decoding its image (-1 if it has none)."""
        try:
            if self.target_fn is not None:
                cls = int(sample["cls"]) if "cls" in sample else None
                return int(self.target_fn(self._meta(sample), cls))
            return int(sample["cls"])
        except Exception:  # missing or bad members: the decode step counts it as bad
            return -1

    def _window_slots(self, plan: Plan, pos: np.ndarray, copy: np.ndarray, first: int, window_id: int = 0
                      ) -> Iterator[tuple]:
        """(decoded image, target, key, seed) per slot from `first` on, decoded as they are
        consumed; bad slots take a good sample of the same window (`with_replacements`)."""
        raw = self._read_window(plan, pos)
        if self.class_weights is not None:
            pos, copy = self._reweighted(raw, pos, mix_seed(self.seed, plan.epoch, "sampler", self.rank, window_id,
                                                            plan.world, plan.workers, plan.batch))

        def none_good() -> RunFailed:
            return RunFailed(f"{len(pos) - first} bad samples in a row on reader {self.rank * self.workers}: "
                             "the shards look broken")

        return with_replacements(lambda q: self._decoded(raw, int(pos[q]), int(copy[q]), plan.epoch),
                                 first, len(pos), none_good)

    def __iter__(self) -> Iterator[tuple]:
        """(uint8 images, targets, keys, pool slot) batches (`TrainLoader` hands the slot back to the
        pool); encoded mode: (bytes, lengths, targets, seeds, keys)."""
        dl_worker, nworkers = self._worker()
        if nworkers != self.workers:
            raise RuntimeError(f"reader built for {self.workers} workers runs in {nworkers}")
        plan, skip = self.current_plan(), self.skip.value
        # The DataLoader asks its workers round-robin from worker 0; after skipping `skip`
        # batches the next batch belongs to worker skip % W, so DataLoader worker j plays
        # worker (j + skip) % W and the resumed stream continues the full epoch's order.
        worker = (dl_worker + skip) % nworkers
        skipped = len(range(worker, skip, nworkers)) * self.batch_size  # slots delivered already
        pos, copy = plan.reader_positions(self.rank, worker)
        self._cursor = None
        for a, b in plan.windows(self.rank, worker):
            if b <= skipped:
                continue  # skipped without reading or decoding
            first = max(0, skipped - a)
            slots = self._window_slots(plan, pos[a:b], copy[a:b], first, window_id=worker * 10**6 + a)
            for i in range(first, b - a, self.batch_size):
                yield self._batch(slots, min(self.batch_size, b - a - i))

    def _batch(self, slots: Iterator[tuple], n: int) -> tuple:
        """The next `n` slots as a batch: each image transformed straight into its place in the
        (shared-memory) batch, taken from the pool first."""
        if self.encoded:
            images, targets, keys, seeds = zip(*itertools.islice(slots, n))
            return (*pack(images), torch.tensor(targets, dtype=torch.int64), torch.tensor(seeds, dtype=torch.int64),
                    list(keys))
        size = self.transform.aug.img_size
        batch, slot = new_batch(self.pool, n, CHANNELS, size, size, self.transform.channels_last)
        targets, keys = [], []
        try:
            for j, (img, target, key, seed) in enumerate(itertools.islice(slots, n)):
                self._transform(img, seed, out=batch[j:j + 1])
                targets.append(target)
                keys.append(key)
        except BaseException:
            self.pool.give_back(slot)
            raise
        return batch, torch.tensor(targets, dtype=torch.int64), keys, slot


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
        "image": pack(images) if encoded else stack(images)[0],
        "target": torch.tensor(targets, dtype=torch.int64),
        "key": list(keys),
        "order": torch.tensor(order, dtype=torch.int64),
    }
