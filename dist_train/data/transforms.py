"""Image transforms of the fast data path: timm's train and eval steps on uint8 tensors.

Images are decoded to uint8 tensors (JPEGs by libjpeg-turbo through `simplejpeg`, everything
else and every JPEG it refuses by `torchvision.io.decode_image`) and cropped, resized
(torchvision's antialiased resize) and flipped in channels-last memory, the decoder's own
layout and the one torch's vectorised uint8 resize wants. Every random choice comes from a
per-sample `random.Random(seed)`, so a sample's augmentation depends on its seed alone (an
epoch is reproducible and resumable) and never moves a global RNG.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.transforms import str_to_pil_interp
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dist_train.errors import UserError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
JPEG_MAGIC = b"\xff\xd8\xff"
_TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")  # JPEGs `decode_rgb` gives to simplejpeg
# the kernels `F.interpolate(..., antialias=True)` calls, which take an `out=` tensor
_JITTERS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
_AA_RESIZE = {InterpolationMode.BILINEAR: torch._C._nn._upsample_bilinear2d_aa,
              InterpolationMode.BICUBIC: torch._C._nn._upsample_bicubic2d_aa}


@dataclass
class AugmentConfig:
    """Augmentation options with timm train.py's names and meaning."""

    img_size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop; faces must stay in the crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.0  # brightness, contrast and saturation factors drawn from [1 - cj, 1 + cj]
    aa: str | None = None  # timm auto-augment string, e.g. 'rand-m9-mstd0.5-inc1'
    crop_pct: float = 0.875  # eval (and train_crop="center"): resize to img_size/crop_pct, center crop
    train_crop: str = "random"  # "random" (RandomResizedCrop) or "center" (face-centred data)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN  # auto-augment fill colour, as in timm


