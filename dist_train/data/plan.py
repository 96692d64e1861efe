"""The epoch's sample order, independent of how many processes and workers read it.

An epoch's canonical order is the split's shards in an order drawn from (seed, epoch), each in
its tar order: position p <-> (shard, index). A Plan lays the positions still to deliver this
epoch out over (world x workers) readers, MosaicML-streaming style:

- padded by cycling to whole global batches (batch x world): padding stays under one global
  batch per epoch, and every rank gets the same number of batches;
- one contiguous chunk of that per rank; each rank's chunk in one contiguous piece per
  DataLoader worker (the workers deliver in turn, so worker k makes the rank's batches k, k+K,
  ...); a reader reads a few shards in order, never all of them;
- inside a piece, windows of about `shuffle` samples are permuted (seeded), so batch-mates
  change every epoch.

Which positions are delivered after J batches per rank is a pure function of the plan, so a
resume on the same layout skips J batches, and a resume on another (world, workers, batch size)
lays the positions not yet delivered out afresh (`delivered`).

A slot whose sample turns out bad (it does not decode) takes the next good sample of its window,
cyclically (`with_replacements`), so every batch stays full and the positions stay the plan's.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator, Sequence

import numpy as np


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def encode_done(done: np.ndarray | None) -> str | None:
    """bool [N] -> base64 of the packed bits (JSON-friendly, N/8 bytes)."""
    return None if done is None or not done.any() else base64.b64encode(np.packbits(done).tobytes()).decode()


def decode_done(text: str | None, n: int) -> np.ndarray | None:
    if not text:
        return None
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n).astype(bool)


@dataclass(frozen=True)
class Plan:
    """One layout of an epoch's remaining positions over `world` ranks x `workers` readers each."""

    seed: int
    epoch: int
    lengths: tuple[int, ...]  # samples per shard, in the split's order
    world: int
    workers: int  # DataLoader workers per rank (0 counts as 1: the rank itself reads)
    batch: int
    shuffle: int = 1000  # samples per shuffle window (whole batches, at least one)
    done: np.ndarray | None = None  # bool [N]: delivered earlier in this epoch (another layout)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", max(1, self.workers))

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    @cached_property
    def shard_order(self) -> list[int]:
        order = list(range(len(self.lengths)))
        random.Random(mix_seed(self.seed, self.epoch)).shuffle(order)
        return order

    @cached_property
    def _starts(self) -> np.ndarray:
        """Canonical position of each shard's first sample (indexed by shard)."""
        starts = np.zeros(len(self.lengths), dtype=np.int64)
        pos = 0
        for s in self.shard_order:
            starts[s] = pos
            pos += self.lengths[s]
        return starts

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical positions -> (shard, index in the shard)."""
        order = np.array(self.shard_order, dtype=np.int64)
        bounds = np.cumsum([self.lengths[s] for s in self.shard_order])
        slot = np.searchsorted(bounds, positions, side="right")
        shard = order[slot]
        return shard, positions - self._starts[shard]

    @cached_property
    def remaining(self) -> np.ndarray:
        """Positions not yet delivered this epoch, in canonical order."""
        everything = np.arange(self.num_samples, dtype=np.int64)
        return everything if self.done is None else everything[~self.done]

    @cached_property
    def batches_per_rank(self) -> int:
        return math.ceil(len(self.remaining) / (self.batch * self.world))

    @cached_property
    def _padded(self) -> np.ndarray:
        """The remaining positions cycled to whole global batches."""
        return np.resize(self.remaining, self.batches_per_rank * self.batch * self.world)

    def worker_batches(self, worker: int) -> int:
        """How many of the rank's batches worker `worker` makes: those j with j % workers == worker."""
        return len(range(worker, self.batches_per_rank, self.workers))

    def _piece(self, rank: int, worker: int) -> tuple[int, int]:
        """[start, end) in the padded list of the piece (rank, worker) reads."""
        start = rank * self.batches_per_rank + sum(self.worker_batches(w) for w in range(worker))
        return start * self.batch, (start + self.worker_batches(worker)) * self.batch

    def reader_positions(self, rank: int, worker: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in delivery order, copy number of each: 0, or 1+ for padding repeats) of
        one reader; its batches are consecutive slices of `batch`."""
        a, b = self._piece(rank, worker)
        index = np.arange(a, b)
        pos, copy = self._padded[a:b].copy(), index // max(1, len(self.remaining))
        window = max(1, self.shuffle // self.batch) * self.batch
        for w0 in range(0, len(pos), window):
            rng = np.random.default_rng(mix_seed(self.seed, self.epoch, self.world, self.workers, self.batch,
                                                 rank, worker, a + w0))
            perm = w0 + rng.permutation(min(window, len(pos) - w0))
            pos[w0:w0 + len(perm)], copy[w0:w0 + len(perm)] = pos[perm], copy[perm]
        return pos, copy

    def windows(self, rank: int, worker: int) -> list[tuple[int, int]]:
        """[start, end) of each shuffle window in the reader's delivery order."""
        n = self.worker_batches(worker) * self.batch
        window = max(1, self.shuffle // self.batch) * self.batch
        return [(w, min(w + window, n)) for w in range(0, n, window)]

    def delivered(self, batches: int) -> np.ndarray:
        """bool [N]: positions delivered (this plan's and `done`) once every rank has taken its
        first `batches` batches."""
        out = np.zeros(self.num_samples, dtype=bool) if self.done is None else self.done.copy()
        for rank in range(self.world):
            for worker in range(self.workers):
                k = len(range(worker, batches, self.workers))
                out[self.reader_positions(rank, worker)[0][: k * self.batch]] = True
        return out

    def same_layout(self, world: int, workers: int, batch: int) -> bool:
        return (self.world, self.workers, self.batch) == (world, max(1, workers), batch)


def shard_groups(shards: Sequence[int], indices: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Consecutive (shard, increasing indices) runs of a reader's read order: one tar pass each."""
    groups: list[tuple[int, list[int]]] = []
    for s, i in zip(shards, indices):
        if groups and groups[-1][0] == s and groups[-1][1][-1] < i:
            groups[-1][1].append(i)
        else:
            groups.append((s, [i]))
    return groups


def with_replacements(decode: Callable[[int], Any], first: int, end: int,
                      none_good: Callable[[], Exception]) -> Iterator[Any]:
    """decode(q) for q in first..end-1, in order, each decoded once; a bad slot (None) gives the
    next good slot's item instead, cyclically: the next good one after it, else the first good
    one. Slots are decoded ahead only as far as a bad one needs; no good slot at all raises
    `none_good()`."""
    ahead: dict[int, Any] = {}  # slots decoded before their turn
    first_good = None
    for q in range(first, end):
        item = ahead.pop(q) if q in ahead else decode(q)
        if item is not None:
            first_good = item if first_good is None else first_good
            yield item
            continue
        for g in range(q + 1, end):
            if g not in ahead:
                ahead[g] = decode(g)
            if ahead[g] is not None:
                yield ahead[g]
                break
        else:
            if first_good is None:
                raise none_good()
            yield first_good
