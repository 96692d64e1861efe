"""WebDataset loaders: equal steps per rank, exact evaluation, determinism, resume, bad data."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import random
import shutil
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import dist_train.data.transforms as data
from dist_train.data.device import normalize
from dist_train.data.loaders import build_eval_loader, build_train_loader
from dist_train.data.readers import train_batches_per_epoch
from dist_train.data.transforms import AugmentConfig
from dist_train.errors import RunFailed, UserError
from dist_train.shardset.format import load_info, shard_urls, split_info

LENGTHS7 = [5, 9, 3, 12, 7, 4, 8]  # 48 samples in 7 uneven shards
AUG = AugmentConfig(img_size=16, crop_pct=0.875)


def _image_bytes(k: int) -> tuple[str, bytes]:
    """Sample k's image: 40x32 noise as JPEG, RGBA PNG, or grayscale JPEG (decode must give RGB)."""
    arr = np.random.default_rng(k).integers(0, 256, (40, 32, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if k % 5 == 1:
        img.convert("RGBA").save(buf, format="PNG")
        return "png", buf.getvalue()
    if k % 7 == 2:
        img = img.convert("L")
    img.save(buf, format="JPEG", quality=90)
    return "jpg", buf.getvalue()


def write_set(
    root: Path,
    splits: dict[str, list[int]],
    unlabeled: tuple[str, ...] = (),
    corrupt: dict[int, bytes] | None = None,
) -> Path:
    """A shard set as shards/README.md describes it; `corrupt` replaces sample k's image bytes."""
    root.mkdir(parents=True, exist_ok=True)
    info: dict = {"name": "t", "version": "0.1.0", "layout": "folder", "classes": ["c0", "c1", "c2"]}
    info["splits"], info["label_counts"] = {}, {}
    for split, lengths in splits.items():
        names, k = [], 0
        counts = {"0": 0, "1": 0, "2": 0}
        for s, n in enumerate(lengths):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(root / name)) as w:
                for _ in range(n):
                    ext, img = _image_bytes(k)
                    if corrupt and k in corrupt:
                        img = corrupt[k]
                    sample = {"__key__": f"{split}_{k:04d}", ext: img}
                    sample["json"] = json.dumps({"path": f"c{k % 3}/{k}.{ext}", "class_name": f"c{k % 3}", "idx": k})
                    if split not in unlabeled:
                        sample["cls"] = str(k % 3)
                        counts[str(k % 3)] += 1
                    w.write(sample)
                    k += 1
            names.append(name)
        info["splits"][split] = {"name": split, "num_samples": k, "filenames": names, "shard_lengths": lengths}
        if split not in unlabeled:
            info["label_counts"][split] = counts
    (root / "_info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_set(
        tmp_path_factory.mktemp("shards"),
        {"train": LENGTHS7, "validation": LENGTHS7, "one": [23], "test": [6, 5]},
        unlabeled=("test",),
    )


def meta_target(meta: dict, cls: int | None, field: str) -> int:
    return int(meta[field])


IDX = functools.partial(meta_target, field="idx")


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging the suite."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"loader did not finish in {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def train_loader(root: Path, split: str = "train", **kw):
    args = dict(aug=AUG, batch_size=4, workers=0, world_size=1, rank=0, seed=7, target_fn=IDX, shuffle_buffer=20)
    args.update(kw)
    return build_train_loader(str(root), load_info(str(root)), split, **args)


def eval_loader(root: Path, split: str = "validation", **kw):
    args = dict(aug=AUG, batch_size=4, workers=0, world_size=1, rank=0)
    args.update(kw)
    return build_eval_loader(str(root), load_info(str(root)), split, **args)


def epoch_batches(loader, epoch: int, skip: int = 0, done=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, targets) of an epoch (each batch's keys checked to match its samples)."""
    loader.set_epoch(epoch, skip_batches=skip, done=done)
    with time_limit(60):
        batches = list(loader)
    assert all(len(keys) == len(targets) and all(isinstance(k, str) for k in keys) for _, targets, keys in batches)
    return [(images, targets) for images, targets, _ in batches]


def test_train_batches_per_epoch_formula():
    # the split padded to whole global batches (batch x world); workers do not change it
    assert train_batches_per_epoch(48, 4, 1) == 12
    assert train_batches_per_epoch(48, 5, 1) == 10  # 48 -> 50
    assert train_batches_per_epoch(48, 4, 3) == 4  # global batch 12
    assert train_batches_per_epoch(10, 4, 2) == 2  # 10 -> 16


def test_train_quota_rounds_up_not_down():
    """Sizes where floor and ceil part: a reader's share is ceil(N / readers) samples, rounded
    up to whole batches (numbers worked out by hand)."""
    assert train_batches_per_epoch(47, 4, 1) == 12  # 47 -> 48 samples (floor: 11 batches)
    assert train_batches_per_epoch(10, 3, 2) == 2  # global batch 6: 10 -> 12 (floor: 1)
    assert train_batches_per_epoch(11, 2, 2) == 3  # global batch 4: 11 -> 12 (floor: 2)
    assert train_batches_per_epoch(9, 1, 2) == 5  # 9 -> 10 (floor: 4)
    assert train_batches_per_epoch(11, 5, 1) == 3  # 11 -> 15 (floor: 2)
    assert train_batches_per_epoch(13, 3, 1) == 5  # 13 -> 15 (floor: 4)


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11-sample splits: 3 uneven shards, and 4 shards of which no 2 hold more than 6."""
    return write_set(tmp_path_factory.mktemp("odd"), {"odd": [5, 4, 2], "even": [3, 3, 3, 2]})


@pytest.mark.parametrize(
    "split,world,workers,batch,per_rank",
    [
        ("odd", 1, 0, 4, 3),  # 1 reader: 11 -> 12 samples
        ("odd", 2, 2, 2, 3),  # global batch 4: 11 -> 12, 3 batches per rank (2 + 1 over its workers)
        ("odd", 3, 2, 1, 4),  # global batch 3: 11 -> 12
        ("even", 1, 2, 5, 3),  # 11 -> 15
        ("even", 2, 0, 5, 2),  # global batch 10: 11 -> 20
        ("even", 2, 2, 1, 6),  # global batch 2: 11 -> 12
        ("odd", 3, 3, 2, 2),  # 9 readers on 3 shards: global batch 6, 11 -> 12
    ],
)
def test_one_epoch_sees_every_sample_of_an_odd_sized_split(odd_shards, split, world, workers, batch, per_rank):
    """The quota is rounded up: within ONE epoch every sample is seen over all ranks and workers
    whatever the layout, and every rank runs the same literal step count."""
    seen: list[int] = []
    for rank in range(world):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer shards than readers
            loader = train_loader(odd_shards, split, batch_size=batch, workers=workers, world_size=world, rank=rank)
        assert len(loader) == per_rank
        batches = epoch_batches(loader, 0)
        assert len(batches) == per_rank
        for _, targets in batches:
            assert targets.shape == (batch,)
            seen += targets.tolist()
    assert len(seen) == world * per_rank * batch
    assert sorted(set(seen)) == list(range(11))


@pytest.mark.parametrize(
    "split,world,workers,batch",
    [
        ("train", 1, 0, 4),
        ("train", 2, 2, 3),
        ("train", 3, 0, 5),
        ("train", 3, 2, 2),  # 6 readers, 7 shards
        ("one", 2, 2, 4),  # 1 shard, 4 readers
        ("one", 3, 0, 3),  # 1 shard, 3 readers
    ],
)
def test_every_rank_yields_the_same_full_batches(shards, split, world, workers, batch):
    n = load_info(str(shards))["splits"][split]["num_samples"]
    expected = train_batches_per_epoch(n, batch, world)
    fewer_shards = split == "one"
    seen: list[int] = []
    for rank in range(world):
        ctx = pytest.warns(UserWarning, match="1 shards for") if fewer_shards and rank == 0 else contextlib.nullcontext()
        with ctx:
            loader = train_loader(shards, split, batch_size=batch, workers=workers, world_size=world, rank=rank)
        assert len(loader) == expected
        batches = epoch_batches(loader, 0)
        assert len(batches) == expected
        for images, targets in batches:
            assert images.shape == (batch, 3, 16, 16) and images.dtype == torch.uint8
            assert targets.shape == (batch,) and targets.dtype == torch.int64
            seen += targets.tolist()
    assert set(seen) == set(range(n))  # every sample within the epoch, whatever the shard count
    assert len(seen) - n < batch * world  # padding under one global batch


def test_fewer_shards_warning_only_on_rank_zero(shards):
    with pytest.warns(UserWarning, match="several readers read the same shards"):
        train_loader(shards, "one", world_size=2, workers=2, rank=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_loader(shards, "one", world_size=2, workers=2, rank=1)


@pytest.mark.parametrize("split", ["validation", "one"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_yields_every_sample_exactly_once(shards, split, workers, world):
    n = load_info(str(shards))["splits"][split]["num_samples"]
    keys: list[str] = []
    orders: list[int] = []
    for rank in range(world):
        loader = eval_loader(shards, split, batch_size=4, workers=workers, world_size=world, rank=rank, target_fn=IDX)
        with time_limit(60):
            batches = list(loader)
        assert len(batches) == len(loader)
        assert sum(len(b["key"]) for b in batches) == loader.num_samples
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 16, 16)
            assert b["target"].tolist() == b["order"].tolist()  # idx in json == position in split
            assert all(int(key.rsplit("_", 1)[1]) == o for key, o in zip(b["key"], b["order"].tolist()))
            keys += b["key"]
            orders += b["order"].tolist()
    assert len(keys) == n == len(set(keys))
    assert sorted(orders) == list(range(n))


def test_same_seed_and_epoch_give_the_same_batches(shards):
    a = epoch_batches(train_loader(shards, workers=2, seed=3), 1)
    b = epoch_batches(train_loader(shards, workers=2, seed=3), 1)
    assert len(a) == len(b) > 0
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    other_epoch = epoch_batches(train_loader(shards, workers=2, seed=3), 2)
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(a, other_epoch))
    other_seed = epoch_batches(train_loader(shards, workers=2, seed=4), 1)
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(a, other_seed))


def test_augmentation_leaves_global_rngs_alone(shards):
    """workers=0 runs augmentation in the training process: its RNG streams must not move."""
    aug = AugmentConfig(img_size=16, aa="rand-m9-mstd0.5-inc1")
    loader = train_loader(shards, aug=aug, workers=0)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    first = epoch_batches(loader, 0)
    after = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    # and the auto-augmented epoch is itself reproducible, whatever the global seeds are
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    again = epoch_batches(loader, 0)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, again))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_the_tail_of_a_full_epoch(shards, workers):
    loader = train_loader(shards, batch_size=3, workers=workers)  # 48 samples: 16 batches
    full = epoch_batches(loader, 5)
    assert len(full) == len(loader) >= 6
    for k in (1, 3, len(full)):
        resumed = epoch_batches(loader, 5, skip=k)  # same persistent workers: shared values
        assert len(resumed) == len(full) - k
        for (ia, ta), (ib, tb) in zip(full[k:], resumed):
            assert torch.equal(ta, tb) and torch.equal(ia, ib)
    # the next epoch after a resumed one is whole again
    assert len(epoch_batches(loader, 6)) == len(loader)


def test_skipped_batches_are_not_decoded(shards, monkeypatch):
    calls = []

    def counting_decode(*args, **kw):
        calls.append(1)
        return decode(*args, **kw)

    import dist_train.data.readers as readers

    decode = readers.decode_rgb
    monkeypatch.setattr(readers, "decode_rgb", counting_decode)
    loader = train_loader(shards, batch_size=4, workers=0)
    epoch_batches(loader, 0, skip=5)
    assert len(calls) == (len(loader) - 5) * 4


def test_target_fn_and_default_targets(shards):
    default = [b["target"] for b in eval_loader(shards)]
    assert torch.cat(default).tolist() == [k % 3 for k in range(48)]
    relabeled = functools.partial(meta_target, field="idx")
    (_, targets), *_ = epoch_batches(train_loader(shards, target_fn=relabeled), 0)
    assert set(targets.tolist()) <= set(range(48))
    plain = epoch_batches(train_loader(shards, target_fn=None), 0)
    assert set(torch.cat([t for _, t in plain]).tolist()) == {0, 1, 2}


def test_unlabeled_split_gives_minus_one_and_cannot_train(shards):
    batches = list(eval_loader(shards, "test", batch_size=4))
    assert torch.cat([b["target"] for b in batches]).tolist() == [-1] * 11
    assert sorted(k for b in batches for k in b["key"]) == [f"test_{k:04d}" for k in range(11)]
    with pytest.raises(UserError, match="unlabeled"):
        train_loader(shards, "test", target_fn=None)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = write_set(tmp_path / "s", {"train": LENGTHS7}, corrupt={10: b"not an image", 30: b"\xff\xd8\xff"})
    loader = train_loader(root, batch_size=4, workers=0)
    with pytest.warns(UserWarning, match="skipping bad sample: train_00(10|30)"):
        batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) == 12
    assert 10 not in torch.cat([t for _, t in batches]).tolist()
    assert loader.bad_samples >= 1
    loader.set_epoch(1)
    assert loader.bad_samples == 0  # per-epoch counter

    ev = eval_loader(root, "train", target_fn=IDX)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        keys = [k for b in ev for k in b["key"]]
    assert ev.bad_samples == 2
    assert sorted(keys) == [f"train_{k:04d}" for k in range(48) if k not in (10, 30)]


def test_eval_workers_started_early_read_ahead_the_first_pass(tmp_path):
    """`start` forks the workers and lets them read ahead; the next passes are whole, once each,
    with the bad samples counted per pass (not lost to the read-ahead, not doubled)."""
    root = write_set(tmp_path / "s", {"train": LENGTHS7}, corrupt={10: b"not an image", 30: b"\xff\xd8\xff"})
    ev = eval_loader(root, "train", target_fn=IDX, workers=2)
    ev.start()
    assert ev._loader._iterator is not None  # the workers run before the first pass
    want = [f"train_{k:04d}" for k in range(48) if k not in (10, 30)]
    for _ in range(2):
        with time_limit(60):  # (the warnings are the workers')
            keys = [k for b in ev for k in b["key"]]
        assert sorted(keys) == want and ev.bad_samples == 2


def test_corrupt_sample_counted_across_workers(tmp_path):
    root = write_set(tmp_path / "s", {"train": LENGTHS7}, corrupt={k: b"bad" for k in range(0, 48, 6)})
    loader = train_loader(root, batch_size=4, workers=2)
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader)
    assert loader.bad_samples >= 4  # counted in the workers, read in the main process


def test_truncated_tar_is_skipped_and_the_step_count_holds(tmp_path):
    root = write_set(tmp_path / "s", {"train": LENGTHS7})
    tar = root / "train-000003.tar"  # 12 samples
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    loader = train_loader(root, batch_size=4, workers=0)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader)
    assert loader.bad_samples >= 1
    ev = eval_loader(root, "train")
    with pytest.warns(UserWarning):
        n = sum(len(b["key"]) for b in ev)
    assert 36 <= n < 48 and ev.bad_samples >= 1


def test_all_bad_samples_raise_instead_of_hanging(tmp_path):
    root = write_set(tmp_path / "s", {"train": [6, 6]}, corrupt={k: b"bad" for k in range(12)})
    loader = train_loader(root, batch_size=2, workers=0)
    with pytest.warns(UserWarning), pytest.raises(RunFailed, match="bad samples in a row"):
        epoch_batches(loader, 0)


def test_load_info_errors(tmp_path, shards):
    with pytest.raises(UserError, match="no such folder.*dist_train.shard"):
        load_info(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no _info.json.*dist_train.shard"):
        load_info(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "_info.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON.*dist_train.shard"):
        load_info(str(bad))
    with pytest.raises(UserError, match="'nope' is not in the shard set.*one, test, train, validation"):
        split_info(load_info(str(shards)), "nope")
    info = load_info(str(shards))
    info["splits"]["train"] = dict(info["splits"]["train"], num_samples=47)
    with pytest.raises(UserError, match="inconsistent"):
        split_info(info, "train")


def test_shard_urls_local_and_remote(shards):
    info = load_info(str(shards))
    assert shard_urls(str(shards), info, "test") == [str(shards / "test-000000.tar"), str(shards / "test-000001.tar")]
    assert shard_urls("http://h:8/d/", info, "test")[1] == "http://h:8/d/test-000001.tar"
    assert shard_urls("s3://b/d", info, "test")[0] == "s3://b/d/test-000000.tar"
    assert shard_urls("pipe:aws s3 cp s3://b/d/{} -", info, "test")[0] == "pipe:aws s3 cp s3://b/d/test-000000.tar -"


def test_http_served_shards(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        info = load_info(url)
        with time_limit(60):
            keys = [k for b in build_eval_loader(url, info, "validation", aug=AUG, batch_size=8, workers=0,
                                                 world_size=1, rank=0) for k in b["key"]]
            train = build_train_loader(url, info, "train", aug=AUG, batch_size=8, workers=0, world_size=1,
                                       rank=0, seed=0)
            train.set_epoch(0)
            assert len(list(train)) == len(train) == 6
        assert sorted(keys) == [f"validation_{k:04d}" for k in range(48)]
        with pytest.raises(UserError, match="cannot read shard info"):
            load_info(url + "/nothing-here")
    finally:
        server.shutdown()
        server.server_close()


def test_augment_options(shards):
    center = AugmentConfig(img_size=24, train_crop="center", hflip=0.0, interpolation="bicubic")
    (images, _), *_ = epoch_batches(train_loader(shards, aug=center), 0)
    assert images.shape == (4, 3, 24, 24)
    for bad in (
        AugmentConfig(aa="bogus-policy"),
        AugmentConfig(img_size=0),
        AugmentConfig(scale=(0.9, 0.5)),
        AugmentConfig(train_crop="middle"),
        AugmentConfig(interpolation="cubic"),
    ):
        with pytest.raises(UserError):
            train_loader(shards, aug=bad)
    with pytest.raises(UserError, match="global batch"):
        train_loader(shards, batch_size=30, world_size=2)
    with pytest.raises(UserError, match="batch size"):
        eval_loader(shards, batch_size=0)


def test_shard_assignment_reports_shards_per_rank(shards):
    """Each rank reads a contiguous half of the epoch's shard order: the shards it overlaps."""
    loaders = [train_loader(shards, world_size=2, workers=2, rank=r) for r in range(2)]
    order = loaders[0].plan(0).shard_order
    lengths = np.array([LENGTHS7[s] for s in order])
    ends = np.cumsum(lengths)  # canonical end of each shard, in read order; rank 0 reads [0, 24)
    expected = [int((ends - lengths < 24).sum()), int((ends > 24).sum())]
    assert [ld.shards_per_rank for ld in loaders] == expected and 7 <= sum(expected) <= 8


def test_normalize_matches_reference():
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    cl = normalize(x, mean, std, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, ref, atol=1e-5)
    assert x.dtype == torch.uint8  # input untouched


def test_copied_shard_set_gives_identical_batches(tmp_path, shards):
    """Batches depend on content and seed only, not on where the shards live."""
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    a = epoch_batches(train_loader(shards), 0)
    b = epoch_batches(train_loader(copy), 0)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def mask_target(meta: dict, cls: int | None, bins: tuple[int, int]) -> int:
    from dist_train.tasks.mask.labels import label_from_meta

    return label_from_meta(meta, bins)


def test_shards_from_the_shard_command(mask_shards):
    """The loaders read what `python -m dist_train.shard` writes, labels recomputable from json."""
    info = load_info(str(mask_shards))
    n_val = info["splits"]["validation"]["num_samples"]
    keys, same = [], []
    for rank in range(2):
        ev = build_eval_loader(str(mask_shards), info, "validation", aug=AUG, batch_size=8, workers=0,
                               world_size=2, rank=rank, target_fn=functools.partial(mask_target, bins=(30, 60)))
        plain = build_eval_loader(str(mask_shards), info, "validation", aug=AUG, batch_size=8, workers=0,
                                  world_size=2, rank=rank)
        for b, p in zip(ev, plain):
            keys += b["key"]
            same.append(torch.equal(b["target"], p["target"]))
    assert len(keys) == len(set(keys)) == n_val and all(same)
    loader = build_train_loader(str(mask_shards), info, "train", aug=AUG, batch_size=8, workers=2, world_size=1,
                                rank=0, seed=0, target_fn=functools.partial(mask_target, bins=(25, 58)))
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) and all(int(t.max()) < 18 for _, t in batches)


# ---------------------------------------------------------------------------------------------
# The fused transform against torchvision's own steps


def _decoded(h: int, w: int, seed: int) -> torch.Tensor:
    """A decoder-like uint8 [3, H, W] image: HWC in memory, as decode_image returns it."""
    hwc = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return hwc.permute(2, 0, 1)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_transform_equals_torchvision_crop_resize_flip(interpolation):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    aug = AugmentConfig(img_size=24, scale=(0.3, 1.0), hflip=0.5, interpolation=interpolation)
    transform = data.Transform(aug, train=True)
    flips = 0
    for seed in range(40):
        img = _decoded(37 + seed % 5, 51 - seed % 7, seed)
        rng = random.Random(seed)
        top, left, h, w = data.crop_params(rng, img.shape[1], img.shape[2], aug.scale, aug.ratio)
        flip = rng.random() < aug.hflip
        flips += flip
        chw = img.contiguous()  # torchvision's usual CHW input
        ref = TF.resize(TF.crop(chw, top, left, h, w), [24, 24], interpolation=InterpolationMode(interpolation),
                        antialias=True)
        ref = TF.horizontal_flip(ref) if flip else ref
        out = transform(img, seed)
        assert out.shape == (3, 24, 24) and torch.equal(out, ref), seed
        assert torch.equal(transform(img, seed), out)  # the seed alone decides
    assert 5 < flips < 35


def test_train_transform_vflip_and_color_jitter_follow_torchvision():
    """--vflip flips the crop's rows; --color-jitter is ColorJitter(cj, cj, cj): torchvision's
    brightness, contrast and saturation steps in a random order, factors from the sample's seed
    (rounded once, where v2's uint8 steps truncate after each: within a few levels)."""
    from torchvision.transforms.v2 import functional as TF

    aug = AugmentConfig(img_size=24, scale=(0.3, 1.0), hflip=0.5, vflip=0.5, color_jitter=0.4)
    transform = data.Transform(aug, train=True)
    steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    vflips, worst = 0, 0
    for seed in range(40):
        img = _decoded(37 + seed % 5, 51 - seed % 7, seed)
        rng = random.Random(seed)
        top, left, h, w = data.crop_params(rng, img.shape[1], img.shape[2], aug.scale, aug.ratio)
        hflip, vflip = rng.random() < 0.5, rng.random() < 0.5
        factors = [rng.uniform(0.6, 1.4) for _ in range(3)]
        ref = TF.resize(TF.crop(img.contiguous(), top, left, h, w), [24, 24], antialias=True)
        ref = TF.vertical_flip(ref) if vflip else ref
        ref = TF.horizontal_flip(ref) if hflip else ref
        for i in rng.sample(range(3), 3):
            ref = steps[i](ref, factors[i])
        out = transform(img, seed)
        worst = max(worst, int((out.int() - ref.int()).abs().max()))
        slot = torch.zeros(2, 3, 24, 24, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        view = slot[1]
        assert transform(img, seed, out=view) is view and torch.equal(slot[1], out), seed  # the loader's path
        vflips += vflip
    assert worst <= 3 and 5 < vflips < 35, (worst, vflips)
    plain = data.Transform(AugmentConfig(img_size=24, scale=(0.3, 1.0)), train=True)
    assert not torch.equal(plain(_decoded(40, 40, 0), 0), data.Transform(
        AugmentConfig(img_size=24, scale=(0.3, 1.0), color_jitter=0.4), train=True)(_decoded(40, 40, 0), 0))


def test_eval_transform_equals_torchvision_resize_center_crop():
    from torchvision.transforms import v2

    for interpolation in ("bilinear", "bicubic", "nearest"):
        aug = AugmentConfig(img_size=20, crop_pct=0.8, interpolation=interpolation)
        ref = v2.Compose([v2.Resize(25, interpolation=v2.InterpolationMode(interpolation), antialias=True),
                          v2.CenterCrop(20)])
        transform = data.Transform(aug, train=False)
        for seed, (h, w) in enumerate([(40, 30), (30, 41), (25, 25), (90, 26)]):
            img = _decoded(h, w, seed)
            assert torch.equal(transform(img), ref(img.contiguous())), (interpolation, h, w)


def test_crop_params_follow_scale_ratio_and_torchvision_fallback():
    from torchvision.transforms import RandomResizedCrop

    scale, ratio = (0.3, 0.9), (3 / 4, 4 / 3)
    for seed in range(300):
        top, left, h, w = data.crop_params(random.Random(seed), 60, 80, scale, ratio)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert scale[0] - 0.05 <= h * w / (60 * 80) <= scale[1] + 0.05
        assert ratio[0] - 0.05 <= w / h <= ratio[1] + 0.05
    # no draw fits a 10x1000 strip: the central crop at the nearest ratio, as torchvision does
    for shape in ((10, 1000), (1000, 10)):
        expected = RandomResizedCrop.get_params(torch.zeros(1, *shape), [0.5, 1.0], list(ratio))
        assert data.crop_params(random.Random(0), *shape, (0.5, 1.0), ratio) == tuple(expected)


def test_batches_are_channels_last_and_normalize_restores_the_layout(shards):
    (images, _), *_ = epoch_batches(train_loader(shards, workers=0), 0)
    assert images.is_contiguous(memory_format=torch.channels_last)  # no layout change in the loader
    ref = normalize(images.contiguous(), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    out = normalize(images, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert out.is_contiguous() and torch.equal(out, ref)
    assert normalize(images, (0.5,) * 3, (0.2,) * 3, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    """decode_image gives uint16 for 16-bit PNGs; copied into a uint8 batch they would wrap."""
    arr = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img = data.decode_rgb(buf.getvalue())
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    expected = torch.from_numpy((arr >> 8).astype(np.uint8))
    assert (img[0].int() - expected.int()).abs().max() <= 1 and torch.equal(img[0], img[2])
    out = data.Transform(AugmentConfig(img_size=16), train=True)(img, 0)
    assert out.dtype == torch.uint8 and out.float().mean() > 60  # a mid-grey ramp, not wrapped noise


def _jpegs() -> dict[str, bytes]:
    """JPEGs of the layouts a decoder meets: chroma subsamplings, progressive, grayscale, an
    RGB-colorspace file, odd sizes, qualities; CMYK and damaged ones (torchvision's to decode)."""
    rng = np.random.default_rng(0)
    out = {}

    def save(name: str, w: int, h: int, mode: str = "RGB", **kw) -> None:
        arr = (rng.integers(0, 64, (h, w, 3)) + np.linspace(0, 190, w)[None, :, None]).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format="JPEG", **kw)
        out[name] = buf.getvalue()

    for sub in (0, 1, 2):
        for q, progressive in ((20, False), (95, False), (90, True)):
            for w, h in ((1, 1), (17, 33), (70, 41)):
                save(f"sub{sub}-q{q}-prog{progressive}-{w}x{h}", w, h, subsampling=sub, quality=q,
                     progressive=progressive)
    save("gray", 33, 20, "L", quality=90)
    save("rgb-colorspace", 30, 24, keep_rgb=True, quality=90)
    save("cmyk", 30, 24, "CMYK", quality=90)
    good = out["sub2-q95-progFalse-70x41"]
    out["extraneous-bytes"] = good[:300] + b"\0\0" + good[300:]  # libjpeg warns, decodes
    return out


def test_decode_rgb_gives_torchvisions_pixels_and_uses_simplejpeg_where_it_can(monkeypatch):
    """JPEGs go to simplejpeg (a whole image per libjpeg-turbo call, faster than torchvision's
    row-by-row decode) with the same pixels; CMYK and warned-about files still go to torchvision."""
    import simplejpeg
    from torchvision.io import ImageReadMode, decode_image

    calls = []
    real = simplejpeg.decode_jpeg

    def spy(*a, **k):
        try:
            arr = real(*a, **k)
        except ValueError:
            calls.append("refused")
            raise
        calls.append("decoded")
        return arr

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    for name, jpeg in _jpegs().items():
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = decode_image(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
            got = data.decode_rgb(jpeg)
            got_t = data.decode_rgb(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
        assert got.dtype == torch.uint8 and torch.equal(got, ref) and torch.equal(got_t, ref), name
        assert got.stride() == ref.stride(), name  # HWC in memory, as the transform expects
        # CMYK is left to torchvision (its own conversion formula); the damaged file's header
        # already makes simplejpeg warn, so torchvision decodes it (with its warning) as before
        expected = [] if name in ("cmyk", "extraneous-bytes") else ["decoded"] * 2
        assert calls == expected, name
    calls.clear()
    with pytest.raises(RuntimeError):  # truncated: simplejpeg refuses it, torchvision raises as before
        jpeg = _jpegs()["sub2-q95-progFalse-70x41"]
        data.decode_rgb(jpeg[: len(jpeg) * 2 // 3])
    assert calls == ["refused"]
