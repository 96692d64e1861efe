"""Checkpoints: where the run is, and the folders that let it continue after any stop.

`RUN/checkpoints/step-XXXXXXXX/` holds Accelerate's state (model.safetensors, optimizer,
scaler, RNG) and `progress.json`, written last: a folder without it is incomplete and ignored.
Each checkpoint is written to a temporary folder and renamed; the newest `keep` are kept. The
Checkpointer decides itself when to save (`save(..., force=)`): every `every` steps, and
whenever the trainer says the moment must not be lost (epoch end, stop, last step).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from dist_train.errors import UserError, atomic_write_json

CKPT_PREFIX = "step-"
PROGRESS_NAME = "progress.json"


@dataclass
class Progress:
    """Where the run is; saved as JSON in every checkpoint so a resume continues mid-epoch."""

    epoch: int = 0
    batch: int = 0  # batches of the epoch's current plan already consumed on each rank
    samples: int = 0  # samples of `epoch` delivered, over all ranks (padding aside): drives the LR
    plan: dict | None = None  # the current plan's layout: world, workers, batch, done (data.plan)
    step: int = 0  # optimizer steps taken
    updates: int = 0  # optimizer steps not skipped by the fp16 scaler
    best_f1: float = -1.0
    stale: int = 0  # evaluations since val macro F1 last improved (--patience)
    stage: int = 0
    stage_start: int = 0  # step at which the current stage began (for --unfreeze-warmup)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def read_progress(ckpt: Path) -> Progress:
    p = Progress()
    p.load_state_dict(json.loads((ckpt / PROGRESS_NAME).read_text()))
    return p


class Checkpointer:
    """`OUT/checkpoints/`: save on its own timing, find the checkpoint to resume from."""

    def __init__(self, output: str | Path, keep: int, every: int | None = None) -> None:
        self.root = Path(output) / "checkpoints"
        self.keep = keep
        self.every = every

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.name.startswith(CKPT_PREFIX) and (p / PROGRESS_NAME).is_file())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def resume_path(self, resume: str, output: str) -> Path | None:
        """The checkpoint `--resume` names (auto: the newest); none with existing checkpoints refuses."""
        if resume == "none":
            if self.complete():
                raise UserError(f"--output {output} already holds checkpoints: pass --resume auto to continue it, "
                                "or choose a new --output")
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / PROGRESS_NAME).is_file():
            raise UserError(f"--resume {path}: not a complete checkpoint (no {PROGRESS_NAME})")
        return path

    def save(self, acc: Accelerator, progress: Progress, force: bool = False) -> Path | None:
        """Save if forced or `every` steps have passed; returns the folder, None if not saved."""
        if not force and not (self.every and progress.step % self.every == 0):
            return None
        final = self.root / f"{CKPT_PREFIX}{progress.step:08d}"
        tmp = self.root / f".tmp-{CKPT_PREFIX}{progress.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / PROGRESS_NAME, progress.state_dict())  # marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final


def check_resume_compatible(ckpt: Path, model: str, num_classes: int, head: str) -> None:
    """Refuse a checkpoint of another model or class count before loading tensors into it."""
    run_json = ckpt.parent.parent / "run.json"  # RUN/checkpoints/step-N -> RUN/run.json
    if not run_json.is_file():
        return
    saved = json.loads(run_json.read_text())
    if saved.get("model") != model or saved.get("num_classes") != num_classes or saved.get("head") != head:
        raise UserError(
            f"--resume {ckpt}: checkpoint is {saved.get('model')} with {saved.get('num_classes')} classes "
            f"({saved.get('head')} head), this run is {model} with {num_classes} ({head})"
        )
