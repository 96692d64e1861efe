"""Is `--img-size` one the model can take? Checked when the model is built, before anything is written.

A size a model cannot take fails only at its first forward pass, deep in a training step, with a
shape error from some layer (a ConvNeXt at 16 px: "Kernel size can't be greater than actual
input size"; a LeViT at 40 px: mismatched attention biases). A ViT-style model given a size that
is not a multiple of its patch size runs, but never sees the last rows and columns. Both are
refused here with one line naming sizes that work.

The forward is shape-only: the model's parameters and buffers are swapped for `meta` tensors
(`torch.func.functional_call`), so it costs no compute and no memory at any size. A failure there
is confirmed with one real forward of one image before the size is refused (an operator without
a meta kernel must not block a size that works). Candidate sizes are probed on models built on
the meta device.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import timm
import torch
from torch.func import functional_call

from dist_train.errors import UserError

_MAX_CANDIDATES = 8  # sizes above the one given that are tried


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def _forward_error(model: torch.nn.Module, size: int, *, meta: bool) -> str | None:
    """The error of an eval-mode forward of one size x size image (None: it ran)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if meta:
                state = {n: torch.empty_like(t, device="meta")
                         for n, t in [*model.named_parameters(), *model.named_buffers()]}
                functional_call(model, state, (torch.empty(1, 3, size, size, device="meta"),))
            else:
                device = next(iter(model.parameters()), torch.empty(0)).device
                model(torch.zeros(1, 3, size, size, device=device))
    except Exception as e:  # whatever the layers raise about a shape: the message is shown
        return _first_line(e)
    finally:
        model.train(training)  # also drops caches some models keep in eval mode (LeViT's attention biases)
    return None


def patch_size(model: torch.nn.Module) -> int | None:
    """The patch size of a timm ViT-style patch embedding that needs the image to be a whole number
    of patches (None: no such embedding, or one that pads the image itself)."""
    embed = getattr(model, "patch_embed", None)
    p = getattr(embed, "patch_size", None)
    if p is None or getattr(embed, "dynamic_img_pad", False):
        return None
    sizes = {int(v) for v in (p if isinstance(p, (tuple, list)) else (p,))}
    return max(sizes) if len(sizes) == 1 and max(sizes) > 1 else None


def _step(model: torch.nn.Module) -> int:
    """The multiple sizes are searched in: the patch size, else 16 (the stem stride of most timm
    models; their total strides, 32 or 64, are multiples of it)."""
    return patch_size(model) or 16


def _probe(model: torch.nn.Module, name: str, num_classes: int, takes_size: bool) -> Callable[[int], bool]:
    """size -> whether the model takes it. A model that fixes its input size at build time is built
    again for each size, on the meta device (no memory, no init compute)."""
    def works(size: int) -> bool:
        if not takes_size:
            return _forward_error(model, size, meta=True) is None
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=size)
        except Exception:
            return False
        return _forward_error(m, size, meta=True) is None
    return works


def _suggest(model: torch.nn.Module, name: str, size: int, num_classes: int, takes_size: bool) -> list[int]:
    """The nearest sizes the model takes below and above `size`, among multiples of its patch size
    or total stride (and its default size)."""
    step = _step(model)
    works = _probe(model, name, num_classes, takes_size)
    default = int(dict(model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[-1])
    below = [s for s in (size // step * step, default) if step <= s < size]
    above = [math.ceil(size / step) * step + k * step for k in range(_MAX_CANDIDATES)] + [default]
    lo = next((s for s in sorted(set(below), reverse=True) if works(s)), None)
    hi = next((s for s in sorted({s for s in above if s > size}) if works(s)), None)
    return [s for s in (lo, hi) if s is not None]


def check_img_size(model: torch.nn.Module, name: str, size: int, *, num_classes: int, takes_size: bool) -> None:
    """UserError (one line, with sizes that work) if `model` cannot take size x size images, or would
    leave part of them unseen (not a whole number of patches)."""
    p = patch_size(model)
    if p and size % p:
        near = [s for s in ((size // p) * p, (size // p + 1) * p) if s >= p]
        raise UserError(f"--img-size {size}: {name} cuts the image into {p}x{p} patches and {size} is not a "
                        f"multiple of {p} (the last {size % p} rows and columns would never be seen); pass "
                        f"--img-size {' or '.join(map(str, near))}")
    err = _forward_error(model, size, meta=True)
    if err is None or (err := _forward_error(model, size, meta=False)) is None:
        return
    near = _suggest(model, name, size, num_classes, takes_size)
    if not near:  # not a matter of size: the model fails whatever it is given; training shows how
        return
    raise UserError(f"--img-size {size}: {name} cannot take {size}x{size} images ({err}); pass "
                    f"--img-size {' or '.join(map(str, near))}")
