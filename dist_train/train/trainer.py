"""The Trainer: a loop that calls components, each of which decides its own timing.

`train` reads top to bottom: for each epoch, enter the stage, then for each optimizer step's
batches run `train_step`, let the evaluator and the checkpointer act if it is their moment, and
stop when the guard, the step budget or the epoch end says so. Everything a run is built from
comes from a `build_*` method, or is injected (tests build a Trainer from tiny parts; the
benchmark overrides `build_train_loader` to time the loader).

The training loader is deliberately NOT passed through `accelerator.prepare`: it shards the
stream itself (every rank the same number of batches), and Accelerate would shard it again.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from dist_train.config import Config, save_config
from dist_train.data.device import BatchPrep
from dist_train.data.loaders import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from dist_train.data.transforms import AugmentConfig
from dist_train.errors import UserError, atomic_write_json, is_out_of_memory
from dist_train.infer.accel import make_accelerator
from dist_train.model.build import data_config
from dist_train.model.stages import count_params
from dist_train.shardset.format import class_names, load_info, split_info
from dist_train.system import usable_cpus
from dist_train.tasks import Criterion, Task, task_for

from .checkpoint import Checkpointer, Progress, check_resume_compatible, read_progress
from .evaluator import Evaluator
from .guard import StepGuard
from .logging import Meter, MetricsLog, ProgressBar, start_lines, write_summary
from .optim import build_optimizer, build_scheduler
from .stager import Stager


def run_config(cfg: Config) -> Config:
    """The config a run uses: --debug means one process's worth of everything (a copy; `cfg` stays)."""
    if not cfg.runtime.debug:
        if cfg.checkpoint.output is None:
            raise UserError("--output is required (the run folder)")
        return cfg
    output = cfg.checkpoint.output or tempfile.mkdtemp(prefix="dist_train-debug-")
    return cfg.replace(workers=0, output=output, mixed_precision="no")


def augment_config(cfg: Config, dcfg: dict) -> AugmentConfig:
    """The loaders' transforms from the flags, with the model's crop_pct and mean as defaults."""
    a = cfg.augment
    return AugmentConfig(img_size=cfg.model.img_size, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
                         aa=a.aa, crop_pct=a.crop_pct or dcfg["crop_pct"], train_crop=a.crop, mean=tuple(dcfg["mean"]))


def create_run_model(task: Task, cfg: Config, num_classes: int) -> torch.nn.Module:
    """The model the config asks for, with the head the task builds for `--head`."""
    m = cfg.model
    return task.create_model(m.model, num_classes, head=cfg.task.head, pretrained=m.pretrained and not m.pretrained_path,
                             pretrained_path=m.pretrained_path, img_size=m.img_size, drop_rate=m.drop,
                             drop_path_rate=m.drop_path)


