"""Shared-memory batch buffers reused by the loader workers (issue 22, `data.batches`): a buffer is
written again only after the main process dropped every tensor on it, so a batch never changes."""

from __future__ import annotations

import gc
from collections import deque
from types import SimpleNamespace

import torch

from dist_train.data import batches
from dist_train.data.batches import BatchPool
from test_data import epoch_batches, shards, time_limit, train_loader  # noqa: F401 (fixture)


def test_pool_reuses_a_buffer_only_once_every_view_is_gone(monkeypatch):
    monkeypatch.setattr(batches, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    pool = BatchPool(workers=2, slots=2)
    a, slot_a = pool.take(100)
    b, slot_b = pool.take(100)
    assert (slot_a, slot_b) == (2, 3) and a.untyped_storage().is_shared()  # worker 1's slots
    c, slot_c = pool.take(100)
    assert slot_c == -1 and c.data_ptr() not in (a.data_ptr(), b.data_ptr())  # both busy: a fresh one
    ptr_a = a.data_ptr()
    received = torch.zeros(10, 10, dtype=torch.uint8)  # the main process's own mapping of the batch
    pool.release_when_dropped(received, slot_a)
    view = received[2:5]
    del received
    gc.collect()
    assert pool.busy[slot_a] == 1  # a view still uses the memory
    del view
    gc.collect()
    assert pool.busy[slot_a] == 0
    again, slot = pool.take(100)
    assert slot == slot_a and again.data_ptr() == ptr_a
    bigger, slot = pool.take(200)  # another size: the slot gets a new buffer
    assert slot == -1 or bigger.numel() == 200


def test_workers_reuse_buffers_and_never_change_a_held_batch(shards):
    """Two workers, batches received, some held alive while later ones arrive: the held ones keep
    their pixels, and buffers come back to the workers (slots repeat instead of fresh segments)."""
    loader = train_loader(shards, workers=2, seed=3)
    pool = loader._reader.pool
    slots, held = [], deque()
    with time_limit(60):
        for epoch in range(3):
            loader.set_epoch(epoch)
            for images, targets, keys, slot in loader._loader:
                pool.release_when_dropped(images, slot)
                slots.append(slot)
                held.append((images, images.clone()))
                if len(held) > 2:
                    kept, copy = held.popleft()
                    assert torch.equal(kept, copy)
                    del kept, copy
    assert all(torch.equal(kept, copy) for kept, copy in held)
    reused = [s for s in slots if s >= 0]
    assert len(slots) == 3 * len(loader) and len(reused) > len(set(reused)) + 4


def test_reused_buffers_give_the_batches_of_fresh_ones(shards):
    """Batches dropped at once (buffers reused) equal batches all kept (every buffer fresh after
    the first few): same pixels, same order."""
    loader = train_loader(shards, workers=2, seed=5)
    kept = epoch_batches(loader, 1)
    loader = train_loader(shards, workers=2, seed=5)
    loader.set_epoch(1)
    with time_limit(60):
        dropped = [(images.clone(), targets) for images, targets, _ in loader]
    assert len(kept) == len(dropped) == len(loader)
    assert all(torch.equal(a, b) and torch.equal(t, u) for (a, t), (b, u) in zip(kept, dropped))
