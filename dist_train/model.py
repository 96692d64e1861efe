"""Build any timm backbone, load local weights, and export a trained model in timm's own format.

Everything here goes through timm (`create_model`, its pretrained loader and checkpoint filters,
its data config) so a model trained by dist_train is an ordinary timm model: `best/` loads with
`timm.create_model('local-dir:best', pretrained=True)` and no dist_train code.

`--head multi` (the competition recipe) puts three heads (mask 3, gender 2, age 3) on one
backbone. Its 18-class output is the log of the product of the three softmaxes, so argmax,
metrics and prediction treat it like any 18-class model. Because that log-product equals a
single linear classifier (rows Wm[m] + Wg[g] + Wa[a]) up to a per-sample constant, the export
folds the heads into one 18-way timm classifier with exactly the same softmax.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg, load_state_dict, split_model_name_tag

from . import labels as L
from .errors import UserError, atomic_write_json, replace_dir

HEADS = ("single", "multi")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# pretrained_cfg keys about the source weights (location, test-time size, labels); an export
# states its own.
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "tag",
                "test_input_size", "test_crop_pct", "label_offset", "label_names", "label_descriptions")


# ----------------------------------------------------------------------------- multi-head model
class MultiHeadModel(torch.nn.Module):
    """One timm backbone (classifier removed) + mask / gender / age linear heads.

    `forward` returns 18-class log-probabilities log p(mask) + log p(gender) + log p(age) at
    class mask*6 + gender*3 + age; `forward_heads` returns the three raw logits for the loss.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        if backbone.num_classes != 0:
            raise ValueError("MultiHeadModel needs a headless backbone (reset_classifier(0))")
        self.backbone = backbone
        nf = backbone.num_features
        self.mask_head = torch.nn.Linear(nf, len(L.MASK_NAMES))
        self.gender_head = torch.nn.Linear(nf, len(L.GENDER_NAMES))
        self.age_head = torch.nn.Linear(nf, 3)
        self.num_classes = L.NUM_CLASSES
        self.num_features = nf
        # timm's data-config and export helpers read these from the model.
        self.pretrained_cfg = backbone.pretrained_cfg
        self.default_cfg = backbone.pretrained_cfg

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.mask_head(f), self.gender_head(f), self.age_head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_heads(*self.forward_heads(x))

    def group_matcher(self, coarse: bool = False):
        """timm-style matcher: the backbone's groups, then the three heads as the last group."""
        rev = timm.models.group_parameters(self.backbone, self.backbone.group_matcher(coarse=coarse), reverse=True)
        head_id = max(rev.values(), default=-1) + 1

        def match(name: str) -> int:
            if name.startswith("backbone."):
                return rev[name[len("backbone."):]]
            return head_id

        return match

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in nwd()} if nwd is not None else set()

    def get_classifier(self) -> torch.nn.Module:
        return torch.nn.ModuleList([self.mask_head, self.gender_head, self.age_head])

    @torch.no_grad()
    def to_single(self) -> torch.nn.Module:
        """A plain timm 18-class model with the same softmax: the heads folded into one Linear."""
        single = copy.deepcopy(self.backbone)
        single.reset_classifier(L.NUM_CLASSES)
        clf = single.get_classifier()
        if not isinstance(clf, torch.nn.Linear) or clf.in_features != self.num_features:
            raise UserError(f"--head multi: cannot export {type(self.backbone).__name__} as one timm classifier "
                            f"(its classifier is {type(clf).__name__}, not a Linear on the pooled features)")
        idx = torch.arange(L.NUM_CLASSES)
        m, g, a = idx // 6, (idx // 3) % 2, idx % 3
        clf.weight.copy_(self.mask_head.weight[m] + self.gender_head.weight[g] + self.age_head.weight[a])
        clf.bias.copy_(self.mask_head.bias[m] + self.gender_head.bias[g] + self.age_head.bias[a])
        return single


