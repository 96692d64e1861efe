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
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset
from accelerate import Accelerator
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.utils.model_ema import ModelEmaV3

from dist_train.config import Config, parse_duration
from dist_train.data.device import BatchPrep
from dist_train.data.loaders import (EvalLoader, TrainLoader, build_eval_loader, build_train_loader, check_split_shards,
                                     sampler_weights)
from dist_train.data.plan import decode_done, encode_done
from dist_train.errors import same_on_every_rank
from dist_train.infer.accel import make_accelerator
from dist_train.infer.tta import parse_tta
from dist_train.model.build import data_config, describe_weights
from dist_train.model.recompute import KeepRunningStats
from dist_train.model.stages import count_params
from dist_train.shardset.format import class_names, cv_splits, empty_classes, label_counts, load_info, split_info
from dist_train.tasks import Criterion, Task, task_for

from .checkpoint import Checkpointer, Progress, check_resume_compatible, read_progress
from .elastic import relayout
from .evaluator import Evaluator
from .parts import augment_config, best_records, create_run_model, global_batch, process_setup, run_config
from .guard import StepGuard, out_of_memory_hint
from .logging import Meter, ProgressBar, SampleLog, broadcast_buffers, start_lines, write_summary
from .optim import build_optimizer, build_scheduler, schedule_time
from .results import Results, finished_already, loss_label, run_finished, stop_line
from .stager import Stager
from .runfolder import open_run
from .trackers import check_trackers, stop_trackers, tracker_names


