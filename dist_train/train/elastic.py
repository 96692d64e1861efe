"""A resume on another layout: what the checkpoint's plan had delivered becomes `done`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_train.data.plan import Plan, decode_done, encode_done
from dist_train.errors import UserError

from .checkpoint import Progress


def relayout(progress: Progress, layout: dict, loader: Any, seed: int, sampler: str, resume_from: Path | None) -> None:
    """After loading a checkpoint written under another (world, workers, batch) layout: the
    positions its plan had delivered in the interrupted epoch become `done`, and the rest of the
    epoch is laid out afresh (progress.batch 0). The same layout: nothing to do (batches skipped)."""
    old = progress.plan
    if old is None or old == {**old, **layout}:
        return
    if sampler != "none":
        changed = ", ".join(f"{k} {old[k]} -> {v}" for k, v in layout.items() if old[k] != v)
        raise UserError(f"--resume {resume_from}: {changed} mid-epoch with --sampler {sampler}: its per-window "
                        "draws cannot be continued on another layout; resume with the same processes, --workers "
                        "and --batch-size, or from an epoch-end checkpoint")
    base = loader.plan(0)
    plan = Plan(seed, progress.epoch, base.lengths, old["world"], old["workers"], old["batch"], base.shuffle,
                decode_done(old.get("done"), loader.num_samples))
    progress.plan = {**layout, "done": encode_done(plan.delivered(progress.batch))}
    progress.batch = 0
