"""Test-time augmentation: the `--tta` / `--val-tta` spec, its views, and their average.

A spec is `none` or a comma list of `hflip`, `five-crop` and `scales:S1/S2/...`. The geometric
views are listed, not multiplied: `five-crop` gives 5 views, `scales:0.875/1.0` gives 2, both
together 7; with neither, the plain image is the one view. `hflip` adds the mirror image of
every view, doubling them (`hflip,five-crop` is torchvision's TenCrop). Views are made on the
normalised device batch, so every caller (predict, evaluate, training's validation) gets the
same ones:

- five-crop: the batch enlarged to round(img_size / 0.875) (256 for 224), then torchvision's
  FiveCrop of img_size: the four corners and the centre, each 87.5% of the image's side;
- scales:S: the batch resized to round(S * img_size), then centre-cropped back to img_size
  (S > 1 zooms in) or padded to it with the mean colour, zero after normalisation, as timm's
  `crop_mode='border'` pads (S < 1 zooms out); the model always sees its own input size.

The views' softmax probabilities are averaged; the result is their log (log of the mean
probability), so code that takes a softmax or an argmax of "logits" keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from dist_train.errors import UserError

FIVE_CROP_FRACTION = 0.875  # each five-crop view covers this fraction of the side (timm's default crop_pct)
SPEC_HELP = "none, or a comma list of hflip, five-crop, scales:S1/S2/... (e.g. hflip,five-crop)"


@dataclass(frozen=True)
class TTA:
    """A parsed spec; TTA() is no test-time augmentation (one plain view)."""

    hflip: bool = False
    five_crop: bool = False
    scales: tuple[float, ...] = ()

    @property
    def num_views(self) -> int:
        base = 5 * self.five_crop + len(self.scales)
        return max(base, 1) * (2 if self.hflip else 1)

    def views(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The views of a normalised (N, C, S, S) batch, one at a time (memory stays one view's)."""
        size = x.shape[-1]
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format  # the views keep the batch's (the model's) memory layout
        base: list[torch.Tensor] = []
        if self.five_crop:
            big = round(size / FIVE_CROP_FRACTION)
            base.extend(TF.five_crop(TF.resize(x, [big, big], antialias=True), [size, size]))
        base.extend(zoom(x, s) for s in self.scales)
        for view in base or [x]:
            view = view.contiguous(memory_format=layout)
            yield view
            if self.hflip:
                yield torch.flip(view, dims=[3])

    def predict(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, classes) float: the model's output for one view; for several, the log of the mean
        of their softmax probabilities (summed in log space, so nothing underflows to -inf)."""
        if self.num_views == 1:
            return model(next(self.views(x))).float()
        total = None
        for view in self.views(x):
            logp = F.log_softmax(model(view).float(), dim=1)
            total = logp if total is None else torch.logaddexp(total, logp)
        return total - math.log(self.num_views)


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The batch magnified by `scale` about its centre, at its own size (padding is 0: the mean colour)."""
    size = x.shape[-1]
    n = max(1, round(scale * size))
    if n == size:
        return x
    return TF.center_crop(TF.resize(x, [n, n], antialias=True), [size, size])


def parse_tta(spec: str, flag: str = "--tta") -> TTA:
    """`spec` as a TTA; anything else is one UserError line naming `flag` and what it expects."""
    items = [item.strip() for item in str(spec).split(",")]
    if items == ["none"]:
        return TTA()
    seen: set[str] = set()
    scales: tuple[float, ...] = ()
    for item in items:
        kind = "scales" if item.startswith("scales:") else item
        if kind not in ("hflip", "five-crop", "scales"):
            what = "none does not combine with views" if kind == "none" else f"unknown view {item!r}"
            raise UserError(f"{flag} {spec!r}: {what}; expected {SPEC_HELP}")
        if kind in seen:
            raise UserError(f"{flag} {spec!r}: {kind} given twice; expected {SPEC_HELP}")
        seen.add(kind)
        if kind == "scales":
            scales = _scales(item[len("scales:"):], spec, flag)
    return TTA(hflip="hflip" in seen, five_crop="five-crop" in seen, scales=scales)


def _scales(text: str, spec: str, flag: str) -> tuple[float, ...]:
    """`S1/S2/...`: distinct numbers in (0, 4] (a larger zoom only costs memory)."""
    try:
        scales = tuple(float(s) for s in text.split("/"))
    except ValueError:
        scales = ()
    if not scales or not all(math.isfinite(s) and 0 < s <= 4 for s in scales) or len(set(scales)) != len(scales):
        raise UserError(f"{flag} {spec!r}: scales {text!r}: expected distinct numbers in (0, 4] separated by '/', "
                        "e.g. scales:0.875/1.0/1.125")
    return scales
