"""Staged unfreezing in the trainer: which groups train when, and DDP rebuilt around them.

DDP registers gradient hooks only for parameters that require grad when it is built, so a
stage change unwraps the model, sets `requires_grad`, and prepares it again. The optimizer
holds every layer group from the start: a frozen parameter never gets a gradient, hence no
optimizer state and no update, and unfreezing needs no optimizer surgery.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from dist_train.config import StagesSection
from dist_train.errors import UserError
from dist_train.model.stages import apply_trainable, count_params, freeze_bn, parse_schedule, stage_for_epoch, trainable_names

from .checkpoint import Progress


class Stager:
    """Applies the unfreezing schedule (`--unfreeze`) and the warm-up of newly trainable groups."""

    def __init__(self, cfg: StagesSection, epochs: int, model: torch.nn.Module) -> None:
        self.cfg = cfg
        self.epochs = epochs
        self.stages = parse_schedule(cfg.unfreeze)
        self.names = [trainable_names(model, s.groups) for s in self.stages]
        self.current: int | None = None

    def stage_at(self, epoch: int) -> int:
        return stage_for_epoch(self.stages, epoch, self.epochs)

    @property
    def trainable(self) -> set[str]:
        return self.names[self.current or 0]

    def enter(self, acc: Accelerator, model: torch.nn.Module, optimizer: Any, stage: int,
              progress: Progress) -> tuple[torch.nn.Module, Any]:
        """Make `stage` current: set the trainable set, rebuild the DDP wrapper over it.

        Accelerate keeps every prepared object and would save each one in a checkpoint; letting
        it forget them all (`free_memory`) and preparing the live model and optimizer again keeps
        exactly one of each. Returns the prepared (model, optimizer).
        """
        if stage == self.current:
            return model, optimizer
        if stage >= len(self.names):  # a checkpoint's stage (--resume) that this run's schedule lacks
            raise UserError(f"--resume: the checkpoint was saved in stage {stage} of its --unfreeze schedule; this "
                            f"run's (--unfreeze {self.cfg.unfreeze or 'all'}) has {len(self.names)} (0-{len(self.names) - 1}): "
                            "resume with the --unfreeze the run was started with (its config.yaml records it)")
        raw = acc.unwrap_model(model)
        raw_optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch one
        acc.free_memory()
        apply_trainable(raw, self.names[stage], train_bn=self.cfg.train_bn)
        if stage != progress.stage:
            progress.stage, progress.stage_start = stage, progress.step
        self.current = stage
        return acc.prepare(raw, raw_optimizer)

    def train_mode(self, model: torch.nn.Module, acc: Accelerator) -> None:
        """model.train(), with BatchNorm of frozen groups back in eval mode (their statistics stay)."""
        model.train()
        freeze_bn(acc.unwrap_model(model), self.trainable, self.cfg.train_bn)

    def set_warmup(self, optimizer: Any, progress: Progress) -> None:
        """Groups that just became trainable ramp their LR from 0 over --unfreeze-warmup steps."""
        if not self.cfg.unfreeze_warmup or not self.current:
            return
        ramp = min(1.0, (progress.step - progress.stage_start + 1) / self.cfg.unfreeze_warmup)
        before = self.names[self.current - 1]
        for g in optimizer.param_groups:
            fresh = not (set(g["param_names"]) & before)
            scale = g["base_lr_scale"] * (ramp if fresh else 1.0)
            # The scheduler applies lr_scale only at its next step_update; rescale the LR this
            # step uses too, or a new group takes its first step at full LR.
            g["lr"] *= scale / g["lr_scale"]
            g["lr_scale"] = scale

    def summary(self, model: torch.nn.Module) -> list[str]:
        lines, start = [], 0
        for i, s in enumerate(self.stages):
            n = s.epochs if s.epochs is not None else self.epochs - start
            lines.append(f"  stage {i}: epochs {start}-{start + n - 1} train {s.groups} "
                         f"({count_params(model, self.names[i]):,} params)")
            start += n
        return lines
