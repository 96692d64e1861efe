"""The trainer's overhead: the real Trainer timed from outside against a bare PyTorch loop.

The trainer's loader is wrapped (`TimedTrainer.build_train_loader`) so every batch's hand-out
and the request for the next one are time-stamped. With `--synthetic` the wrapper hands out one
cached batch again and again (the trainer's cost with free input: compare it with the bare
loop); with `--data` it passes the real batches through (end to end, loader included). The bare
loop's steps alternate with the trainer's, one each, so a machine shared with other jobs slows
both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from dist_train.config import Config, validate
from dist_train.errors import UserError, scratch_dir
from dist_train.model.build import create_model
from dist_train.model.recompute import set_grad_checkpointing
from dist_train.shardset.format import load_info
from dist_train.shardset.writer import write_shards
from dist_train.system import usable_cpus
from dist_train.tasks.mask.synth import make_dataset
from dist_train.train.trainer import Trainer

from .timing import peak_memory, sync

PRECISIONS = ("no", "bf16", "fp16")


class BareLoop:
    """The plainest loop on the same model and batch: fused AdamW (the trainer's default),
    cross-entropy, one fixed batch already on the device; the trainer's overhead limit."""

    def __init__(self, model_name: str, num_classes: int, img_size: int, batch_size: int, device: torch.device,
                 precision: str, channels_last: bool, compile: bool, grad_checkpointing: bool = False):
        torch.manual_seed(0)
        model = create_model(model_name, num_classes, img_size=img_size).to(device).train()
        if grad_checkpointing:
            set_grad_checkpointing(model, model_name)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as the trainer's default
        self.model = torch.compile(model) if compile else model
        self.x = torch.randn(batch_size, 3, img_size, img_size, device=device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, num_classes, (batch_size,), device=device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.device = device

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def timed_step(self) -> float:
        """Seconds of one step, the device synchronized on both ends."""
        sync(self.device)
        start = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - start


class TimedLoader:
    """Wraps the trainer's TrainLoader and time-stamps its use.

    A step is the time from handing out a batch to the trainer's request for the next (or
    its leaving the epoch loop); a wait is the time the trainer spends in `next()`. The
    timed window covers steps warmup+1 .. warmup+steps. The loader defines the epoch: it is
    as long as the run (`repeat` hands out the first batch forever; otherwise the wrapped
    loader's epochs follow one another), so no epoch end, evaluation or checkpoint falls in
    the window, whatever the shard set's size; `event` records the ones that happen and
    `events_in_window` lists any that fell inside (the bench refuses to report then).

    `between` (a bare-loop step returning its seconds) runs before each timed step, so the two
    loops alternate step by step and see the same machine even when other jobs come and go;
    each trainer step is then synchronized like the bare ones.
    """

    def __init__(self, loader: Any, warmup: int, steps: int, device: torch.device, repeat: bool,
                 between: Callable[[], float] | None = None):
        self._loader = loader
        self._device = device
        self._repeat = repeat
        self._between = between
        self._first = warmup + 1
        self._last = warmup + steps
        self._cached: Any = None
        self._inner_epoch = 0
        self.handed = 0
        self.timed_steps = 0
        self.events: list[tuple[str, int]] = []  # (what, batches handed out when it happened)
        self.window_s = 0.0
        self.wait_s = 0.0
        self.between_s = 0.0

    def __getattr__(self, name: str) -> Any:  # set_epoch, bad_samples, batch_size, ...
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return self._last + 1

    def set_epoch(self, epoch: int, skip_batches: int = 0, done: Any = None) -> None:
        self._inner_epoch = epoch
        self._loader.set_epoch(epoch, skip_batches=skip_batches, done=done)

    def event(self, what: str) -> None:
        self.events.append((what, self.handed))

    @property
    def events_in_window(self) -> list[tuple[str, int]]:
        return [(what, k) for what, k in self.events if self._first <= k <= self._last]

    def _batches(self) -> Iterator[Any]:
        if not self._repeat:
            while True:  # the wrapped loader's epochs back to back: one epoch for the trainer
                yield from self._loader
                self._inner_epoch += 1
                self._loader.set_epoch(self._inner_epoch)
        if self._cached is None:
            self._cached = next(iter(self._loader))
        while True:
            yield self._cached

    def __iter__(self) -> Iterator[Any]:
        batches = self._batches()
        while True:
            k = self.handed + 1
            timed = self._first <= k <= self._last
            if timed and self._between is not None:
                self.between_s += self._between()
            if k == self._first:
                sync(self._device)
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            got = time.perf_counter()
            self.handed = k
            try:
                yield batch
            finally:  # the trainer asks for the next batch, or leaves the loop (GeneratorExit)
                if k == self._last or (timed and self._between is not None):
                    sync(self._device)
                if timed:
                    self.timed_steps += 1
                    self.window_s += time.perf_counter() - asked
                    self.wait_s += got - asked


def synthetic_shards(out: Path, batch_size: int) -> str:
    """A small shard set (16 px synthetic faces, 18 classes) the trainer can start on; in
    --synthetic runs only its first batch is ever used."""
    persons = math.ceil(batch_size / 7 / 0.7) + 2  # the train split (~80% of persons) holds a batch
    make_dataset(out / "raw", persons=persons, size=16, eval_persons=1)
    write_shards(out / "raw" / "train", out / "shards", workers=1, progress=False)
    return str(out / "shards")


def bench_train(a: argparse.Namespace) -> dict:
    if a.steps < 1 or a.warmup < 1:
        raise UserError("--steps and --warmup: expected at least 1")
    workers = usable_cpus() if a.workers is None else a.workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with (tempfile.TemporaryDirectory(prefix="dist_train-bench-", dir=scratch_dir()) as tmp,
          contextlib.redirect_stdout(sys.stderr)):
        data = synthetic_shards(Path(tmp), a.batch_size) if a.synthetic else a.data
        info = load_info(data)
        num_classes = len(info["classes"])
        result: dict[str, Any] = {
            "bench": "train", "input": "synthetic" if a.synthetic else "shards", "data": None if a.synthetic else data,
            "model": a.model, "img_size": a.img_size, "batch_size": a.batch_size, "steps": a.steps,
            "warmup": a.warmup, "mixed_precision": a.mixed_precision, "channels_last": a.channels_last,
            "compile": a.compile, "grad_checkpointing": a.grad_checkpointing, "gpu_decode": a.gpu_decode,
            "workers": 0 if a.synthetic else workers, "device": str(device),
        }
        bare = BareLoop(a.model, num_classes, a.img_size, a.batch_size, device, a.mixed_precision,
                        a.channels_last, a.compile, a.grad_checkpointing) if a.bare else None
        for _ in range(a.warmup if bare else 0):
            bare.step()
        timed = _time_trainer(a, data, Path(tmp) / "run", 0 if a.synthetic else workers, device,
                              bare.timed_step if bare else None)
        if bare:
            result["bare_images_per_s"] = round(a.batch_size * a.steps / timed.between_s, 1)
    result["trainer_images_per_s"] = round(a.batch_size * a.steps / timed.window_s, 1)
    result["data_wait_fraction"] = round(timed.wait_s / timed.window_s, 4)
    result.update(peak_memory(device))
    if a.bare:
        result["ratio"] = round(result["trainer_images_per_s"] / result["bare_images_per_s"], 3)
    return result


class TimedTrainer(Trainer):
    """The real Trainer with its training loader wrapped in a TimedLoader (`timed`), one epoch
    as long as the run, and its evaluations, checkpoints and epoch starts recorded there."""

    def __init__(self, cfg: Config, timed: Callable[[Any], TimedLoader]) -> None:
        super().__init__(cfg)
        self._wrap = timed
        self.timed: TimedLoader | None = None

    def build_train_loader(self) -> TimedLoader:
        self.timed = self._wrap(super().build_train_loader())
        return self.timed

    def setup(self) -> None:
        super().setup()
        save = self.checkpointer.save

        def recorded(*args: Any, **kw: Any) -> Any:
            saved = save(*args, **kw)
            if saved is not None:
                self.timed.event("checkpoint")
            return saved

        self.checkpointer.save = recorded

    def begin_epoch(self) -> None:
        super().begin_epoch()
        self.timed.event("epoch start")
        self.batches = max(self.batches, len(self.timed))  # the timed loader's epoch: the whole run

    def evaluate(self, end_of_epoch: bool = False) -> dict:
        self.timed.event("evaluation")
        return super().evaluate(end_of_epoch)


def _time_trainer(a: argparse.Namespace, data: str, output: Path, workers: int, device: torch.device,
                  between: Callable[[], float] | None) -> TimedLoader:
    """The trainer for warmup + steps + 1 steps (the last one also checkpoints: untimed),
    with `between` run before each timed step."""
    cfg = validate(Config.from_flat(dict(
        data=data, output=str(output), val_split=None, model=a.model, img_size=a.img_size, batch_size=a.batch_size,
        workers=workers, mixed_precision=a.mixed_precision, channels_last=a.channels_last, compile=a.compile,
        grad_checkpointing=a.grad_checkpointing, gpu_decode=a.gpu_decode, epochs=10**6, warmup_epochs=0.0,
        max_steps=a.warmup + a.steps + 1, seed=0)))
    trainer = TimedTrainer(cfg, lambda loader: TimedLoader(loader, a.warmup, a.steps, device, a.synthetic, between))
    trainer.train()
    timed = trainer.timed
    if timed is None or timed.timed_steps != a.steps:
        raise RuntimeError("the trainer stopped before the timed steps were done")
    if timed.events_in_window:
        raise RuntimeError(f"the timed window holds untimed work: {timed.events_in_window}")
    return timed
