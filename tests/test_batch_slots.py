"""The training loader writes each transformed image straight into its batch slot (`Transform`'s
`out=`, `TrainReader._batch`): the same pixels as the transform's own result, and the same
batches (images, targets, keys, bad-sample replacements and counts) as collating a window's
decoded list did."""

from __future__ import annotations

import random

import pytest
import torch

from dist_train.data.batches import new_batch, pack
from dist_train.data.plan import mix_seed, with_replacements
from dist_train.data.transforms import AugmentConfig, Transform
from dist_train.errors import RunFailed
from test_data import LENGTHS7, _decoded, train_loader, write_set

CASES = {  # (AugmentConfig options, train)
    "bilinear": (dict(interpolation="bilinear", hflip=0.5), True),
    "bilinear-flip": (dict(interpolation="bilinear", hflip=1.0), True),
    "bicubic": (dict(interpolation="bicubic", hflip=0.5), True),
    "bicubic-noflip": (dict(interpolation="bicubic", hflip=0.0), True),
    "nearest": (dict(interpolation="nearest", hflip=0.5), True),
    "center-crop-flip": (dict(train_crop="center", hflip=1.0), True),
    "auto-augment": (dict(aa="rand-m9-mstd0.5-inc1"), True),
    "eval-bilinear": (dict(), False),
    "eval-nearest": (dict(interpolation="nearest"), False),
}


@pytest.mark.parametrize("case", CASES)
def test_transform_into_a_slot_gives_its_own_result(case):
    opts, train = CASES[case]
    transform = Transform(AugmentConfig(img_size=20, scale=(0.3, 1.0), **opts), train=train)
    for channels_last in (True, False):
        batch, _ = new_batch(None, 3, 3, 20, 20, channels_last)
        batch.fill_(7)
        for seed in range(12):
            img = _decoded(37 + seed % 5, 51 - seed % 7, seed)
            ref = transform(img, seed)
            j = seed % 3
            slot = batch[j:j + 1] if seed % 2 else batch[j]  # [1, C, S, S] or [C, S, S]
            assert transform(img, seed, out=slot) is slot
            assert torch.equal(batch[j], ref), (case, channels_last, seed)
        batch.fill_(7)
        transform(_decoded(40, 30, 0), 0, out=batch[1:2])
        assert (batch[0] == 7).all() and (batch[2] == 7).all()  # nothing written beside the slot


def _list_rule(bad: set[int], first: int, end: int) -> list[int]:
    """The list-based replacement: each bad slot takes the next good one after it, else the first."""
    good = [q for q in range(first, end) if q not in bad]
    return [q if q not in bad else next((g for g in good if g > q), good[0]) for q in range(first, end)]


def test_with_replacements_follows_the_list_rule_decoding_each_slot_once_and_lazily():
    rng = random.Random(0)
    for _ in range(300):
        end = rng.randint(1, 12)
        first = rng.randint(0, end - 1)
        bad = {q for q in range(end) if rng.random() < 0.5}
        decoded: list[int] = []

        def decode(q: int) -> int | None:
            decoded.append(q)
            return None if q in bad else q

        slots = with_replacements(decode, first, end, lambda: RunFailed("none good"))
        if all(q in bad for q in range(first, end)):
            with pytest.raises(RunFailed):
                list(slots)
            continue
        for n, item in enumerate(slots):
            q = first + n
            assert item == _list_rule(bad, first, end)[n]
            # decoded ahead only up to the replacement a bad slot needs
            assert max(decoded) == (q if q not in bad else item if item > q else end - 1)
        assert sorted(decoded) == list(range(first, end))  # each slot once


def _list_batches(reader, epoch: int, skip: int) -> tuple[list[list[tuple]], int, int]:
    """The batches as the list-based reader made them (one reader: workers=0): each window's
    slots decoded and transformed (no `out`) into a list, bad slots replaced from it. Also the
    number of bad slots and of replacements from another batch or from before the slot."""
    plan, b = reader.plan(epoch), reader.batch_size
    pos, copy = plan.reader_positions(0, 0)
    reader._cursor = None
    batches, bad, far = [], 0, 0
    for a, end in plan.windows(0, 0):
        if end <= skip * b:
            continue
        first = max(0, skip * b - a)
        wpos, wcopy = pos[a:end], copy[a:end]
        raw = reader._read_window(plan, wpos)
        if reader.class_weights is not None:
            wpos, wcopy = reader._reweighted(raw, wpos, mix_seed(reader.seed, epoch, "sampler", 0, a, 1, 1, b))
        items = []
        for p, c in zip(wpos[first:].tolist(), wcopy[first:].tolist()):
            seed = mix_seed(reader.seed, epoch, p, c)
            item = reader._load(raw[p], seed) if p in raw else None
            items.append(None if item is None else (item[0], item[1], raw[p]["__key__"], seed))
        good = [q for q, item in enumerate(items) if item is not None]
        for q, item in enumerate(items):
            if item is None:
                g = next((g for g in good if g > q), good[0])
                items[q], bad, far = items[g], bad + 1, far + (g < q or g // b != q // b)
        batches += [items[i:i + b] for i in range(0, len(items), b)]
    return batches, bad, far


@pytest.mark.filterwarnings("ignore:skipping bad sample")
@pytest.mark.parametrize("weights, skip, encoded", [(None, 0, False), ([1.0, 3.0, 0.5], 0, False),
                                                    (None, 3, False), (None, 0, True)])
def test_reader_with_bad_samples_delivers_the_list_based_batches(tmp_path, weights, skip, encoded):
    corrupt = {k: b"not an image" for k in (1, 2, 3, 9, 14, 15, 16, 17, 22, 30, 31, 40, 45, 46, 47)}
    root = write_set(tmp_path / "s", {"train": LENGTHS7}, corrupt=corrupt)
    kw = dict(gpu_decode=True, device="cpu") if encoded else {}
    if weights is not None:
        kw["target_fn"] = None  # the stored classes 0..2, which the weights are for
    reader = train_loader(root, batch_size=4, workers=0, shuffle_buffer=12, class_weights=weights, **kw)._reader
    far = 0
    for epoch in range(3):
        expected, bad, n_far = _list_batches(reader, epoch, skip)
        far += n_far
        reader.bad.value = 0
        reader.set_plan(epoch, skip, None)
        got = list(reader)
        assert reader.bad.value == bad > 0  # each bad slot counted once
        assert len(got) == len(expected) == reader.plan(epoch).batches_per_rank - skip
        for batch, want in zip(got, expected):
            images, targets, keys, seeds = zip(*want)
            if encoded:
                flat, lengths, tgt, sds, ks = batch
                assert torch.equal(flat, pack(images)[0]) and sds.tolist() == list(seeds)
            else:
                flat, tgt, ks, _ = batch
                assert torch.equal(flat, torch.stack(images)) and flat.stride(1) == 1  # channels-last
            assert tgt.tolist() == list(targets) and ks == list(keys)
    assert far > 0  # replacements from a later batch or from earlier in the window were exercised
