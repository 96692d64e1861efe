"""Build any timm backbone and load local weights.

Everything here goes through timm (`create_model`, its pretrained loader and checkpoint filters,
its data config) so a model trained by dist_train is an ordinary timm model. Tasks that need
another head build it on top of `create_model(..., num_classes=0)` (a headless backbone).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg, load_state_dict, split_model_name_tag

from dist_train.errors import UserError
from dist_train.trust.weights import check_safetensors

from .sizes import check_img_size
from .stages import classifier_names

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


# ----------------------------------------------------------------------------- building
def check_model_name(name: str) -> str:
    """The architecture of a timm model name (tag stripped); UserError with close matches if unknown."""
    base, _ = split_model_name_tag(name)
    if ":" in name or not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown timm model '{name}'{hint} (search the names with "
                        f"python -c \"import timm; print(timm.list_models('*convnext*'))\")")
    return base


def takes_img_size(name: str) -> bool:
    """ViT-style models fix their input size at build time and take `img_size` (timm's rule)."""
    cfg = get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def resolve_weights_file(path: str | Path) -> Path:
    """A weights file, or a folder holding model.safetensors / pytorch_model.bin."""
    p = Path(path)
    if p.is_dir():
        for fname in WEIGHT_FILES:
            if (p / fname).is_file():
                return p / fname
        raise UserError(f"--pretrained-path {p}: folder holds none of {', '.join(WEIGHT_FILES)}")
    if not p.is_file():
        raise UserError(f"--pretrained-path {p}: no such file or folder")
    return p


def _timm(name: str, **kwargs: Any) -> torch.nn.Module:
    """timm.create_model; an option the architecture does not take (e.g. --drop-path) is a UserError."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"model {name} does not take that option ({e}); drop it (--drop / --drop-path / "
                        f"--img-size)") from None


def describe_load_error(err: Exception) -> str:
    """torch's multi-line load_state_dict error -> one line naming a few keys of each kind."""
    text = str(err)
    parts = []
    for kind in ("Missing key(s)", "Unexpected key(s)"):
        m = re.search(re.escape(kind) + r" in state_dict: (.*)", text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{kind.split()[0].lower()} {', '.join(keys[:3])}{more}")
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch.Size\((.+?)\) from "
                        r"checkpoint, the shape in current model is torch.Size\((.+?)\)", text)
    if shapes:
        more = f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""
        parts.append("shape mismatch " + ", ".join(f"{k} {a} vs model {b}" for k, a, b in shapes[:3]) + more)
    return "; ".join(parts) if parts else text.strip().splitlines()[0][:300]


def _classifier_classes(shapes: dict, name: str) -> int:
    """The class count of the classifier among a state dict's shapes (0: none, a headless file)."""
    cfg = get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    for c in (classifier,) if isinstance(classifier, str) else tuple(classifier or ()):
        shape = shapes.get(f"{c}.weight")
        if shape:
            return int(shape[0])
    return 0


def _file_classes(file: Path, name: str) -> int:
    """The classifier's class count in a weights file (a safetensors file: from its header only)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            return _classifier_classes({k: f.get_slice(k).get_shape() for k in f.keys()}, name)
    return _classifier_classes({k: tuple(v.shape) for k, v in load_state_dict(str(file), weights_only=True).items()},
                               name)


def describe_weights(name: str, num_classes: int, *, pretrained: bool, pretrained_path: str | None,
                     head: str = "single") -> str:
    """Where a model's weights come from, for the start summary: the file or the timm hub tag,
    and whether the classifier was replaced (its new weights random) or kept; or random init."""
    if pretrained_path:
        file = resolve_weights_file(pretrained_path)
        source, theirs = f"weights from {file}", _file_classes(file, name)
    elif pretrained:
        cfg = get_pretrained_cfg(name)
        tag = f"{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else name
        source, theirs = f"weights from the timm hub ({tag})", int(getattr(cfg, "num_classes", 0) or 0)
    else:
        return "randomly initialised (no --pretrained / --pretrained-path)"
    if head != "single":
        return f"{source}, backbone only; the {head} head is new (random init)"
    if theirs == num_classes:
        return f"{source}, classifier kept ({theirs} classes)"
    had = f"had {theirs} classes" if theirs else "had none"
    return f"{source}; classifier replaced: a new {num_classes}-class one, random init (the weights {had})"


def _size_hint(name: str, kwargs: dict, load: Callable[[dict], Any]) -> str:
    """Weights that do not load into a model built for --img-size (LeViT's attention biases, which
    timm cannot resample): if they load at the model's own size, say so and what to pass."""
    if "img_size" not in kwargs:
        return ""
    try:
        load({k: v for k, v in kwargs.items() if k != "img_size"})
    except Exception:
        return ""
    cfg = get_pretrained_cfg(split_model_name_tag(name)[0])
    default = cfg.input_size[-1] if cfg is not None else "its default size"
    return (f"; they fit {name} built for its own {default} px input: timm cannot resize them to --img-size "
            f"{kwargs['img_size']}, pass --img-size {default}")


def _load_local(name: str, num_classes: int, file: Path, kwargs: dict) -> torch.nn.Module:
    """Build `name` with weights from `file` through timm's loader (so its checkpoint filters,
    e.g. ViT position-embedding resampling, apply), strictly: every non-classifier key must fit.

    The model is first built with the checkpoint's own class count (0 for a headless file) so
    the load is strict, then the classifier is re-initialised if the class count differs.
    """
    if file.suffix == ".safetensors":
        check_safetensors(file)  # header, dtypes, shapes and offsets against the size before mapping
    try:
        sd = load_state_dict(str(file), weights_only=True)  # never unpickle code from a weights file
    except Exception as e:
        raise UserError(f"--pretrained-path {file}: cannot read weights ({type(e).__name__}: {e})") from None
    ckpt_classes = _classifier_classes({k: tuple(v.shape) for k, v in sd.items()}, name)
    del sd
    def load(kw: dict) -> torch.nn.Module:
        return _timm(name, pretrained=True, num_classes=ckpt_classes,
                     pretrained_cfg_overlay=dict(file=str(file), num_classes=ckpt_classes), **kw)

    try:
        model = load(kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--pretrained-path {file}: weights do not fit {name}: {describe_load_error(e)}"
                        f"{_size_hint(name, kwargs, load)}") from None
    if ckpt_classes != num_classes:
        _reset_classifier(model, num_classes)
    return model


def _reset_classifier(model: torch.nn.Module, num_classes: int) -> None:
    """timm's `reset_classifier`, after which what it re-made beside the classifier (EfficientViT-MSRA
    rebuilds its head's BatchNorm too) gets its loaded weights back where name and shape still fit:
    only `get_classifier()` is new, as with timm's hub weights, and `--unfreeze head` trains all that
    is new."""
    before = model.state_dict()
    model.reset_classifier(num_classes)
    clf = classifier_names(model)
    after = model.state_dict()
    keep = {k: v for k, v in before.items()
            if k in after and k not in clf and after[k].data_ptr() != v.data_ptr() and after[k].shape == v.shape}
    if keep:
        model.load_state_dict(keep, strict=False)


def create_model(name: str, num_classes: int, *, pretrained: bool = False, pretrained_path: str | None = None,
                 img_size: int | None = None, drop_rate: float = 0.0, drop_path_rate: float | None = None
                 ) -> torch.nn.Module:
    """A timm model with `num_classes` outputs (0: headless, pooled features out).

    `img_size` is passed to models that fix their input size (ViT-style) and recorded in the
    model's pretrained_cfg for all, so data config and export describe the size trained on; a size
    the model cannot take is a UserError naming sizes it can (`sizes.check_img_size`).
    """
    base = check_model_name(name)
    if pretrained and pretrained_path:
        raise UserError("give either --pretrained or --pretrained-path, not both")
    kwargs: dict[str, Any] = {"drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None and takes_img_size(base):
        kwargs["img_size"] = img_size
    if pretrained_path:
        model = _load_local(name, num_classes, resolve_weights_file(pretrained_path), kwargs)
    elif pretrained:
        try:
            model = _timm(name, pretrained=True, num_classes=num_classes, **kwargs)
        except UserError:
            raise
        except Exception as e:
            if hint := _size_hint(name, kwargs, lambda kw: _timm(name, pretrained=True, num_classes=num_classes, **kw)):
                raise UserError(f"--pretrained: timm's weights do not fit {name} at --img-size {img_size}: "
                                f"{describe_load_error(e)}{hint}") from None
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"could not load pretrained weights for {name} ({type(e).__name__}: {first}); fetch "
                            f"them on a machine with internet and pass --pretrained-path FILE") from None
    else:
        model = _timm(name, pretrained=False, num_classes=num_classes, **kwargs)
    if img_size is not None:
        check_img_size(model, name, img_size, num_classes=num_classes, takes_size="img_size" in kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
        model.default_cfg = model.pretrained_cfg
    return model


def data_config(model: torch.nn.Module) -> dict:
    """input_size, mean, std, crop_pct, interpolation (and crop_mode) from the model's pretrained_cfg."""
    return dict(resolve_model_data_config(model))


