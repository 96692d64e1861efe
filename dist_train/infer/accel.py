"""The Accelerator every command runs under: training, prediction, evaluation."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from dist_train.errors import UserError


def make_accelerator(mixed_precision: str | None = None, *, force_cpu: bool = False, dist_timeout: int = 600,
                     log_with: Sequence[str] = (), project_dir: str | None = None) -> Accelerator:
    """Accelerator for this launch; a CPU-only multi-process launch must become a gloo group.

    Without CUDA, Accelerate treats each of `--num_processes 2` as its own single-process run
    unless it is told `cpu=True`, so two "ranks" would silently train alone. `log_with`: the
    trackers (Accelerate's names) that log to `project_dir`, a run folder (TensorBoard in
    `project_dir/tb`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = (world > 1 or force_cpu) and not torch.cuda.is_available()
    kw = {}
    if project_dir is not None:
        kw = dict(log_with=list(log_with) or None,
                  project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=os.path.join(project_dir, "tb")))
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=[pg], **kw)
    if world > 1 and acc.num_processes != world:
        raise UserError(f"WORLD_SIZE={world} but the process group has {acc.num_processes} processes")
    return acc