def combine_heads(mask: torch.Tensor, gender: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """(N,3),(N,2),(N,3) logits -> (N,18) log-probabilities, class = mask*6 + gender*3 + age."""
    lm, lg, la = (F.log_softmax(t.float(), dim=1) for t in (mask, gender, age))
    return (lm[:, :, None, None] + lg[:, None, :, None] + la[:, None, None, :]).flatten(1)


def split_targets(targets18: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """18-class targets -> (mask, gender, age) targets, per labels.decode."""
    return targets18 // 6, (targets18 // 3) % 2, targets18 % 3


def split_heads(log_probs18: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 18-class output -> each head's log-softmax, by marginalising the other two tasks.

    Exact because the output is lm[m] + lg[g] + la[a] and each head's probabilities sum to 1.
    """
    cube = log_probs18.float().view(-1, 3, 2, 3)
    return cube.logsumexp(dim=(2, 3)), cube.logsumexp(dim=(1, 3)), cube.logsumexp(dim=(1, 2))


def multi_head_loss(heads_out: torch.Tensor | Sequence[torch.Tensor], targets18: torch.Tensor,
                    weights: Sequence[float] = (1.0, 1.0, 1.0), smoothing: float = 0.0) -> torch.Tensor:
    """Weighted sum of the three heads' cross-entropies (the recipe's loss).

    Takes the model's ordinary (N, 18) output — so the trainer calls the DDP-wrapped model as
    usual and gradients are all-reduced — or the (mask, gender, age) logits of forward_heads;
    both give the same loss and gradients.
    """
    if isinstance(heads_out, torch.Tensor):
        if heads_out.ndim != 2 or heads_out.shape[1] != L.NUM_CLASSES:
            raise ValueError(f"multi_head_loss: expected (N, {L.NUM_CLASSES}) output, got {tuple(heads_out.shape)}")
        heads_out = split_heads(heads_out)
    if len(heads_out) != 3:
        raise ValueError("multi_head_loss expects the 18-class output or (mask, gender, age) logits")
    return sum(w * F.cross_entropy(out, t, label_smoothing=smoothing)
               for w, out, t in zip(weights, heads_out, split_targets(targets18)))


# ----------------------------------------------------------------------------- building
def _check_name(name: str) -> str:
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


def _describe_load_error(err: Exception) -> str:
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


def _load_local(name: str, num_classes: int, file: Path, kwargs: dict) -> torch.nn.Module:
    """Build `name` with weights from `file` through timm's loader (so its checkpoint filters,
    e.g. ViT position-embedding resampling, apply), strictly: every non-classifier key must fit.

    The model is first built with the checkpoint's own class count (0 for a headless file) so
    the load is strict, then the classifier is re-initialised if the class count differs.
    """
    try:
        sd = load_state_dict(str(file), weights_only=True)  # never unpickle code from a weights file
    except Exception as e:
        raise UserError(f"--pretrained-path {file}: cannot read weights ({type(e).__name__}: {e})") from None
    cfg = get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    ckpt_classes = 0
    for c in classifiers:
        w = sd.get(f"{c}.weight")
        if w is not None:
            ckpt_classes = int(w.shape[0])
            break
    del sd
    try:
        model = _timm(name, pretrained=True, num_classes=ckpt_classes,
                      pretrained_cfg_overlay=dict(file=str(file), num_classes=ckpt_classes), **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--pretrained-path {file}: weights do not fit {name}: {_describe_load_error(e)}") from None
    if ckpt_classes != num_classes:
        model.reset_classifier(num_classes)
    return model


def create_model(name: str, num_classes: int, *, pretrained: bool = False, pretrained_path: str | None = None,
                 img_size: int | None = None, drop_rate: float = 0.0, drop_path_rate: float | None = None,
                 head: str = "single") -> torch.nn.Module:
    """A timm model with `num_classes` outputs (or a MultiHeadModel for head='multi').

    `img_size` is passed to models that fix their input size (ViT-style) and recorded in the
    model's pretrained_cfg for all, so data config and export describe the size trained on.
    """
    base = _check_name(name)
    if head not in HEADS:
        raise UserError(f"--head {head!r}: expected one of {', '.join(HEADS)}")
    if head == "multi" and num_classes != L.NUM_CLASSES:
        raise UserError(f"--head multi predicts the {L.NUM_CLASSES} mask classes, but the data has {num_classes}")
    if pretrained and pretrained_path:
        raise UserError("give either --pretrained or --pretrained-path, not both")
    kwargs: dict[str, Any] = {"drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None and takes_img_size(base):
        kwargs["img_size"] = img_size
    out_classes = 0 if head == "multi" else num_classes
    if pretrained_path:
        model = _load_local(name, out_classes, resolve_weights_file(pretrained_path), kwargs)
    elif pretrained:
        try:
            model = _timm(name, pretrained=True, num_classes=out_classes, **kwargs)
        except UserError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"could not load pretrained weights for {name} ({type(e).__name__}: {first}); fetch "
                            f"them on a machine with internet and pass --pretrained-path FILE") from None
    else:
        model = _timm(name, pretrained=False, num_classes=out_classes, **kwargs)
    if img_size is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
        model.default_cfg = model.pretrained_cfg
    return MultiHeadModel(model) if head == "multi" else model


def data_config(model: torch.nn.Module) -> dict:
    """input_size, mean, std, crop_pct, interpolation (and crop_mode) from the model's pretrained_cfg."""
    return dict(resolve_model_data_config(model))


# ----------------------------------------------------------------------------- export / reload
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

    A MultiHeadModel is exported as the equivalent single 18-way classifier (see module doc):
    the same softmax and argmax, loadable by plain timm; config.json records head "multi".
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: export the module it wraps
    head = "multi" if isinstance(model, MultiHeadModel) else "single"
    plain = model.to_single() if isinstance(model, MultiHeadModel) else model
    if len(label_names) != num_classes or plain.num_classes != num_classes:
        raise ValueError(f"export: {len(label_names)} label names, model has {plain.num_classes} classes, "
                         f"expected {num_classes}")
    if img_size is None:
        img_size = int(data_config(plain)["input_size"][-1])
    config = _export_config(plain, model_name=model_name, num_classes=num_classes, label_names=label_names,
                            img_size=img_size, crop_pct=crop_pct, mean=mean, std=std, head=head)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in plain.state_dict().items()}
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "metrics.json", extra or {})
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load a `best/`-style folder for prediction: (model in eval mode, info).

    info: architecture, num_classes, label_names, input_size, mean, std, crop_pct,
    interpolation, crop_mode, head, metrics (metrics.json, {} when absent). A multi-head run
    comes back as its equivalent single classifier (same softmax).
    """
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(f"{path}: expected a trained model folder with config.json and model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
        arch, num_classes, pcfg = cfg["architecture"], int(cfg["num_classes"]), cfg["pretrained_cfg"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_file}: not a timm model config ({type(e).__name__}: {e})") from None
    _check_name(arch)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **cfg.get("model_args", {}))
    try:
        model.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not fit {arch}: {_describe_load_error(e)}") from None
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
        "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else {},
    }
    return model.eval(), info
