"""A trained model as one deployable file (`python -m dist_train.export`), checked before it is written.

The exported graph takes what dist_train's evaluation gives the model: float32 (float16 with
`--half`) NCHW RGB images, already resized (shorter side to floor(size / crop_pct), antialiased,
with the metadata's interpolation), center-cropped to size x size and normalized,
(x / 255 - mean) / std. Normalization stays outside the graph, as in timm's own exports, so the
graph is exactly the trained network. It returns logits (N, classes); their softmax is the
class probabilities. A model that provides `to_single()` (a task's multi-head model) is
exported as that equivalent single classifier (the same softmax), as `best/` holds it. The
metadata says all of this.

Parity: the exported file is loaded back (onnxruntime on the CPU, `torch.jit.load`) and run on
real images of the run's shard set, read through the eval loader, against the PyTorch model in
fp32; over the tolerance nothing is written.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from dist_train import __version__
from dist_train.data.device import BatchPrep
from dist_train.data.loaders import build_eval_loader
from dist_train.errors import RunFailed, UserError, atomic_write_bytes
from dist_train.model.deploy import INPUT, OUTPUT, Exported, exportable, require_onnx, to_onnx, to_torchscript
from dist_train.shardset.format import is_url, load_info
from dist_train.trust.files import stored_address
from dist_train.trust.runs import read_run_config

from .load import Loaded, load_model
from .run import default_split, eval_augment

PARITY_IMAGES = 8  # real images the exported file is checked on
FP32_TOL = 1e-4  # max abs difference of the logits, fp32
FP16_REL_TOL = 1e-2  # --half: max abs difference <= this x max(1, largest |logit|) of the fp32 model


def load_for_export(run: str | Path | None, checkpoint: str | Path | None) -> Loaded:
    """`load_model` (best/ unless a checkpoint), built with timm's export-friendly layers."""
    with exportable():
        return load_model(run, checkpoint)


def run_data(loaded: Loaded) -> str | None:
    """The shard set the run trained on (its config.yaml), if it is still there; an address read
    from the file is used only when it is a plain path or URL (`stored_address`): never a command."""
    cfg = loaded.run / "config.yaml"
    data = read_run_config(loaded.run).get("data") if cfg.is_file() else None
    if not data:
        return None
    data = stored_address(data, cfg)
    return data if is_url(data) or Path(data).is_dir() else None


def parity_images(loaded: Loaded, data: str | None, split: str | None, n: int) -> tuple[torch.Tensor, str]:
    """n normalized images of `split` through the eval loader (repeated if the split is smaller);
    without a shard set, n seeded random ones. Also says which it used."""
    if data is None:
        size = tuple(loaded.info["input_size"])
        return torch.randn((n, *size), generator=torch.Generator().manual_seed(0)), f"{n} random inputs (no --data)"
    info = load_info(data)
    split = split or ("validation" if "validation" in info.get("splits", {}) else default_split(info))
    loader = build_eval_loader(data, info, split, aug=eval_augment(loaded.info), batch_size=n, workers=0,
                               world_size=1, rank=0)
    batch = next(iter(loader), None)
    if batch is None:
        raise UserError(f"--data {data}: split {split!r} has no readable images to check the export on")
    x = BatchPrep(torch.device("cpu"), loaded.info["mean"], loaded.info["std"]).images(batch["image"])
    got = len(x)
    x = x.repeat(math.ceil(n / got), 1, 1, 1)[:n]
    return x.contiguous(), f"{got} images of {data} split {split!r}"


