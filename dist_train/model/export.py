"""A trained model out of the trainer and back: `best/` in timm's own hub format.

`best/` loads with `timm.create_model('local-dir:RUN/best', pretrained=True)` and no dist_train
code. A model that is not a plain timm classifier exports the equivalent one: it provides
`to_single()` (a timm model with the same softmax) and names its head in `head_name`, which
config.json records under "dist_train".
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import safetensors.torch
import timm
import torch
from timm.models import split_model_name_tag

from dist_train.errors import UserError, atomic_write_json, follow_umask, replace_dir, temp_dir
from dist_train.trust.runs import read_metrics, read_model_config
from dist_train.trust.weights import load_safetensors

from .build import check_model_name, data_config, describe_load_error, takes_img_size

# pretrained_cfg keys about the source weights (location, test-time size, labels); an export
# states its own.
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "tag",
                "test_input_size", "test_crop_pct", "label_offset", "label_names", "label_descriptions")


def _export_config(model: torch.nn.Module, *, model_name: str, num_classes: int, label_names: Sequence[str],
                   img_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float], head: str) -> dict:
    """config.json in timm's hub format (what `timm.create_model('local-dir:...')` reads)."""
    arch = split_model_name_tag(model_name)[0]
    pcfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _SOURCE_KEYS and v is not None}
    pcfg.update(architecture=arch, num_classes=num_classes, input_size=[3, img_size, img_size],
                mean=list(mean), std=list(std), crop_pct=float(crop_pct), custom_load=False)
    pcfg.setdefault("interpolation", "bicubic")
    pcfg.pop("pool_size", None)  # valid only for the source resolution
    model_args = {"img_size": img_size} if takes_img_size(arch) else {}
    return {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": int(model.num_features),
        "model_args": model_args,
        "label_names": list(label_names),
        "pretrained_cfg": pcfg,
        "dist_train": {"head": head, "model_name": model_name},
    }


def save_for_timm(model: torch.nn.Module, out_dir: str | Path, *, model_name: str, num_classes: int,
                  label_names: Sequence[str], img_size: int | None, crop_pct: float, mean: Sequence[float],
                  std: Sequence[float], extra: dict | None = None) -> None:
    """Write model.safetensors + config.json (timm hub format) + metrics.json, atomically as a folder.

    A model with `to_single()` is exported as that plain timm classifier (see module doc).
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: export the module it wraps
    head = getattr(model, "head_name", "single")
    plain = model.to_single() if hasattr(model, "to_single") else model
    if len(label_names) != num_classes or plain.num_classes != num_classes:
        raise ValueError(f"export: {len(label_names)} label names, model has {plain.num_classes} classes, "
                         f"expected {num_classes}")
    if img_size is None:
        img_size = int(data_config(plain)["input_size"][-1])
    config = _export_config(plain, model_name=model_name, num_classes=num_classes, label_names=label_names,
                            img_size=img_size, crop_pct=crop_pct, mean=mean, std=std, head=head)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, out_dir.name)
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in plain.state_dict().items()}
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        follow_umask(tmp)
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "metrics.json", extra or {})
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load a `best/`-style folder for prediction: (model in eval mode, info).

    info: architecture, num_classes, label_names, input_size, mean, std, crop_pct,
    interpolation, crop_mode, head, metrics (metrics.json, {} when absent). A model exported
    through `to_single()` comes back as that single classifier (same softmax).
    """
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(f"{path}: expected a trained model folder with config.json and model.safetensors")
    cfg = read_model_config(cfg_file)
    arch, num_classes, pcfg = cfg["architecture"], cfg["num_classes"], cfg["pretrained_cfg"]
    check_model_name(arch)
    model_args = cfg.get("model_args", {})
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    except Exception as e:  # the arguments come from a file: whatever timm makes of them is that file's fault
        first = " ".join(str(e).split())[:200]
        raise UserError(f"{cfg_file}: model_args {model_args} do not build {arch} ({type(e).__name__}: {first})") \
            from None
    try:
        model.load_state_dict(load_safetensors(weights), strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not fit {arch}: {describe_load_error(e)}") from None
    model.pretrained_cfg = {**model.pretrained_cfg, **pcfg}
    model.default_cfg = model.pretrained_cfg
    metrics_file = path / "metrics.json"
    info = {
        "architecture": arch,
        "num_classes": num_classes,
        "label_names": list(cfg.get("label_names") or pcfg.get("label_names") or range(num_classes)),
        "input_size": tuple(pcfg["input_size"]),
        "mean": tuple(pcfg["mean"]),
        "std": tuple(pcfg["std"]),
        "crop_pct": float(pcfg["crop_pct"]),
        "interpolation": pcfg.get("interpolation", "bicubic"),
        "crop_mode": pcfg.get("crop_mode", "center"),
        "head": cfg.get("dist_train", {}).get("head", "single"),
        "metrics": read_metrics(metrics_file) if metrics_file.is_file() else {},
    }
    return model.eval(), info