class Trainer:
    """Build with a Config; pass any part to use it instead of building it."""

    def __init__(self, cfg: Config, *, accelerator: Accelerator | None = None, model: torch.nn.Module | None = None,
                 train_loader: Any = None, val_loader: Any = None, criterion: Criterion | None = None) -> None:
        self.cfg = run_config(cfg)
        self._given = dict(accelerator=accelerator, model=model, train_loader=train_loader, val_loader=val_loader,
                           criterion=criterion)
        self.stopped = False
        self.batches_seen = 0

    # ------------------------------------------------------------------ building
    def build_accelerator(self) -> Accelerator:
        c = self.cfg
        return make_accelerator(c.runtime.mixed_precision, force_cpu=c.runtime.debug,
                                dist_timeout=c.runtime.dist_timeout, project_dir=c.checkpoint.output)

    def build_model(self) -> torch.nn.Module:
        return create_run_model(self.task, self.cfg, len(self.class_names))

    def _loader_kw(self) -> dict:
        acc = self.acc
        return dict(aug=self.aug, batch_size=self.cfg.optim.batch_size, workers=self.cfg.data.workers,
                    world_size=acc.num_processes, rank=acc.process_index, pin_memory=acc.device.type == "cuda",
                    gpu_decode=self.cfg.data.gpu_decode, device=acc.device)

    def build_train_loader(self) -> TrainLoader:
        d = self.cfg.data
        return build_train_loader(d.data, self.info, d.train_split, seed=self.cfg.runtime.seed,
                                  target_fn=self.task.target_fn(self.cfg.task, self.info), **self._loader_kw())

    def build_val_loader(self) -> EvalLoader | None:
        d = self.cfg.data
        return build_eval_loader(d.data, self.info, d.val_split, **self._loader_kw()) if d.val_split else None

    def build_criterion(self) -> Criterion:
        soft = self.cfg.augment.mixup > 0 or self.cfg.augment.cutmix > 0
        return self.task.criterion(self.cfg.task, self.info, self.cfg.data.train_split, len(self.class_names),
                                   self.acc.device, soft_targets=soft)

    def build_prep(self, dcfg: dict) -> BatchPrep:
        a, acc = self.cfg.augment, self.acc
        mixup = (Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=self.cfg.task.smoothing,
                       num_classes=len(self.class_names)) if a.mixup > 0 or a.cutmix > 0 else None)
        erase = RandomErasing(a.reprob, mode="pixel", device=acc.device.type) if a.reprob > 0 else None
        return BatchPrep(acc.device, dcfg["mean"], dcfg["std"], self.cfg.model.channels_last, mixup, erase)

    def _part(self, name: str) -> Any:
        given = self._given[name]
        return given if given is not None else getattr(self, f"build_{name}")()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Check the input, then build accelerator, model, optimizer, schedule and loaders; resume."""
        self._read_data()
        self.acc = acc = self._part("accelerator")
        self.checkpointer = Checkpointer(self.out, self.cfg.checkpoint.keep_checkpoints,
                                         self.cfg.checkpoint.checkpoint_every)
        self.resume_from = self.checkpointer.resume_path(self.cfg.checkpoint.resume, str(self.out))
        if self.resume_from is not None:
            check_resume_compatible(self.resume_from, self.cfg.model.model, len(self.class_names), self.cfg.task.head)
        self._check_global_batch()
        self._runtime_setup()
        self._build_model_and_data()
        self.progress = Progress()
        if self.resume_from is not None:
            self.progress = read_progress(self.resume_from)
            self._enter_stage(self.progress.stage)  # groups must match before loading
            acc.load_state(str(self.resume_from))
        else:
            self._enter_stage(self.stager.stage_at(0))
        self.guard = StepGuard(self.cfg.runtime.max_bad_steps, self.cfg.runtime.max_bad_fraction)
        self.meter, self.log = Meter(acc.device), MetricsLog(acc, self.out)
        if acc.is_main_process:
            self._print_start()
        total = self.cfg.optim.epochs * self.steps_per_epoch
        self.bar = ProgressBar(acc, min(self.cfg.runtime.max_steps or total, total), self.progress.step,
                               self.cfg.runtime.log_every)

    def _read_data(self) -> None:
        d = self.cfg.data
        if d.secure and "://" in d.data:  # webdataset's secure mode: no pipe:, no URL rewriting
            os.environ["WDS_SECURE"] = "1"
            webdataset.utils.enforce_security = True
        self.info = load_info(d.data)
        self.n_train = split_info(self.info, d.train_split).num_samples
        if d.val_split:
            split_info(self.info, d.val_split)
        self.class_names = class_names(self.info)
        self.task: Task = task_for(self.info)
        self.task.check(self.cfg.task, self.info)
        self.out = Path(self.cfg.checkpoint.output)

    def _check_global_batch(self) -> None:
        o, world = self.cfg.optim, self.acc.num_processes
        self.global_batch = o.batch_size * world * o.grad_accum_steps
        if self.global_batch > self.n_train:
            raise UserError(f"global batch {self.global_batch} (batch {o.batch_size} x {world} processes x "
                            f"{o.grad_accum_steps} accumulation) is larger than split '{self.cfg.data.train_split}' "
                            f"({self.n_train} samples)")

    def _runtime_setup(self) -> None:
        """Seeds, threads, anomaly detection, the run folder and the trackers."""
        acc, cfg = self.acc, self.cfg
        set_seed(cfg.runtime.seed, device_specific=True)
        torch.autograd.set_detect_anomaly(cfg.runtime.debug)
        if acc.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Loader workers and ranks share the cores; oversubscribed OpenMP threads slow CPU runs 10x.
            torch.set_num_threads(max(1, usable_cpus() // acc.num_processes - cfg.data.workers))
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            atomic_write_json(self.out / "run.json", {"model": cfg.model.model, "num_classes": len(self.class_names),
                                                      "head": cfg.task.head, "classes": self.class_names})
        acc.init_trackers("tb", config={k: v for k, v in cfg.flat().items() if isinstance(v, (int, float, str, bool))})

    def _build_model_and_data(self) -> None:
        cfg = self.cfg
        model = self._part("model")
        dcfg = data_config(model)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.model.compile:
            model.compile()  # in place, before DDP wraps it; state_dict keys stay plain
        self.model = model
        self.stager = Stager(cfg.stages, cfg.optim.epochs, model)
        self.optimizer = build_optimizer(cfg.optim, cfg.stages, model)
        self.aug = augment_config(cfg, dcfg)
        self.train_loader = self._part("train_loader")
        self.val_loader = self._part("val_loader")
        full = len(self.train_loader)
        self.batches = min(full, cfg.runtime.debug_steps) if cfg.runtime.debug else full  # per epoch, every rank
        self.steps_per_epoch = math.ceil(self.batches / cfg.optim.grad_accum_steps)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.steps_per_epoch)
        self.criterion = self._part("criterion")
        self.prep = self.build_prep(dcfg)
        export = dict(model_name=cfg.model.model, img_size=cfg.model.img_size, crop_pct=self.aug.crop_pct,
                      mean=tuple(dcfg["mean"]), std=tuple(dcfg["std"]))
        meta = {f.name: getattr(cfg.task, f.name) for f in fields(cfg.task) if f.metadata.get("task_option")}
        self.evaluator = Evaluator(self.val_loader, every=cfg.runtime.eval_every, task=self.task,
                                   class_names=self.class_names, out=self.out, prep=BatchPrep(
                                       self.acc.device, dcfg["mean"], dcfg["std"], cfg.model.channels_last),
                                   export=export, meta=meta,
                                   limit=cfg.runtime.debug_steps if cfg.runtime.debug else None)

    def _enter_stage(self, stage: int) -> None:
        self.model, self.optimizer = self.stager.enter(self.acc, self.model, self.optimizer, stage, self.progress)

    def _print_start(self) -> None:
        st = self.stager
        print(start_lines(self.acc, dict(
            model=self.cfg.model.model, params=count_params(self.model), trainable=count_params(self.model, st.trainable),
            global_batch=self.global_batch, batches=self.batches, steps_per_epoch=self.steps_per_epoch,
            train_samples=self.n_train, shards=len(split_info(self.info, self.cfg.data.train_split).filenames),
            shards_per_rank=self.train_loader.shards_per_rank, workers=max(1, self.cfg.data.workers),
            output=self.out, resumed_from=self.resume_from)))
        print("\n".join(st.summary(self.model)), flush=True)

    # ------------------------------------------------------------------ the loop
    def finished(self) -> bool:
        p, o, r = self.progress, self.cfg.optim, self.cfg.runtime
        return p.epoch >= o.epochs or bool(r.max_steps and p.step >= r.max_steps)

    def train(self) -> dict:
        """Train per the config; returns the last evaluation's metrics, the step and the output folder."""
        self.setup()
        p, metrics = self.progress, {}
        try:  # closed on every way out, so that an error line starts its own line
            while not self.finished() and not self.stopped:
                self.begin_epoch()
                for batches in self.step_batches():
                    with self._out_of_memory_hint():
                        self.train_step(batches)
                    end_of_epoch = p.batch >= self.batches
                    if self.evaluator.should_evaluate(p.step, end_of_epoch):
                        metrics = self.evaluate()
                    if end_of_epoch:
                        p.epoch, p.batch = p.epoch + 1, 0
                    stop = self.stopped or self.finished()
                    self.checkpointer.save(self.acc, p, force=stop or end_of_epoch)
                    if stop or end_of_epoch:
                        break
        finally:
            self.bar.close()
        return self.end(metrics)

    def begin_epoch(self) -> None:
        p = self.progress
        self._enter_stage(self.stager.stage_at(p.epoch))
        self.train_loader.set_epoch(p.epoch, skip_batches=p.batch)
        self.stager.train_mode(self.model, self.acc)
        self.guard.watch(self.model)

    def step_batches(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The epoch's remaining batches, grouped per optimizer step (--grad-accum-steps; the
        epoch's last group may be shorter)."""
        p, group = self.progress, []
        for batch in self.train_loader:
            group.append(batch)
            if len(group) == min(self.cfg.optim.grad_accum_steps, self.batches - p.batch):
                yield group  # train_step advances p.batch past it
                group = []
            if p.batch >= self.batches:
                return

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over `batches` (gradient accumulation), skipped on every rank after
        a non-finite loss on any; returns the last micro-batch's loss (on the device)."""
        acc, p, model = self.acc, self.progress, self.model
        self.guard.snapshot()
        nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
        for i, (images, targets) in enumerate(batches):
            x, y = self.prep.train(images, targets)
            if i == 0 and p.step == 0 and p.batch == 0:
                self._debug_first_batch(x, targets)
            sync = i == len(batches) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                with acc.autocast():
                    loss = self.criterion(model(x), y)
                acc.backward(loss / len(batches))
            finite = torch.isfinite(loss.detach())
            nonfinite |= ~finite
            self.meter.add(loss.detach(), finite, x.shape[0])
        p.batch += len(batches)
        self.batches_seen += len(batches)
        skip, self.stopped = self.guard.check(acc, nonfinite, p.step)
        if skip:
            self.guard.restore()
        else:
            self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        self.bar.step(p.step, loss, self.optimizer.param_groups[-1]["lr"], self.meter.images_per_s(acc.num_processes))
        return loss.detach()

    @contextlib.contextmanager
    def _out_of_memory_hint(self) -> Iterator[None]:
        """A step that runs out of memory ends the run with one line naming the settings to lower:
        the allocator's own message names neither."""
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            o, size = self.cfg.optim, self.cfg.model.img_size
            raise UserError(
                f"out of memory in a training step on {self.acc.device} with --batch-size {o.batch_size} and "
                f"--img-size {size} (one batch is {o.batch_size * 3 * size * size * 4:,} bytes of float32 input "
                "alone): use a smaller --batch-size (and --grad-accum-steps to keep the global batch) or a smaller "
                "--img-size") from None

    def _optimizer_step(self) -> None:
        acc, p = self.acc, self.progress
        if self.cfg.optim.clip_grad:
            acc.clip_grad_norm_([q for q in self.model.parameters() if q.requires_grad], self.cfg.optim.clip_grad)
        self.stager.set_warmup(self.optimizer, p)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule does not advance
            p.updates += 1
            self.scheduler.step_update(p.updates)

    def _debug_first_batch(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        if self.cfg.runtime.debug and self.acc.is_main_process:
            hist = torch.bincount(targets, minlength=len(self.class_names)).tolist()
            print(f"debug: images {tuple(x.shape)} {x.dtype}, targets {tuple(targets.shape)}, label histogram {hist}")

    def evaluate(self) -> dict:
        """One `metrics.jsonl` line: training stats since the last one, then validation (and best/)."""
        acc, p, world = self.acc, self.progress, self.acc.num_processes
        bad = int(acc.reduce(torch.tensor(self.train_loader.bad_samples, device=acc.device), "sum").item())
        m = {"epoch": p.epoch, "step": p.step, "lr": self.optimizer.param_groups[-1]["lr"],
             "train_loss": self.meter.train_loss(acc), "images_per_s": self.meter.images_per_s(world),
             "trainable_params": count_params(self.model, self.stager.trainable), "stage": self.stager.current,
             "bad_samples": bad}
        self.guard.check_bad_samples(bad, p.batch * self.cfg.optim.batch_size * world, p.epoch)
        m.update(self.evaluator.validate(self.model, acc, p))
        self.log.write(m, p.step)
        self.meter.reset()
        self.stager.train_mode(self.model, acc)
        return m

    def end(self, metrics: dict) -> dict:
        """summary.json, the stop line, the trackers closed; the result `train` returns."""
        acc, p = self.acc, self.progress
        write_summary(acc, self.model, p, self.batches_seen, self.out, finished=self.finished() and not self.stopped)
        if self.stopped and acc.is_main_process:
            print(f"dist_train: stopped by signal at step {p.step}; checkpoint saved, continue with --resume auto",
                  flush=True)
        acc.end_training()
        return {**metrics, "step": p.step, "output": str(self.out), "stopped": self.stopped,
                "is_main": acc.is_main_process}
