"""Loading a trained model for inference: `RUN/best/` (timm format) or a training checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train.errors import UserError
from dist_train.trust.runs import read_run_config, read_run_json
from dist_train.trust.weights import load_safetensors
from dist_train.model.build import data_config
from dist_train.model.export import load_trained
from dist_train.model.stages import strip_wrappers
from dist_train.tasks import build_model

from .cv import is_cv


@dataclass
class Loaded:
    """A trained model ready for inference and what preprocessing it needs."""

    model: torch.nn.Module
    info: dict  # label_names, num_classes, input_size, mean, std, crop_pct, head (as model.load_trained)
    run: Path  # the run folder (metrics.jsonl, config.yaml)
    source: Path  # the folder the weights came from


def load_checkpoint(ckpt: Path, run: Path) -> tuple[torch.nn.Module, dict]:
    """A resumable Accelerate checkpoint (`RUN/checkpoints/step-*/model.safetensors`), rebuilt
    from the run's `config.yaml` and `run.json` (model name, image size, head, classes)."""
    cfg_file, run_file = run / "config.yaml", run / "run.json"
    if not cfg_file.is_file() or not run_file.is_file():
        raise UserError(f"--checkpoint {ckpt}: rebuilding the model needs {cfg_file} and {run_file} "
                        "(pass --run RUN for the run folder that wrote it)")
    cfg, meta = read_run_config(run, required=("model",)), read_run_json(run_file)
    name, num_classes, classes = cfg["model"], meta["num_classes"], meta["classes"]
    head = meta.get("head", cfg.get("head", "single"))
    model = build_model(name, num_classes, head=head, img_size=cfg.get("img_size"))
    try:
        state = {strip_wrappers(k): v for k, v in load_safetensors(ckpt / "model.safetensors").items()}
        model.load_state_dict(state, strict=True)
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{ckpt / 'model.safetensors'}: does not fit {name} ({head} head, {num_classes} classes) "
                        f"from {cfg_file}: {type(e).__name__}: {first}") from None
    dcfg = data_config(model)
    img = int(cfg.get("img_size") or dcfg["input_size"][-1])
    info = {
        "architecture": name,
        "num_classes": num_classes,
        "label_names": classes,
        "input_size": (3, img, img),
        "mean": tuple(dcfg["mean"]),
        "std": tuple(dcfg["std"]),
        "crop_pct": float(cfg.get("crop_pct") or dcfg["crop_pct"]),
        "head": head,
        "metrics": {},
    }
    return model.eval(), info


def _no_best(run: Path, best: Path) -> str:
    """Why `--run` has no model, and what to pass instead: a fold of a CV folder, or a
    checkpoint that exists."""
    if is_cv(run):
        return (f"--run {run}: a cross-validation folder (fold-k/ runs), not one run: pass one fold's run "
                f"(--run {run}/fold-0), or score all folds with python -m dist_train.oof {run} "
                f"(predict --run {run} averages the fold models)")
    steps = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "model.safetensors").is_file())
    hint = (f"pass --checkpoint {steps[-1]} to use its newest checkpoint" if steps
            else "and it has no checkpoints/step-*/ either: train it first")
    return f"--run {run}: no trained model in {best} (it is written at the first evaluation); {hint}"


def load_model(run: str | Path | None, checkpoint: str | Path | None = None) -> Loaded:
    """`RUN/best/` by default; `checkpoint` may be a best/-style folder (config.json +
    model.safetensors) or an Accelerate checkpoint folder holding model.safetensors."""
    run = Path(run) if run is not None else None
    if run is not None and not run.is_dir():
        raise UserError(f"--run {run}: no such folder (expected a run folder written by dist_train/run.py)")
    if checkpoint is None:
        if run is None:
            raise UserError("--run RUN or --checkpoint PATH is required")
        best = run / "best"
        if not (best / "config.json").is_file() or not (best / "model.safetensors").is_file():
            raise UserError(_no_best(run, best))
        model, info = load_trained(best)
        return Loaded(model, info, run, best)
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"--checkpoint {ckpt}: no such folder")
    if (ckpt / "config.json").is_file():
        model, info = load_trained(ckpt)
        return Loaded(model, info, run or ckpt.parent, ckpt)
    if not (ckpt / "model.safetensors").is_file():
        raise UserError(f"--checkpoint {ckpt}: expected a best/-style folder (config.json + model.safetensors) "
                        "or a checkpoint folder holding model.safetensors")
    run = run or ckpt.parent.parent
    model, info = load_checkpoint(ckpt, run)
    return Loaded(model, info, run, ckpt)
