"""The LR range test (Smith 2015; fastai's `lr_find`, Lightning's `Tuner.lr_find`) on the run's
own pipeline: the model, optimizer, loader, augmentation, loss, precision and first unfreezing
stage that `run.py` with the same flags trains with (the Trainer's builders), for `num_steps`
optimizer steps whose LR grows exponentially from `start_lr` to `end_lr`.

Each step's loss is averaged over micro-batches and ranks, then smoothed as Lightning does (an
exponential moving average, beta 0.98, bias-corrected). The test stops early once the smoothed
loss exceeds `early_stop_threshold` times its best (or is not finite); the suggestion is the LR
of the steepest descent of the smoothed loss, leaving out the first 10 points and the last one.
Every rank computes it from the same averaged losses; the main process checks they agree.

A throwaway run: no checkpoint, config.yaml, metrics or tracker files; the model and optimizer
are built for the test and released after it. The main process writes only the plot.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from dist_train.config import Config
from dist_train.errors import RunFailed, UserError, atomic_write_bytes
from dist_train.infer.accel import make_accelerator

from .checkpoint import Progress
from .guard import out_of_memory_hint
from .parts import global_batch, process_setup
from .trainer import Trainer

BETA = 0.98  # Lightning's smoothing of the loss
SKIP_BEGIN, SKIP_END = 10, 1  # points the suggestion leaves out (Lightning's defaults)
MIN_WINDOW = 5  # points left to choose from: with 2 the steepest is always the first, whatever the loss
PLOT_NAME = "lr_find.png"


@dataclass(frozen=True)
class Sweep:
    """The LRs the test runs through (Lightning's min_lr, max_lr, num_training, early_stop_threshold)."""

    start_lr: float = 1e-8
    end_lr: float = 1.0
    num_steps: int = 100
    early_stop_threshold: float = 4.0

    def check(self) -> "Sweep":
        if not self.start_lr > 0:
            raise UserError(f"--start-lr {self.start_lr}: expected a positive number")
        if not self.start_lr < self.end_lr:
            raise UserError(f"--start-lr {self.start_lr} >= --end-lr {self.end_lr}: expected --start-lr < --end-lr")
        if self.num_steps < SKIP_BEGIN + SKIP_END + MIN_WINDOW:
            raise UserError(f"--num-steps {self.num_steps}: expected at least {SKIP_BEGIN + SKIP_END + MIN_WINDOW} "
                            f"(the suggestion leaves out the first {SKIP_BEGIN} steps and the last, and picks "
                            f"from at least {MIN_WINDOW} others)")
        if not self.early_stop_threshold > 1:
            raise UserError(f"--early-stop-threshold {self.early_stop_threshold}: expected a number above 1")
        return self

    def lr(self, i: int) -> float:
        """The LR of step i: start_lr at step 0, end_lr at the last, evenly spaced in log."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.num_steps - 1))


def smooth(losses: list[float]) -> list[float]:
    """Lightning's smoothed loss: a bias-corrected exponential moving average."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = BETA * avg + (1 - BETA) * loss
        out.append(avg / (1 - BETA ** (i + 1)))
    return out


def suggest(smoothed: list[float]) -> int | None:
    """Index of the steepest descent of the smoothed loss; None when fewer than two finite points
    are left after leaving out the first SKIP_BEGIN and the last SKIP_END."""
    idx = np.arange(len(smoothed))[SKIP_BEGIN:len(smoothed) - SKIP_END]
    values = np.asarray(smoothed, dtype=np.float64)[idx]
    keep = np.isfinite(values)
    if keep.sum() < 2:
        return None
    idx, values = idx[keep], values[keep]
    return int(idx[np.argmin(np.gradient(values))])


class RangeTest(Trainer):
    """The Trainer's builders with a loop of its own: one sweep, nothing saved."""

    def __init__(self, cfg: Config, sweep: Sweep, **parts: Any) -> None:
        super().__init__(cfg.replace(val_split=None, model_ema=False), **parts)  # no validation, no EMA
        self.sweep = sweep.check()

    def build_accelerator(self) -> Accelerator:
        """No trackers and no project folder: the test writes nothing but its plot."""
        c = self.cfg
        return make_accelerator(c.runtime.mixed_precision, force_cpu=c.runtime.debug,
                                dist_timeout=c.runtime.dist_timeout)

    def setup(self) -> None:
        """The Trainer's set-up without its run folder, trackers, checkpoints or resume."""
        self._read_data()
        self.acc = self._part("accelerator")
        self.global_batch = global_batch(self.cfg, self.acc.num_processes, self.n_train, self.train_split)
        process_setup(self.acc, self.cfg)
        self._build_model_and_data()
        self.progress = Progress()
        self._enter_stage(self.stager.stage_at(0))
        self.stager.train_mode(self.model, self.acc)

    def step_groups(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, list[str]]]]:
        """Groups of --grad-accum-steps batches, epoch after epoch (an epoch's last group may be
        shorter, as in training); every rank gets the same number."""
        k = self.cfg.optim.grad_accum_steps
        for epoch in itertools.count():
            self.train_loader.set_epoch(epoch)
            batches = self.train_loader.plan(epoch).batches_per_rank
            group = []
            for n, batch in enumerate(self.train_loader):
                group.append(batch)
                if len(group) == k or n + 1 == batches:
                    yield group
                    group = []
                if n + 1 == batches:
                    break

    def sweep_step(self, batches: list[tuple[torch.Tensor, torch.Tensor, list[str]]], lr: float) -> float:
        """One optimizer step at `lr` (each group's layer-decay scale kept); the loss averaged over
        the micro-batches and the ranks."""
        acc, model = self.acc, self.model
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        total = torch.zeros((), device=acc.device)
        for i, (images, targets, _) in enumerate(batches):
            x, y = self.prep.train(images, targets)
            with acc.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext():  # the last one syncs
                with acc.autocast():
                    loss = self.criterion(model(x), y)
                acc.backward(loss / len(batches))
            total += loss.detach().float() / len(batches)
        if self.cfg.optim.clip_grad:
            acc.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(total, reduction="mean").item())

    def run_sweep(self) -> tuple[list[float], list[float], bool]:
        """(lrs, losses, stopped early): until num_steps or the smoothed loss diverges."""
        s, lrs, losses = self.sweep, [], []
        best, diverged = math.inf, False
        bar = tqdm(total=s.num_steps, desc="lr_find", disable=not self.acc.is_main_process, dynamic_ncols=True)
        for i, group in zip(range(s.num_steps), self.step_groups()):
            lrs.append(s.lr(i))
            with out_of_memory_hint(self.cfg.optim.batch_size, self.cfg.model.img_size, self.acc.device):
                losses.append(self.sweep_step(group, lrs[-1]))
            smoothed = smooth(losses)[-1]
            bar.update(1)
            bar.set_postfix(lr=f"{lrs[-1]:.2e}", loss=f"{smoothed:.4f}")
            if not math.isfinite(smoothed) or (i > 1 and smoothed > s.early_stop_threshold * best):
                diverged = True
                break
            best = min(best, smoothed)
        bar.close()
        return lrs, losses, diverged

    def find(self) -> dict:
        """Run the test; the suggestion, the plot (main process), the model and optimizer released."""
        self.setup()
        acc, out = self.acc, Path(self.cfg.checkpoint.output)
        try:
            lrs, losses, diverged = self.run_sweep()
        finally:
            acc.free_memory()  # Accelerate's references to the throwaway model and optimizer
            self.model = self.optimizer = None
        smoothed = smooth(losses)
        idx = suggest(smoothed)
        lr = None if idx is None else lrs[idx]
        every = gather_object([lr]) if acc.num_processes > 1 else [lr]
        if len(set(every)) > 1:
            raise RunFailed(f"lr_find: ranks suggest different LRs {every}; their losses should be identical")
        plot = out / PLOT_NAME
        if acc.is_main_process:
            atomic_write_bytes(plot, draw(lrs, losses, smoothed, idx, self.cfg.model.model))
        acc.end_training()
        if lr is None:
            raise RunFailed(f"lr_find: the loss diverged after {len(lrs)} steps (at lr {lrs[-1]:.2e}), too few for a "
                            f"suggestion; lower --start-lr (plot: {plot})", all_ranks=True)
        return {"lr": lr, "steps": len(lrs), "stopped_early": diverged, "start_lr": self.sweep.start_lr,
                "end_lr": self.sweep.end_lr, "world_size": acc.num_processes, "plot": str(plot),
                "is_main": acc.is_main_process}


