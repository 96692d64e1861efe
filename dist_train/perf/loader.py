"""The input pipeline's throughput: the real training loader, its decode-only limit, the
`--gpu-decode` path, and the usual starting point (PIL on the raw files) for comparison."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import transforms as T

from dist_train.data.batches import new_batch
from dist_train.data.loaders import build_train_loader
from dist_train.data.transforms import AugmentConfig, Transform, decode_rgb
from dist_train.errors import UserError
from dist_train.shardset.format import image_bytes, load_info, shard_urls
from dist_train.system import usable_cpus
from dist_train.trust.media import tar_samples

from .timing import loader_warmup, rate


class DecodeOnly(IterableDataset):
    """The pipeline's limit: the same shard bytes read (by the loader's own tar reader) and decoded
    by the same workers, with no checks or collation. Yields the image count of every
    `batch_size` decoded. With `transform` (the loader's own `Transform`) each image is also
    cropped, flipped and resized into its slot of one batch buffer the worker reuses (made
    by `new_batch`, as the loader's are): the limit of any loader that hands over these pixels;
    nothing is sent to the main process."""

    def __init__(self, urls: Sequence[str], batch_size: int, transform: Transform | None = None):
        self.urls = list(urls)
        self.batch_size = batch_size
        self.transform = transform

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.urls[worker::workers] or self.urls
        out = None
        if self.transform is not None:
            size = self.transform.aug.img_size
            out, _ = new_batch(None, self.batch_size, 3, size, size, self.transform.channels_last)
        count = done = 0
        for url in itertools.cycle(mine):
            for sample in tar_samples([url], handler=lambda e: True):  # the loader's own tar reader
                img = decode_rgb(image_bytes(sample))
                if out is not None:
                    self.transform(img, seed=done, out=out[count])
                count += 1
                done += 1
                if count == self.batch_size:
                    yield count
                    count = 0


class SeedDataset(Dataset):
    """The user's starting point: every file of the raw mask layout opened with PIL, then
    Resize((S, S)), ToTensor, Normalize (ImageNet mean/std). Hidden names (._ AppleDouble,
    .ipynb_checkpoints, .DS_Store) are skipped."""

    def __init__(self, raw: str | Path, img_size: int):
        root = Path(raw)
        images = next((p for p in (root / "train" / "images", root / "images") if p.is_dir()), None)
        if images is None:
            raise UserError(f"--seed-baseline {raw}: no train/images/ or images/ folder (expected the raw mask layout)")
        self.paths = [
            f for person in sorted(images.iterdir()) if person.is_dir() and not person.name.startswith(".")
            for f in sorted(person.iterdir()) if f.is_file() and not f.name.startswith(".")
        ]
        if not self.paths:
            raise UserError(f"--seed-baseline {raw}: no image files in {images}/<person>/")
        self.transform = T.Compose([
            T.Resize((img_size, img_size)), T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), 0


def _forever(loader: Any, count: Callable[[Any], int], epochs: bool) -> Iterator[int]:
    """Batch sizes of `loader` over endless epochs (`set_epoch` each time if `epochs`)."""
    for epoch in itertools.count():
        if epochs:
            loader.set_epoch(epoch)
        for batch in loader:
            yield count(batch)


def bench_loader(a: argparse.Namespace) -> dict:
    info = load_info(a.data)
    workers = usable_cpus() if a.workers is None else a.workers
    cuda = torch.cuda.is_available()
    mode = "decode_only" if a.decode_only else "gpu_decode" if a.gpu_decode else "pipeline"
    result: dict[str, Any] = {"bench": "loader", "mode": mode, "data": a.data, "split": a.split,
                              "img_size": a.img_size, "workers": workers, "batch_size": a.batch_size,
                              "seconds": a.seconds, "device": "cuda" if cuda else "cpu"}
    device = torch.device("cuda" if cuda and a.gpu_decode else "cpu")
    seed_set = SeedDataset(a.seed_baseline, a.img_size) if a.seed_baseline else None
    if seed_set is not None and len(seed_set) < a.batch_size:
        raise UserError(f"--seed-baseline {a.seed_baseline}: fewer images than --batch-size {a.batch_size}")
    if a.decode_only:
        ds = DecodeOnly(shard_urls(a.data, info, a.split), a.batch_size)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        stream = _forever(loader, int, epochs=False)
    else:
        loader = build_train_loader(a.data, info, a.split, aug=AugmentConfig(img_size=a.img_size),
                                    batch_size=a.batch_size, workers=workers, world_size=1, rank=0, seed=0,
                                    pin_memory=cuda, gpu_decode=a.gpu_decode)
        stream = _forever(loader, lambda b: len(b[1]), epochs=True)
    result.update(rate(stream, a.seconds, loader_warmup(workers), device))
    del stream, loader  # stop the workers before the baseline's start
    if seed_set is not None:
        seed = DataLoader(seed_set, batch_size=a.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                          persistent_workers=workers > 0, pin_memory=cuda)
        base = rate(_forever(seed, lambda b: len(b[1]), epochs=False), a.seconds, loader_warmup(workers),
                    torch.device("cpu"))
        result["seed_images_per_s"] = base["images_per_s"]
        result["vs_seed"] = round(result["images_per_s"] / base["images_per_s"], 3)
        if "cpu_ms_per_image" in base:
            result["seed_cpu_ms_per_image"] = base["cpu_ms_per_image"]
            result["vs_seed_cpu"] = round(base["cpu_ms_per_image"] / max(result["cpu_ms_per_image"], 1e-9), 3)
    return result

