"""Device-side batch preparation, in one place (timm's PrefetchLoader): the move to the device,
decoding on the GPU (`--gpu-decode`), normalisation to float in the model's memory layout, and
the batch augmentations that run there (Mixup/CutMix, RandomErasing).

With `gpu_decode` the workers only read: they ship each batch's encoded JPEG/PNG bytes (one
flat uint8 tensor, so one shared-memory segment per batch) and the loader decodes them on the
device in one `torchvision.io.decode_jpeg(list, device=...)` call, then applies the same
crop/flip there with the same per-sample seeds, so a CPU run of that path gives exactly the
normal path's batches. It is for hosts whose cores cannot decode as fast as the GPU trains.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dist_train.errors import UserError

from .transforms import JPEG_MAGIC, AugmentConfig, Transform, decode_rgb


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One image decoded on the CPU and moved to `device`; None if it does not decode."""
    try:
        img = decode_rgb(data)
    except Exception:  # torchvision raises RuntimeError or ValueError for bad bytes
        return None
    return img.to(device, non_blocking=True)


def decode_on_device(
    encoded: Sequence[torch.Tensor], transform: Transform, device: torch.device, seeds: Sequence[int] | None
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
    check_gpu_augment(aug)
    if seeds is not None and len(seeds) != len(encoded):
        raise ValueError(f"{len(seeds)} seeds for {len(encoded)} images")
    seed_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds
    return decode_on_device(encoded, Transform(aug, train), torch.device(device), seed_list)


def check_gpu_augment(aug: AugmentConfig) -> None:
    if aug.aa:
        raise UserError(
            f"--gpu-decode cannot apply auto-augment {aug.aa!r} (timm's policies run on PIL images in the "
            "loader workers): drop --aa or --gpu-decode"
        )


def check_gpu_decode_device(gpu_decode: bool) -> None:
    """Training with --gpu-decode on a machine without CUDA is refused (one line): the decode would
    run in the training process on the CPU, slower than the loader workers' default. The
    benchmarks and the library run that path on the CPU on purpose (tests, launch/gpu_check.sh)."""
    if gpu_decode and not torch.cuda.is_available():
        raise UserError("--gpu-decode: no CUDA GPU here (it decodes JPEGs on the GPU); drop it: without it the "
                        "loader workers decode on the CPU")


def decode_device(gpu_decode: bool, device: torch.device | str | None) -> torch.device | None:
    """Where gpu_decode decodes: `device`, else cuda when there is one, else the CPU; None
    without gpu_decode (so callers may always pass their device)."""
    if not gpu_decode:
        return None
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))



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


class BatchPrep:
    """Loader batch -> model input, on the device: the one place that moves, normalises and
    augments batches (timm's PrefetchLoader), for training and for inference alike.

    `mixup` (timm Mixup: (x, y) -> (x, soft y)) and `erase` (timm RandomErasing: x -> x) run on
    training batches only.
    """

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float], channels_last: bool = False,
                 mixup: Callable | None = None, erase: Callable | None = None) -> None:
        self.device, self.mean, self.std = device, tuple(mean), tuple(std)
        self.channels_last = channels_last
        self.mixup, self.erase = mixup, erase

    def images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Normalised float images in the model's layout (inference, and the first half of `train`)."""
        return normalize(images_uint8.to(self.device, non_blocking=True), self.mean, self.std, self.channels_last)

    def train(self, images_uint8: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) for a training step; targets become soft under Mixup/CutMix."""
        x = self.images(images_uint8)
        y = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        if self.erase is not None:
            x = self.erase(x)
        return x, y