def check_augment(aug: AugmentConfig) -> None:
    if aug.img_size <= 0:
        raise UserError(f"image size {aug.img_size}: expected a positive integer")
    lo, hi = aug.scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"scale {aug.scale}: expected 0 < MIN <= MAX <= 1")
    if not 0 < aug.ratio[0] <= aug.ratio[1]:
        raise UserError(f"ratio {aug.ratio}: expected 0 < MIN <= MAX")
    for name in ("hflip", "vflip"):
        if not 0 <= getattr(aug, name) <= 1:
            raise UserError(f"{name} {getattr(aug, name)}: expected a probability in [0, 1]")
    if not 0 <= aug.color_jitter <= 1:
        raise UserError(f"color jitter {aug.color_jitter}: expected a factor in [0, 1]")
    if aug.color_jitter and aug.aa:
        raise UserError(f"--color-jitter {aug.color_jitter} with --aa {aug.aa}: timm applies one or the other "
                        "(its auto-augment policies vary colour themselves); pass one of them")
    if not 0 < aug.crop_pct <= 1:
        raise UserError(f"crop pct {aug.crop_pct}: expected 0 < crop_pct <= 1")
    if aug.train_crop not in ("random", "center"):
        raise UserError(f"train crop {aug.train_crop!r}: expected 'random' or 'center'")
    if aug.interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation {aug.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")


def _auto_augment(aug: AugmentConfig) -> Callable:
    """timm's auto-augment transform for `aug.aa`, with the hparams timm's transforms_factory uses."""
    hparams: dict[str, Any] = dict(
        translate_const=int(aug.img_size * 0.45),
        img_mean=tuple(min(255, round(255 * x)) for x in aug.mean),
        interpolation=str_to_pil_interp(aug.interpolation),
    )
    try:
        if aug.aa.startswith("rand"):
            return rand_augment_transform(aug.aa, hparams)
        if aug.aa.startswith("augmix"):
            return augment_and_mix_transform(aug.aa, dict(hparams, translate_pct=0.3))
        return auto_augment_transform(aug.aa, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise UserError(
            f"auto-augment {aug.aa!r}: not a timm policy string ({e!r}); e.g. 'rand-m9-mstd0.5-inc1', "
            "'augmix-m5-w4-d2', 'original'"
        ) from None


def crop_params(
    rng: random.Random, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's `RandomResizedCrop.get_params`
    with draws from a per-sample `random.Random` (~2 us) instead of torch's global RNG (~30 us
    of scalar tensor ops plus saving and restoring the generator's state)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop closest to the ratio range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Transform:
    """uint8 [3, H, W] -> uint8 [3, S, S]: timm's train steps (random resized crop, flip,
    auto-augment) or eval steps (resize to S / crop_pct, center crop), with torchvision's resize.

    Why not a `transforms.v2.Compose`: the decoder's output is HWC in memory, and torch's
    vectorised uint8 antialiased resize wants exactly that (channels-last); v2 reads the
    cropped view as CHW and resizes at half the speed. Here the crop is copied once into
    channels-last memory and resized there, and crop/flip draws come from `random.Random(seed)`,
    so a sample's augmentation depends on its seed alone, never on a global RNG.
    """

    def __init__(self, aug: AugmentConfig, train: bool):
        check_augment(aug)
        self.aug = aug
        self.random_crop = train and aug.train_crop == "random"
        self.hflip = aug.hflip if train else 0.0
        self.vflip = aug.vflip if train else 0.0
        self.color_jitter = aug.color_jitter if train else 0.0
        self.interpolation = InterpolationMode(aug.interpolation)
        # torch's nearest-neighbour uint8 resize is the one mode faster on CHW memory
        self.memory_format = torch.contiguous_format if aug.interpolation == "nearest" else torch.channels_last
        # timm's auto-augment works on PIL images and draws from `random` and `np.random`.
        self.auto_augment = _auto_augment(aug) if train and aug.aa else None
        self.draws = (self.random_crop or self.hflip > 0 or self.vflip > 0 or self.color_jitter > 0
                      or self.auto_augment is not None)
        # the memory layout of a batch to write results into (`batches.new_batch`): channels
        # innermost except for nearest-neighbour results (auto-augment's come back from PIL as HWC)
        self.channels_last = self.memory_format == torch.channels_last or self.auto_augment is not None
        # the random crop's resize writes into `out` itself (no result tensor, no copy)
        self._resize_out = None if self.auto_augment is not None else _AA_RESIZE.get(self.interpolation)

    def __call__(self, img: torch.Tensor, seed: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """`seed` fixes the random choices (None: fresh entropy); the result is channels-last
        in memory except with nearest-neighbour interpolation. With `out` (a [C, S, S] or
        [1, C, S, S] uint8 view, e.g. a batch's slot) the result is written there and `out`
        returned: the same pixels, without the intermediate image where the resize allows it."""
        # No generator for the deterministic eval steps: seeding one from OS entropy costs ~11 us.
        rng = random.Random(seed) if self.draws else None
        size = self.aug.img_size
        if self.random_crop:
            top, left, h, w = crop_params(rng, img.shape[-2], img.shape[-1], self.aug.scale, self.aug.ratio)
            crop = img[None, :, top : top + h, left : left + w]
            # Flip the crop, not the result: the same pixels with bilinear/bicubic (mirror-symmetric
            # kernels; tested against v2's order). Copied first, then flipped: torch flips a dense
            # channels-last image in ~48 us (220x200), the strided view of the decoded one in ~100.
            crop = crop.contiguous(memory_format=self.memory_format)
            if self.hflip > 0 and rng.random() < self.hflip:
                crop = crop.flip(-1)
            if self.vflip > 0 and rng.random() < self.vflip:
                crop = crop.flip(-2)
            if out is not None and self._resize_out is not None:
                target = out if out.dim() == 4 else out[None]
                self._resize_out(crop, (size, size), False, None, None, out=target)
                if self.color_jitter > 0:
                    target.copy_(self._jitter(target, rng))
                return out
            img = self._resize(crop, size)[0]
        else:
            short = math.floor(size / self.aug.crop_pct)
            img = img[None].contiguous(memory_format=self.memory_format)
            img = TF.center_crop(TF.resize(img, [short], interpolation=self.interpolation, antialias=True), [size])[0]
            if self.hflip > 0 and rng.random() < self.hflip:
                img = TF.horizontal_flip(img)
            if self.vflip > 0 and rng.random() < self.vflip:
                img = TF.vertical_flip(img)
        if self.color_jitter > 0:  # in place: the result keeps its memory layout
            img = img.copy_(self._jitter(img, rng))
        if self.auto_augment is not None:
            pil = TF.to_pil_image(img)
            img = TF.pil_to_tensor(seeded_call(self.auto_augment, pil, rng.getrandbits(63)))
        if out is not None:
            return out.copy_(img)
        return img

    def _jitter(self, img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """torchvision's ColorJitter(cj, cj, cj) (timm's --color-jitter: brightness, contrast and
        saturation, in a random order), its factors drawn from the sample's `rng`. On one float
        CHW copy, rounded once: 0.3 ms a 224-px image against 0.5-0.7 for v2's uint8 steps."""
        cj = self.color_jitter
        factors = [rng.uniform(max(0.0, 1.0 - cj), 1.0 + cj) for _ in range(3)]
        x = img.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
        for i in rng.sample(range(3), 3):
            x = _JITTERS[i](x, factors[i])
        return x.mul_(255).round_().to(torch.uint8)

    def _resize(self, img: torch.Tensor, size: int) -> torch.Tensor:
        """[1, C, h, w] -> [1, C, size, size], antialiased. Bilinear and bicubic go to torch's
        uint8 kernel directly: the pixels `TF.resize` gives (tested), without its ~15 us of checks
        and reshapes per image."""
        if self.interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
            return F.interpolate(img, size=(size, size), mode=self.interpolation.value, antialias=True,
                                 align_corners=False)
        return TF.resize(img, [size, size], interpolation=self.interpolation, antialias=True)


def seeded_call(fn: Callable, arg: Any, seed: int) -> Any:
    """fn(arg) with `random` and `np.random` seeded by `seed`, restoring them afterwards so the
    caller's streams never move (resume needs that with workers=0, where this runs in the
    training process)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return fn(arg)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def decode_rgb(data: bytes | torch.Tensor) -> torch.Tensor:
    """JPEG/PNG/WebP bytes -> uint8 [3, H, W] (HWC in memory, as the decoder writes it).

    JPEGs go to libjpeg-turbo's TurboJPEG interface (`simplejpeg`), which decodes a whole
    image per call: 0.36-0.43 ms against torchvision's 0.41-0.47 for a 256x341 photo (one row
    per libjpeg call there), with the same library and settings (accurate DCT, smooth chroma
    upsampling), so the same pixels (tested). CMYK/YCCK JPEGs (torchvision converts them by
    its own formula) and any JPEG it refuses, even for a warning (12-bit, damaged data), go to
    torchvision's decoder, which decides as it always did.
    16-bit PNGs decode to uint16 and are scaled to 8 bits here: copied into a uint8 batch as
    they are, their values would wrap around."""
    raw = data.numpy() if isinstance(data, torch.Tensor) else data
    if bytes(raw[:3]) == JPEG_MAGIC:
        try:
            if simplejpeg.decode_jpeg_header(raw)[2] in _TURBO_COLORSPACES:
                return torch.from_numpy(simplejpeg.decode_jpeg(raw, colorspace="RGB", strict=True)).permute(2, 0, 1)
        except ValueError:
            pass
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = decode_image(data, mode=ImageReadMode.RGB)
    return img if img.dtype == torch.uint8 else TF.to_dtype(img, torch.uint8, scale=True)
