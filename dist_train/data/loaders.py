"""The training and evaluation loaders: DataLoaders over the shard readers.

The training loader gives every rank the same number of whole batches per epoch; the
evaluation loader every sample once over all ranks. Neither may go through
`accelerator.prepare` (it would shard the stream a second time).
"""

from __future__ import annotations

import atexit
import math
import multiprocessing as mp
import signal
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dist_train.errors import UserError
from dist_train.shardset.format import is_labeled, is_url, shard_urls, split_info
from dist_train.trust.media import check_local_shards

from .device import check_gpu_augment, decode_device, decode_on_device
from .plan import Plan
from .batches import unpack
from .readers import EvalReader, TargetFn, TrainReader
from .transforms import AugmentConfig, Transform


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
    by its parent, which crashes the rank mid-step; Ctrl-C reaches every process of the terminal's
    foreground group, and a worker ends on it. Only the rank acts on them (train.guard.StepGuard)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
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
    """Equal batches per epoch on every rank, as (uint8 images, targets, keys); `set_epoch`
    before iterating each epoch.

    Persistent workers read the epoch's plan (epoch, skip count, positions delivered under an
    earlier layout) from shared memory when their iterator is re-created, so the DataLoader is
    built once.
    """

    def __init__(self, reader: TrainReader, loader: DataLoader, shards_per_rank: int,
                 device: torch.device | None = None):
        self._reader = reader
        self._loader = loader
        self._device = device  # gpu_decode: where batches are decoded (images arrive there)
        self.shards_per_rank = shards_per_rank
        self.batch_size = reader.batch_size
        self.num_samples = reader.num_samples
        self.workers = reader.workers
        self.world_size = reader.world_size

    def __len__(self) -> int:
        return self._reader.current_plan().batches_per_rank

    def start(self) -> None:
        """Fork the persistent workers now, reading nothing (a plan that skips the whole epoch;
        the next `set_epoch` and iteration restart them on the real one).

        A trainer starts its loaders before its first collective. A fork copies only the forking
        thread, and gloo's threads take CPython's thread-state lock without the GIL (to release
        Python objects after a collective): a worker forked at that instant inherits the lock
        held and hangs inside os.fork, on CPython releases without the fix of gh-112275 (3.11.7
        is one). A worker forked at the first evaluation hung so, once, in a 2-rank CI run."""
        if self._loader.num_workers and self._loader._iterator is None:
            self.set_epoch(0, skip_batches=self._reader.plan(0).batches_per_rank)
            iter(self._loader)  # kept by the DataLoader (persistent workers)

    @property
    def transform(self) -> Transform:
        """The per-sample augmentation the workers apply."""
        return self._reader.transform

    def plan(self, epoch: int, done: np.ndarray | None = None) -> Plan:
        """The layout of `epoch` (its positions not in `done`) this loader reads."""
        return self._reader.plan(epoch, done)

    def set_epoch(self, epoch: int, skip_batches: int = 0, done: np.ndarray | None = None) -> None:
        """Select the epoch; skip_batches=k continues after the first k batches of its plan;
        `done` (bool per position) leaves out what an earlier layout delivered."""
        batches = self._reader.plan(epoch, done).batches_per_rank
        if not 0 <= skip_batches <= batches:
            raise ValueError(f"skip_batches {skip_batches} outside 0..{batches}")
        self._reader.set_plan(epoch, skip_batches, done)
        with self._reader.bad.get_lock():
            self._reader.bad.value = 0

    @property
    def bad_samples(self) -> int:
        """Bad samples and tar errors skipped so far this epoch, over all workers of this rank."""
        return self._reader.bad.value

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        batches = iter(self._loader)
        return self._released(batches) if self._device is None else self._decoded(batches)

    def _released(self, batches: Iterator[tuple]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Each batch's shared-memory buffer goes back to its worker once the batch is dropped."""
        release = self._reader.pool.release_when_dropped
        for images, targets, keys, slot in batches:
            release(images, slot)
            yield images, targets, keys

    def _decoded(self, batches: Iterator[tuple]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """gpu_decode: images decoded and augmented on the device; a batch loses the rare image
        that fails there (counted in bad_samples) instead of being refilled as on the CPU path."""
        for flat, lengths, targets, seeds, keys in batches:
            images, ok = decode_on_device(unpack(flat, lengths), self._reader.transform, self._device, seeds.tolist())
            if not ok.all():
                self._reader.count_undecoded(ok)
            yield images, targets[ok], [k for k, keep in zip(keys, ok.tolist()) if keep]


class EvalLoader:
    """Yields dicts: image uint8 [B,3,H,W], target int64 [B] (-1 unlabeled), key list[str],
    order int64 [B] (position in the split, to restore source order after gathering)."""

    def __init__(self, reader: EvalReader, loader: DataLoader, workers: int, device: torch.device | None = None):
        self._reader = reader
        self._loader = loader
        self._device = device  # gpu_decode: where batches are decoded (images arrive there)
        self._started: Iterator | None = None  # the first pass, begun by `start`
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

    def start(self) -> None:
        """Fork the (persistent) workers now (why: `TrainLoader.start`) and let them read ahead
        the first pass, which the next iteration continues."""
        if self._loader.num_workers and self._loader._iterator is None:
            self._reset_bad()
            self._started = iter(self._loader)

    def _reset_bad(self) -> None:
        with self._reader.bad.get_lock():
            self._reader.bad.value = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches, self._started = self._started, None
        if batches is None:
            self._reset_bad()
            batches = iter(self._loader)
        return batches if self._device is None else self._decoded(batches)

    def _decoded(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            images, ok = decode_on_device(unpack(*batch["image"]), self._reader.transform, self._device, None)
            if not ok.all():
                self._reader.count_undecoded(ok, batch["key"])
            yield {
                "image": images,
                "target": batch["target"][ok],
                "key": [k for k, keep in zip(batch["key"], ok.tolist()) if keep],
                "order": batch["order"][ok],
            }


def check_split_shards(root: str, info: dict, splits: Sequence[str | None]) -> None:
    """The splits (None: none) are in `_info.json` and their local shards are present, plain tars:
    one line naming the first that is not, before a run writes anything (URLs: when read)."""
    for split in filter(None, splits):
        check_local_shards(u for u in shard_urls(root, info, split) if not is_url(u))


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
    class_weights: Sequence[float] | None = None,
    gpu_decode: bool = False,
    device: torch.device | str | None = None,
) -> TrainLoader:
    """Training batches (uint8 images [B,3,H,W], int64 targets [B]); see the module docstring.

    gpu_decode: workers only read; images are decoded and augmented on `device` (default cuda
    if available, else cpu; ignored without gpu_decode) and arrive there; targets stay on the
    CPU. Not with `aug.aa`. class_weights: per class, the relative chance of a sample to fill a
    slot of its shuffle window (None: every sample once); see `sampler_weights`.
    """
    _check_loader_args(batch_size, workers, world_size, rank)
    where = decode_device(gpu_decode, device)
    if gpu_decode:
        check_gpu_augment(aug)
    s = split_info(info, split)
    if not is_labeled(info, split) and target_fn is None:
        raise UserError(f"split {split!r} is unlabeled (no class in its samples): cannot train on it")
    if batch_size * world_size > s.num_samples:
        raise UserError(
            f"global batch {batch_size} x {world_size} processes = {batch_size * world_size} is larger than "
            f"split {split!r} ({s.num_samples} samples): lower --batch-size"
        )
    reader = TrainReader(shard_urls(root, info, split), s.shard_lengths, Transform(aug, train=True), target_fn,
                         batch_size, world_size, rank, workers=workers, seed=seed, shuffle_buffer=shuffle_buffer,
                         class_weights=class_weights, encoded=gpu_decode, folds=s.keep_folds)
    # Encoded bytes need no pinning: decode_jpeg copies them to the GPU itself.
    loader = _data_loader(reader, workers, pin_memory and not gpu_decode)
    return TrainLoader(reader, loader, _shards_per_rank(reader, split), where)


def sampler_weights(kind: str, counts: dict[str, int] | None, num_classes: int) -> list[float] | None:
    """Per-class weights for `--sampler`: balanced (equal class shares: 1/n), sqrt (shares in
    proportion to sqrt(n): 1/sqrt(n)), none (None)."""
    if kind == "none":
        return None
    if not counts:
        raise UserError(f"--sampler {kind}: the shard set has no class counts for the training split")
    n = np.array([int(counts.get(str(c), 0)) for c in range(num_classes)], dtype=np.float64)
    power = 1.0 if kind == "balanced" else 0.5
    return np.where(n > 0, 1.0 / np.maximum(n, 1) ** power, 0.0).tolist()


def _shards_per_rank(reader: TrainReader, split: str) -> int:
    """How many shards this rank's readers touch in the first epoch; with fewer shards than
    readers (several readers then read parts of the same shards) rank 0 warns once."""
    plan = reader.plan(0)
    positions = np.concatenate([plan.reader_positions(reader.rank, w)[0] for w in range(reader.workers)])
    touched = len(set(plan.locate(positions)[0].tolist()))
    num_shards = len(reader.urls)
    if num_shards < reader.readers and reader.rank == 0:
        warnings.warn(
            f"split {split!r} has {num_shards} shards for {reader.readers} readers "
            f"({reader.world_size} processes x {reader.workers} workers): several readers read the same shards "
            "(each up to its part); write more, smaller shards (python -m dist_train.shard --samples-per-shard) "
            "or use fewer workers",
            stacklevel=3,
        )
    return touched


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
    where = decode_device(gpu_decode, device)
    s = split_info(info, split)
    reader = EvalReader(shard_urls(root, info, split), s.shard_lengths, Transform(aug, train=False), target_fn,
                        batch_size, world_size, rank, encoded=gpu_decode, folds=s.keep_folds)
    return EvalLoader(reader, _data_loader(reader, workers, pin_memory and not gpu_decode), workers, where)