class Trainer:
    """Build with a Config; pass any part to use it instead of building it."""

    def __init__(self, cfg: Config, *, accelerator: Accelerator | None = None, model: torch.nn.Module | None = None,
                 train_loader: Any = None, val_loader: Any = None, criterion: Criterion | None = None) -> None:
        self.cfg = run_config(cfg)
        self._given = dict(accelerator=accelerator, model=model, train_loader=train_loader, val_loader=val_loader,
                           criterion=criterion)
        self.stop_reason: str | None = None  # signal, time-limit, patience
        self.batches_seen = 0

    # ------------------------------------------------------------------ building
    def build_accelerator(self) -> Accelerator:
        c = self.cfg
        return make_accelerator(c.runtime.mixed_precision, force_cpu=c.runtime.debug, dist_timeout=c.runtime.dist_timeout,
                                log_with=tracker_names(c.runtime.log_with), project_dir=c.checkpoint.output)

    def build_model(self) -> torch.nn.Module:
        return create_run_model(self.task, self.cfg, len(self.class_names))

    def _loader_kw(self) -> dict:
        acc = self.acc
        return dict(aug=self.aug, batch_size=self.cfg.optim.batch_size, workers=self.cfg.data.workers,
                    world_size=acc.num_processes, rank=acc.process_index, pin_memory=acc.device.type == "cuda",
                    gpu_decode=self.cfg.data.gpu_decode, device=acc.device)

    def build_train_loader(self) -> TrainLoader:
        d = self.cfg.data
        weights = sampler_weights(d.sampler, label_counts(self.info, self.train_split), len(self.class_names))
        return build_train_loader(d.data, self.info, self.train_split, seed=self.cfg.runtime.seed,
                                  target_fn=self.task.target_fn(self.cfg.task, self.info), class_weights=weights,
                                  **self._loader_kw())

    def build_val_loader(self) -> EvalLoader | None:
        d = self.cfg.data
        return build_eval_loader(d.data, self.info, self.val_split, **self._loader_kw()) if self.val_split else None

    def build_criterion(self) -> Criterion:
        return self.task.criterion(self.cfg.task, self.info, self.train_split, len(self.class_names),
                                   self.acc.device)

    def build_prep(self, dcfg: dict) -> BatchPrep:
        a, acc = self.cfg.augment, self.acc
        mixup = (Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=self.cfg.task.smoothing,
                       num_classes=len(self.class_names)) if a.mixup > 0 or a.cutmix > 0 else None)
        erase = RandomErasing(a.reprob, mode="pixel", device=acc.device.type) if a.reprob > 0 else None
        return BatchPrep(acc.device, dcfg["mean"], dcfg["std"], self.cfg.model.channels_last, mixup, erase)

    def build_ema(self, model: torch.nn.Module) -> ModelEmaV3 | None:
        """timm's EMA of every parameter and buffer, outside DDP; None without --model-ema."""
        m = self.cfg.model
        return ModelEmaV3(model, decay=m.model_ema_decay, use_warmup=m.model_ema_warmup) if m.model_ema else None

    def build_guard(self) -> StepGuard:
        r = self.cfg.runtime
        limit = parse_duration(r.time_limit) if r.time_limit else None
        return StepGuard(r.max_bad_steps, r.max_bad_fraction, time_limit=limit)

    def _part(self, name: str) -> Any:
        given = self._given[name]
        return given if given is not None else getattr(self, f"build_{name}")()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Check the input and build everything (every rank the same: one line from the main
        process), then write the run folder's first files and start the trackers."""
        self.guard = self.build_guard()  # first: the time budget starts now
        with same_on_every_rank():
            self._checked_setup()
        if self.resume_from is not None and self.finished():
            return  # nothing to resume: nothing written (train() says so)
        open_run(acc := self.acc, self.cfg, self.class_names)
        self.meter = Meter(acc.device, len(self.class_names))
        self.log = Results(acc, self.out, loss_label(self.cfg), since_step=self.progress.step)
        self.sample_log = SampleLog(self.cfg.runtime.log_samples) if self.cfg.runtime.log_samples else None
        if acc.is_main_process:
            self._print_start()
            if relabel := self.task.describe_targets(self.cfg.task, self.cfg.data.data, self.info, self.train_split):
                print(relabel, flush=True)  # --relabel: how many labels it changed
        total = self.cfg.optim.epochs * self.steps_per_epoch
        self.bar = ProgressBar(acc, min(self.cfg.runtime.max_steps or total, total), self.progress.step,
                               self.cfg.runtime.log_every)

    def _checked_setup(self) -> None:
        """Accelerator, model, optimizer, schedule and loaders; resume. Writes nothing."""
        self._read_data()
        self.acc = acc = self._part("accelerator")
        self.checkpointer = Checkpointer(self.out, self.cfg.checkpoint.keep_checkpoints,
                                         self.cfg.checkpoint.checkpoint_every)
        self.resume_from = self.checkpointer.resume_path(self.cfg.checkpoint.resume, str(self.out), acc)
        if self.resume_from is not None:
            check_resume_compatible(self.resume_from, self.cfg.model.model, self.class_names, self.cfg.task.head,
                                    self.cfg.model.img_size)
        self.global_batch = global_batch(self.cfg, acc.num_processes, self.n_train, self.train_split)
        process_setup(acc, self.cfg)
        self._build_model_and_data()
        self.progress = Progress()
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)  # a tensor state dict, loaded with weights_only
        if self.resume_from is not None:
            self.progress = read_progress(self.resume_from)
            self._enter_stage(self.progress.stage)  # groups must match before loading
            self.checkpointer.load(acc, self.resume_from, self.optimizer)  # verified; refused if it runs code
            self._adopt_layout()
        else:
            self._enter_stage(self.stager.stage_at(0))
        check_trackers(acc, self.cfg)

    def _read_data(self) -> None:
        d = self.cfg.data
        if d.secure and "://" in d.data:  # webdataset's secure mode: no pipe:, no URL rewriting
            os.environ["WDS_SECURE"] = "1"
            webdataset.utils.enforce_security = True
        self.info, self.train_split, self.val_split = cv_splits(load_info(d.data), d.train_split, d.val_split, d.fold)
        self.n_train = split_info(self.info, self.train_split).num_samples
        check_split_shards(d.data, self.info, [self.train_split, self.val_split])  # before anything is written
        self.class_names = class_names(self.info)
        self.task: Task = task_for(self.info)
        self.task.check(self.cfg.task, self.info)
        self.info = self.task.training_info(self.cfg.task, d.data, self.info, self.train_split)
        self.val_tta = parse_tta(self.cfg.augment.val_tta, "--val-tta")
        self.out = Path(self.cfg.checkpoint.output)

    def _build_model_and_data(self) -> None:
        cfg = self.cfg
        model = self._part("model")
        dcfg = data_config(model)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.model.compile:
            model.compile()  # in place, before DDP wraps it; state_dict keys stay plain
        self.model = model
        self.keep_stats = KeepRunningStats(cfg.model.grad_checkpointing)  # BN updated once, not twice
        self.ema = self.build_ema(model)
        self.stager = Stager(cfg.stages, cfg.optim.epochs, model)
        self.optimizer = build_optimizer(cfg.optim, cfg.stages, model)
        self.aug = augment_config(cfg, dcfg)
        self.train_loader = self._part("train_loader")
        self.val_loader = self._part("val_loader")
        for loader in (self.train_loader, self.val_loader):
            if hasattr(loader, "start"):
                loader.start()  # workers forked before DDP's first collective (TrainLoader.start)
        full = self.train_loader.plan(0).batches_per_rank  # a whole epoch's batches, every rank
        self.batches = min(full, cfg.runtime.debug_steps) if cfg.runtime.debug else full
        self.steps_per_epoch = math.ceil(self.batches / cfg.optim.grad_accum_steps)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer)
        self.criterion = self._part("criterion")
        self.prep = self.build_prep(dcfg)
        export, meta = best_records(cfg, self.aug, dcfg)
        self.evaluator = Evaluator(self.val_loader, every=cfg.runtime.eval_every, task=self.task,
                                   class_names=self.class_names, out=self.out, prep=BatchPrep(
                                       self.acc.device, dcfg["mean"], dcfg["std"], cfg.model.channels_last),
                                   export=export, meta=meta, tta=self.val_tta,
                                   limit=cfg.runtime.debug_steps if cfg.runtime.debug else None,
                                   plots=cfg.runtime.plots)

    def _enter_stage(self, stage: int) -> None:
        self.model, self.optimizer = self.stager.enter(self.acc, self.model, self.optimizer, stage, self.progress)

    def _print_start(self) -> None:
        st, m = self.stager, self.cfg.model
        weights = describe_weights(m.model, len(self.class_names), pretrained=m.pretrained,
                                   pretrained_path=m.pretrained_path, head=self.cfg.task.head)
        print(start_lines(self.acc, dict(
            model=m.model, weights=weights, params=count_params(self.model),
            trainable=count_params(self.model, st.trainable),
            global_batch=self.global_batch, batches=self.batches, steps_per_epoch=self.steps_per_epoch,
            train_samples=self.n_train, shards=len(split_info(self.info, self.train_split).filenames),
            shards_per_rank=self.train_loader.shards_per_rank, workers=self.cfg.data.workers,
            output=self.out, resumed_from=self.resume_from,  # stored labels: relabelled ones are counted by the task
            empty_classes=[] if self.task.target_fn(self.cfg.task, self.info) else empty_classes(self.info, self.train_split),
            validation=self.val_split and f"{self.val_split} ({split_info(self.info, self.val_split).num_samples} samples)")))
        print("\n".join(st.summary(self.model)), flush=True)

    # ------------------------------------------------------------------ the loop
    def finished(self) -> bool:
        return run_finished(self.progress, self.cfg)

    def train(self) -> dict:
        """Train per the config; returns the last evaluation's metrics, the step and the output folder."""
        self.setup()
        if self.resume_from is not None and self.finished():
            return finished_already(self.acc, self.progress, self.cfg, self.resume_from)
        p, o, metrics = self.progress, self.cfg.optim, {}
        try:  # closed on every way out, so that an error line starts its own line
            with self.guard.ctrl_c_stops():  # Ctrl-C: the same clean stop as SIGTERM, with a checkpoint
                while not self.finished() and self.stop_reason is None:
                    self.begin_epoch()
                    for batches in self.step_batches():
                        with out_of_memory_hint(o.batch_size, self.cfg.model.img_size, self.acc.device):
                            self.train_step(batches)
                        end_of_epoch = p.batch >= self.batches
                        if self.evaluator.should_evaluate(p.step, end_of_epoch):
                            metrics = self.evaluate(end_of_epoch)
                        if end_of_epoch:
                            p.epoch, p.batch, p.samples, p.plan = p.epoch + 1, 0, 0, None
                        stop = self.stop_reason is not None or self.finished()
                        self._save(force=stop or end_of_epoch)
                        if stop or end_of_epoch:
                            break
        except BaseException:
            stop_trackers(self.acc, failed=True)  # an MLflow run that failed is not marked FINISHED
            raise
        finally:
            self.bar.close()
        return self.end(metrics)

    def _layout(self) -> dict:
        return {"world": self.acc.num_processes, "workers": max(1, self.cfg.data.workers),
                "batch": self.cfg.optim.batch_size}

    def _adopt_layout(self) -> None:
        relayout(self.progress, self._layout(), self.train_loader, self.cfg.runtime.seed, self.cfg.data.sampler,
                 self.resume_from)

    def begin_epoch(self) -> None:
        p = self.progress
        self._enter_stage(self.stager.stage_at(p.epoch))
        done = decode_done((p.plan or {}).get("done"), self.train_loader.num_samples)
        self.train_loader.set_epoch(p.epoch, skip_batches=p.batch, done=done)
        plan = self.train_loader.plan(p.epoch, done)
        self._delivered_before = 0 if done is None else int(done.sum())
        self._remaining = len(plan.remaining)
        self.batches = min(plan.batches_per_rank, self.cfg.runtime.debug_steps) if self.cfg.runtime.debug \
            else plan.batches_per_rank
        p.plan = {**self._layout(), "done": encode_done(done)}
        self.stager.train_mode(self.model, self.acc)
        self.guard.watch(self.model)

    def step_batches(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The epoch's remaining batches, grouped per optimizer step (--grad-accum-steps; the
        epoch's last group may be shorter)."""
        p, group = self.progress, []
        for batch in self.meter.timed(self.train_loader):
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
        for i, (images, targets, keys) in enumerate(batches):
            self.meter.count(targets)
            x, y = self.prep.train(images, targets)
            if i == 0 and p.step == 0 and p.batch == 0:
                self._debug_first_batch(x, targets)
            sync = i == len(batches) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                with acc.autocast():
                    loss = self.criterion(model(x), y)
                with self.keep_stats(model):
                    acc.backward(loss / len(batches))
            finite = torch.isfinite(loss.detach())
            nonfinite |= ~finite
            self.meter.add(loss.detach(), finite, x.shape[0])
        p.batch += len(batches)
        p.samples = self._delivered_before + min(p.batch * self.cfg.optim.batch_size * acc.num_processes,
                                                 self._remaining)
        self.batches_seen += len(batches)
        skip, reason = self.guard.check(acc, nonfinite, p.step, trained=p.updates > 0)
        self.stop_reason = self.stop_reason or reason
        lr = self.optimizer.param_groups[-1]["lr"]
        if skip:
            self.guard.restore()
        else:
            lr = self._optimizer_step()
        if self.sample_log is not None:
            self.sample_log.write(p.epoch, p.step, acc.process_index, lr, [k for b in batches for k in b[2]])
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        self.bar.step(p.step, loss, self.optimizer.param_groups[-1]["lr"], self.meter.images_per_s(acc.num_processes))
        return loss.detach()

    def _optimizer_step(self) -> float:
        """Clip, step, advance the schedule; returns the LR the step used (the head's group)."""
        acc, p = self.acc, self.progress
        if self.cfg.optim.clip_grad:
            acc.clip_grad_norm_([q for q in self.model.parameters() if q.requires_grad], self.cfg.optim.clip_grad)
        self.stager.set_warmup(self.optimizer, p)
        lr = self.optimizer.param_groups[-1]["lr"]
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: no update was made
            p.updates += 1
            if self.ema is not None:
                raw = acc.unwrap_model(self.model)
                if acc.num_processes > 1:
                    broadcast_buffers(raw)  # each rank's BatchNorm saw its own batch: average rank 0's
                self.ema.update(raw, step=p.step + 1)
        self.scheduler.step_update(schedule_time(p.epoch, p.samples, self.train_loader.num_samples))
        return lr

    def _debug_first_batch(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        if self.cfg.runtime.debug and self.acc.is_main_process:
            hist = torch.bincount(targets, minlength=len(self.class_names)).tolist()
            print(f"debug: images {tuple(x.shape)} {x.dtype}, targets {tuple(targets.shape)}, label histogram {hist}")

    def evaluate(self, end_of_epoch: bool = False) -> dict:
        """One `metrics.jsonl` line: training stats since the last one, then validation (and best/)."""
        acc, p, world = self.acc, self.progress, self.acc.num_processes
        bad = int(acc.reduce(torch.tensor(self.train_loader.bad_samples, device=acc.device), "sum").item())
        m = {"epoch": p.epoch, "step": p.step, "lr": self.optimizer.param_groups[-1]["lr"],
             "train_loss": self.meter.train_loss(acc), "images_per_s": self.meter.images_per_s(world),
             "data_wait": self.meter.data_wait(acc),
             "trainable_params": count_params(self.model, self.stager.trainable), "stage": self.stager.current,
             "bad_samples": bad, "train_class_counts": self.meter.class_counts(acc)}
        self.guard.check_bad_samples(bad, p.batch * self.cfg.optim.batch_size * world, p.epoch)
        best = p.best_f1
        m.update(self.evaluator.validate(self.model, acc, p, ema=None if self.ema is None else self.ema.module,
                                         end_of_epoch=end_of_epoch))
        if "val_macro_f1" in m:
            p.stale = 0 if p.best_f1 > best else p.stale + 1
            if self.cfg.runtime.patience and p.stale >= self.cfg.runtime.patience:
                self.stop_reason = "patience"
        self.log.write(m, p.step, p.best)
        self.meter.reset()
        self.stager.train_mode(self.model, acc)
        return m

    def _save(self, force: bool) -> None:
        started = time.monotonic()
        if self.checkpointer.save(self.acc, self.progress, force=force) is not None:
            self.guard.note_save(time.monotonic() - started)

    def end(self, metrics: dict) -> dict:
        """summary.json, the stop line, the trackers closed; the result `train` returns."""
        acc, p, why = self.acc, self.progress, self.stop_reason
        finished = (self.finished() and why is None) or why == "patience"  # nothing left to resume
        write_summary(acc, self.model, p, self.batches_seen, self.out, finished=finished, stopped_by=why,
                      ema=None if self.ema is None else self.ema.module)
        if acc.is_main_process:
            if self.log.rows:
                print(self.log.table(p.best), flush=True)
            if why is not None:
                print(stop_line(why, p, self.cfg.runtime.time_limit), flush=True)
        acc.end_training()
        return {**metrics, "step": p.step, "epoch": p.epoch, "best": p.best, "output": str(self.out),
                "stopped": why in ("signal", "time-limit"), "is_main": acc.is_main_process}
