"""Optimizer and LR schedule, from timm: every layer group in the optimizer from the start."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from dist_train.config import OptimSection, StagesSection
from dist_train.model.stages import param_groups

# timm names of the torch optimizers with a fused kernel on CPU and CUDA: one kernel for all
# parameters instead of a Python loop over them (resnet18 AdamW step on one CPU thread: 6.6 ms
# fused, 25 ms foreach, 50 ms torch's CPU default).
FUSED_OPTS = ("adam", "adamw", "sgd", "momentum", "nesterov")


def build_optimizer(cfg: OptimSection, stages: StagesSection, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm optimizer over every layer group (weight-decay and layer-decay aware)."""
    groups = param_groups(model, {n for n, _ in model.named_parameters()}, weight_decay=cfg.weight_decay,
                          layer_decay=stages.layer_decay)
    for g in groups:
        g["base_lr_scale"] = g.get("lr_scale", 1.0)
    opt = cfg.opt.lower()
    kw: dict[str, Any] = {"momentum": cfg.momentum} if opt in ("sgd", "momentum", "nesterov") else {}
    if opt in FUSED_OPTS:
        kw["fused"] = True
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


# The schedule's clock: epochs in units of 1/SCHEDULE_UNITS, from the samples delivered, so the
# LR curve is the same whatever the world size, worker count or batch size (and a resume on
# another one continues at the same point of it).
SCHEDULE_UNITS = 100_000


def build_scheduler(cfg: OptimSection, optimizer: torch.optim.Optimizer) -> Any:
    """timm scheduler stepped with `step_update(schedule_time(...))`."""
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=SCHEDULE_UNITS)
    return scheduler


def schedule_time(epoch: int, samples: int, num_samples: int) -> int:
    """Where the run is on the schedule's clock: `epoch` plus the fraction of it delivered."""
    return round((epoch + samples / max(num_samples, 1)) * SCHEDULE_UNITS)
