"""Batch memory: uint8 batches built in the DataLoader workers straight into shared memory.

The training reader takes a batch's buffer first (`new_batch`) and its transforms write each
image into its slot; `stack` copies finished images into one (evaluation, file lists).

A batch built in shared memory crosses to the main process without a second copy
(default_collate's trick). A fresh shared-memory segment is costly though: the kernel allocates,
zeroes and maps every page of it, ~110 us of worker CPU per 224-px image on the 2-vCPU box (more
than the resize, against ~18 us for private memory). `BatchPool` lets each worker reuse its own
segments: one is written again only after the main process has dropped every tensor that uses
it (a finalizer on the batch's storage, which outlives all its views), so reuse never changes a
batch that is still in use; when none is free, a fresh segment is made as before.
"""

from __future__ import annotations

import multiprocessing as mp
import weakref
from typing import Sequence

import torch
from torch.utils.data import get_worker_info

from dist_train.errors import UserError, is_out_of_memory

POOL_SLOTS = 4  # per worker: the DataLoader's 2 prefetched batches + ~2 held by the consumer


def too_big(img_size: int, batch_size: int, shared: bool = False) -> UserError:
    """The line for images or batches that do not fit in memory: the sizes, and what to change."""
    image = 3 * img_size * img_size
    where = " in shared memory" if shared else ""
    room = ", or give /dev/shm more room (docker: --shm-size)" if shared else ""
    return UserError(f"--img-size {img_size}: out of memory making a batch of {batch_size} images of "
                     f"{img_size}x{img_size}{where} ({image * batch_size:,} bytes as uint8, {image:,} per image): "
                     f"use a smaller --img-size or --batch-size{room}")


def _batch_buffer(numel: int) -> torch.Tensor:
    """A uint8 buffer, in shared memory when in a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(numel, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))


class BatchPool:
    """Per-worker shared-memory batch buffers, reused once the main process has let go of them.

    Made in the main process before the workers start (its `busy` flags are shared with them);
    `take` runs in a worker, `release_when_dropped` in the main process on each batch received.
    A batch the consumer never received (an epoch's iterator dropped early: the DataLoader
    discards what its workers had prefetched) keeps its slot busy for good, which costs speed
    only: with all its slots busy a worker makes fresh segments, as without the pool.
    """

    def __init__(self, workers: int, slots: int = POOL_SLOTS):
        self.slots = slots
        self.busy = mp.RawArray("b", max(1, workers) * slots)  # 1: a batch on it may be alive in the main process
        self._buffers: dict[int, torch.Tensor] = {}  # in a worker: slot -> its buffer

    def take(self, numel: int) -> tuple[torch.Tensor, int]:
        """(uint8 buffer of `numel`, its slot): a free one of this worker's, else a fresh one (slot -1)."""
        info = get_worker_info()
        if info is None:  # the main process: private memory, nothing to share
            return _batch_buffer(numel), -1
        for slot in range(info.id * self.slots, (info.id + 1) * self.slots):
            if not self.busy[slot]:
                buf = self._buffers.get(slot)
                if buf is None or buf.numel() != numel:
                    buf = self._buffers[slot] = _batch_buffer(numel)
                self.busy[slot] = 1
                return buf, slot
        return _batch_buffer(numel), -1

    def give_back(self, slot: int) -> None:
        """Worker: free `slot` again when the batch taken on it was never finished (an error)."""
        if slot >= 0:
            self.busy[slot] = 0

    def release_when_dropped(self, images: torch.Tensor, slot: int) -> None:
        """Main process: free `slot` for its worker once no tensor uses the batch's memory any more."""
        if slot >= 0:
            weakref.finalize(images.untyped_storage(), self.busy.__setitem__, slot, 0)


def new_batch(pool: BatchPool | None, n: int, c: int, h: int, w: int, channels_last: bool
              ) -> tuple[torch.Tensor, int]:
    """(uint8 [n, C, H, W] batch to write images into, pool slot or -1): channels innermost in
    memory if `channels_last` (and C > 1), else plain CHW per image."""
    numel = n * c * h * w
    try:
        buf, slot = pool.take(numel) if pool is not None else (_batch_buffer(numel), -1)
    except Exception as e:
        shared = isinstance(e, RuntimeError) and "unable to allocate shared memory" in str(e)  # /dev/shm full
        if not (shared or is_out_of_memory(e)):
            raise
        raise too_big(h, n, shared) from None
    if channels_last and c > 1:
        return buf.view(n, h, w, c).permute(0, 3, 1, 2), slot
    return buf.view(n, c, h, w), slot


def stack(images: Sequence[torch.Tensor], pool: BatchPool | None = None) -> tuple[torch.Tensor, int]:
    """([B, C, H, W] in the first image's memory layout, pool slot or -1). Channels-last from
    `Transform` stays so: converting layouts here would cost more than the resize that made them."""
    c, h, w = images[0].shape
    out, slot = new_batch(pool, len(images), c, h, w, images[0].stride(0) == 1)
    for target, img in zip(out, images):
        target.copy_(img)
    return out, slot


def pack(encoded: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images -> (all bytes in one uint8 tensor, int64 lengths): one shared-memory
    segment per batch between worker and main process instead of one per image."""
    lengths = [len(e) for e in encoded]
    return torch.cat(list(encoded), out=_batch_buffer(sum(lengths))), torch.tensor(lengths, dtype=torch.int64)


def unpack(flat: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(flat, lengths.tolist()))