def metadata(loaded: Loaded, dtype: torch.dtype, batch: int | None) -> dict[str, Any]:
    """What a deployment needs to feed the graph and read its output (see the module doc)."""
    info, aug = loaded.info, eval_augment(loaded.info)
    return {
        "architecture": info["architecture"], "head": info["head"], "num_classes": info["num_classes"],
        "class_names": [str(c) for c in info["label_names"]],
        "input_name": INPUT, "input_shape": ["batch" if batch is None else batch, *info["input_size"]],
        "input_dtype": str(dtype).removeprefix("torch."), "input_layout": "NCHW, RGB",
        "input_normalized": True, "mean": list(info["mean"]), "std": list(info["std"]),
        "input_size": list(info["input_size"]), "resize_shorter_side": math.floor(aug.img_size / aug.crop_pct),
        "interpolation": aug.interpolation, "antialias": True, "crop_pct": aug.crop_pct, "crop": "center",
        "output_name": OUTPUT, "output": "logits (N, num_classes); softmax gives the class probabilities",
        "source": str(loaded.source), "exported_by": f"dist_train {__version__}",
    }


def _doc(meta: dict) -> str:
    return (f"{meta['architecture']} ({meta['num_classes']} classes). Input '{INPUT}': {meta['input_dtype']} "
            f"{meta['input_shape']} NCHW RGB, resized (shorter side {meta['resize_shorter_side']}, "
            f"{meta['interpolation']}), center-cropped, (x/255 - mean)/std with mean {meta['mean']}, std "
            f"{meta['std']}. Output '{OUTPUT}': logits. See metadata_props.")


def _parity(exported: Exported, model: torch.nn.Module, x: torch.Tensor, chunks: list[slice],
            dtype: torch.dtype) -> tuple[float, float]:
    """(max abs difference of the exported file's outputs from the fp32 PyTorch model's, the
    largest |logit| of the latter)."""
    with torch.no_grad():
        ref = model(x)
    diff = 0.0
    for c in chunks:
        out = exported(x[c].to(dtype)).float()
        if out.shape != ref[c].shape:
            raise RunFailed(f"export check: output shape {tuple(out.shape)} for input {tuple(x[c].shape)}, "
                            f"expected {tuple(ref[c].shape)}")
        diff = max(diff, float((out - ref[c]).abs().max()))
    return diff, float(ref.abs().max())


def export_trained(loaded: Loaded, fmt: str, out: Path, *, dynamic_batch: bool, half: bool, batch_size: int,
                   data: str | None, split: str | None) -> dict[str, Any]:
    """Export, check parity, then write `out` atomically; returns what was done and measured."""
    if fmt == "onnx":
        require_onnx()
    model = loaded.model.to_single() if hasattr(loaded.model, "to_single") else loaded.model
    model = model.float().eval()
    n = PARITY_IMAGES if dynamic_batch else batch_size * math.ceil(PARITY_IMAGES / batch_size)
    x, checked_on = parity_images(loaded, data, split, n)
    dtype = torch.float16 if half else torch.float32
    target = copy.deepcopy(model).to(dtype) if half else model
    example = x.to(dtype) if dynamic_batch else x[:batch_size].to(dtype)
    meta = metadata(loaded, dtype, None if dynamic_batch else batch_size)
    if fmt == "onnx":
        blob = to_onnx(target, example, meta, dynamic_batch=dynamic_batch, doc=_doc(meta))
    else:
        blob = to_torchscript(target, example, meta)
    chunks = ([slice(None), slice(0, max(1, n // 2))] if dynamic_batch
              else [slice(i, i + batch_size) for i in range(0, n, batch_size)])
    diff, scale = _parity(Exported(fmt, blob), model, x, chunks, dtype)
    tol = FP16_REL_TOL * max(1.0, scale) if half else FP32_TOL
    sizes = sorted({len(range(*c.indices(n))) for c in chunks})
    if not diff <= tol:
        raise RunFailed(f"export check failed: {fmt} output differs from PyTorch by {diff:.3g} (max abs, on "
                        f"{checked_on}), tolerance {tol:.3g}; {out} not written")
    atomic_write_bytes(out, blob)
    return {"out": str(out), "format": fmt, "dtype": meta["input_dtype"], "batch": meta["input_shape"][0],
            "checked_batch_sizes": sizes, "checked_on": checked_on, "max_abs_diff": diff, "tolerance": tol,
            "bytes": len(blob), "metadata": meta}