def y_limits(losses: list[float], smoothed: list[float]) -> tuple[float, float] | None:
    """The loss axis: from below the lowest loss, raw or smoothed (the minimum is always on the
    plot), up to the start of the curve plus as much again as it fell (a diverging tail leaves
    the top rather than flattening the interesting part)."""
    low = [v for v in [*losses, *smoothed] if math.isfinite(v)]
    start = next((v for v in smoothed if math.isfinite(v)), None)
    if not low or start is None:
        return None
    lo = min(low)
    top = max(v for v in smoothed if math.isfinite(v))
    hi = max(start, min(top, start + (start - lo)))
    pad = 0.05 * (hi - lo + 1e-12)
    return lo - pad, hi + pad


def draw(lrs: list[float], losses: list[float], smoothed: list[float], idx: int | None, model: str) -> bytes:
    """The PNG: raw and smoothed loss against the LR (log axis), the suggestion marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed loss")
    limits = y_limits(losses, smoothed)
    if limits:
        ax.set_ylim(*limits)
    if idx is not None:
        ax.axvline(lrs[idx], color="C3", linestyle="--", linewidth=1)
        ax.plot([lrs[idx]], [smoothed[idx]], "o", color="C3", label=f"suggested lr {lrs[idx]:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {model}, {len(lrs)} steps")
    ax.legend(loc="best")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()
