"""Parts of a run that follow from the config alone: the run's own config copy, the process's
seeds and threads, the loaders' augmentation, the model (shared by the Trainer, --overfit-batches
and the LR finder)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dist_train.config import Config
from dist_train.data.transforms import AugmentConfig
from dist_train.errors import UserError
from dist_train.model.recompute import set_grad_checkpointing
from dist_train.system import usable_cpus
from dist_train.tasks import Task


def run_config(cfg: Config) -> Config:
    """The config a run uses: --debug means one process's worth of everything and a smoke run of
    --debug-steps train batches (then validation of at most as many batches) (a copy; `cfg` stays)."""
    if not cfg.runtime.debug:
        if cfg.checkpoint.output is None:
            raise UserError("--output is required (the run folder)")
        return cfg
    output = cfg.checkpoint.output or tempfile.mkdtemp(prefix="dist_train-debug-")
    r, accum = cfg.runtime, cfg.optim.grad_accum_steps
    steps = -(-r.debug_steps // accum)  # --debug-steps batches, grouped per optimizer step
    return cfg.replace(workers=0, output=output, mixed_precision="no", max_steps=min(r.max_steps or steps, steps))


def global_batch(cfg: Config, world: int, n_train: int, split: str) -> int:
    """Samples per optimizer step over all processes; more than the split holds is a UserError."""
    o = cfg.optim
    n = o.batch_size * world * o.grad_accum_steps
    if n > n_train:
        raise UserError(f"global batch {n} (batch {o.batch_size} x {world} processes x {o.grad_accum_steps} "
                        f"accumulation) is larger than split '{split}' ({n_train} samples)")
    return n


def process_setup(acc: Accelerator, cfg: Config) -> None:
    """Seeds, CPU threads and anomaly detection for this process of a run."""
    set_seed(cfg.runtime.seed, device_specific=True)
    torch.autograd.set_detect_anomaly(cfg.runtime.debug)
    if acc.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Loader workers and ranks share the cores; oversubscribed OpenMP threads slow CPU runs 10x.
        torch.set_num_threads(max(1, usable_cpus() // acc.num_processes - cfg.data.workers))


def augment_config(cfg: Config, dcfg: dict) -> AugmentConfig:
    """The loaders' transforms from the flags, with the model's crop_pct and mean as defaults."""
    a = cfg.augment
    return AugmentConfig(img_size=cfg.model.img_size, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
                         vflip=a.vflip, color_jitter=a.color_jitter, aa=a.aa, crop_pct=a.crop_pct or dcfg["crop_pct"], train_crop=a.crop, mean=tuple(dcfg["mean"]))


def best_records(cfg: Config, aug: AugmentConfig, dcfg: dict) -> tuple[dict, dict]:
    """What best/ records beside the weights: save_for_timm's model description (model_name,
    img_size, crop_pct, mean, std) and the task's options."""
    export = dict(model_name=cfg.model.model, img_size=cfg.model.img_size, crop_pct=aug.crop_pct,
                  mean=tuple(dcfg["mean"]), std=tuple(dcfg["std"]))
    return export, {f.name: getattr(cfg.task, f.name) for f in fields(cfg.task) if f.metadata.get("task_option")}


def create_run_model(task: Task, cfg: Config, num_classes: int) -> torch.nn.Module:
    """The model the config asks for, with the head the task builds for `--head`, checkpointed with
    --grad-checkpointing."""
    m = cfg.model
    model = task.create_model(m.model, num_classes, head=cfg.task.head, pretrained=m.pretrained and not m.pretrained_path,
                              pretrained_path=m.pretrained_path, img_size=m.img_size, drop_rate=m.drop,
                              drop_path_rate=m.drop_path)
    if m.grad_checkpointing:
        set_grad_checkpointing(model, m.model)
    return model
