"""The training loop and what it needs around it: accelerator, checkpoints, evaluation.

The loop (`train`) is the part a reader should hold in their head: build everything, then for
each epoch stream whole batches from the shard loader, step, and every so often evaluate and
checkpoint. The data loader is deliberately NOT passed through `accelerator.prepare`: it shards
the stream itself (every rank the same number of batches), and Accelerate would shard it again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import timedelta
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import webdataset
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

from . import labels as L
from .config import Config, save_config
from .data import AugmentConfig, build_eval_loader, build_train_loader, load_info, normalize, split_info
from .errors import RunFailed, UserError, atomic_write_json
from .metrics import (
    class_weights_from_counts,
    f1_loss,
    focal_loss,
    save_confusion,
    summarize,
)
from .model import create_model, data_config, multi_head_loss, save_for_timm
from .shard import usable_cpus
from .unfreeze import (
    apply_trainable,
    count_params,
    freeze_bn,
    param_groups,
    parse_schedule,
    stage_for_epoch,
    trainable_names,
)

CKPT_PREFIX = "step-"


# ----------------------------------------------------------------------------- set-up
def make_accelerator(cfg: Config) -> Accelerator:
    """Accelerator for this launch; a CPU-only multi-process launch must become a gloo group.

    Without CUDA, Accelerate treats each of `--num_processes 2` as its own single-process run
    unless it is told `cpu=True`, so two "ranks" would silently train alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = (world > 1 or cfg.debug) and not torch.cuda.is_available()
    precision = "no" if cfg.debug else cfg.mixed_precision
    project = ProjectConfiguration(project_dir=cfg.output, logging_dir=os.path.join(cfg.output, "tb"))
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))
    acc = Accelerator(cpu=cpu, mixed_precision=precision, log_with="tensorboard", project_config=project,
                      kwargs_handlers=[pg])
    if world > 1 and acc.num_processes != world:
        raise UserError(f"WORLD_SIZE={world} but the process group has {acc.num_processes} processes")
    return acc


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint so a resume continues mid-epoch."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed on each rank
    step: int = 0  # optimizer steps taken
    updates: int = 0  # optimizer steps not skipped by the fp16 scaler (drive the LR schedule)
    best_f1: float = -1.0
    stage: int = 0
    stage_start: int = 0  # step at which the current stage began (for --unfreeze-warmup)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class Checkpoints:
    """`OUT/checkpoints/step-XXXXXXXX/`: written to a temporary folder, renamed, newest K kept."""

    def __init__(self, output: str, keep: int) -> None:
        self.root = Path(output) / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "progress.json").is_file())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, acc: Accelerator, progress: Progress) -> Path:
        final = self.root / f"{CKPT_PREFIX}{progress.step:08d}"
        tmp = self.root / f".tmp-{CKPT_PREFIX}{progress.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / "progress.json", progress.state_dict())  # marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final


def read_progress(ckpt: Path) -> Progress:
    p = Progress()
    p.load_state_dict(json.loads((ckpt / "progress.json").read_text()))
    return p


def resolve_resume(cfg: Config, ckpts: Checkpoints) -> Path | None:
    if cfg.resume == "none":
        if ckpts.complete():
            raise UserError(
                f"--output {cfg.output} already holds checkpoints: pass --resume auto to continue it, "
                "or choose a new --output"
            )
        return None
    if cfg.resume == "auto":
        return ckpts.latest()
    path = Path(cfg.resume)
    if not (path / "progress.json").is_file():
        raise UserError(f"--resume {path}: not a complete checkpoint (no progress.json)")
    return path


def check_resume_compatible(ckpt: Path, cfg: Config, num_classes: int) -> None:
    """Refuse a checkpoint of another model or class count before loading tensors into it."""
    run_json = ckpt.parent.parent / "run.json"  # RUN/checkpoints/step-N -> RUN/run.json
    if not run_json.is_file():
        return
    saved = json.loads(run_json.read_text())
    if saved.get("model") != cfg.model or saved.get("num_classes") != num_classes or saved.get("head") != cfg.head:
        raise UserError(
            f"--resume {ckpt}: checkpoint is {saved.get('model')} with {saved.get('num_classes')} classes "
            f"({saved.get('head')} head), this run is {cfg.model} with {num_classes} ({cfg.head})"
        )


# ----------------------------------------------------------------------------- loss
def build_criterion(cfg: Config, info: dict, num_classes: int, device: torch.device) -> Callable:
    """Loss for (model output, targets); soft targets when Mixup/CutMix is on."""
    weight = None
    if cfg.class_weights == "auto":
        counts = info.get("label_counts", {}).get(cfg.train_split)
        if not counts:
            raise UserError(f"--class-weights auto: _info.json has no label_counts for split '{cfg.train_split}'")
        weight = class_weights_from_counts(counts, num_classes).to(device)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.loss != "ce" or cfg.head == "multi":
            raise UserError("--mixup/--cutmix work with --loss ce and --head single only")
        soft = SoftTargetCrossEntropy()
        return lambda out, y: soft(out, y)
    if cfg.head == "multi":
        return lambda out, y: multi_head_loss(out, y, smoothing=cfg.smoothing)
    if cfg.loss == "focal":
        return lambda out, y: focal_loss(out, y, weight=weight, smoothing=cfg.smoothing)
    if cfg.loss == "f1":
        return lambda out, y: f1_loss(out, y, num_classes)
    return lambda out, y: F.cross_entropy(out, y, weight=weight, label_smoothing=cfg.smoothing)


# ----------------------------------------------------------------------------- evaluation
def gather_varlen(acc: Accelerator, t: torch.Tensor) -> torch.Tensor:
    """Gather tensors whose first dimension differs per rank, without padding rows in the result."""
    if acc.num_processes == 1:
        return t
    n = torch.tensor([t.shape[0]], device=acc.device)
    sizes = acc.gather(n).tolist()
    padded = acc.pad_across_processes(t, dim=0)
    allp = acc.gather(padded)
    width = padded.shape[0]
    return torch.cat([allp[i * width : i * width + s] for i, s in enumerate(sizes)])


@torch.no_grad()
def infer(model: torch.nn.Module, loader: Any, acc: Accelerator, mean: tuple, std: tuple, *,
          channels_last: bool = False, tta: bool = False, limit: int | None = None) -> dict:
    """Logits for every sample of `loader` across all ranks, each exactly once.

    Returns numpy arrays `logits`, `target`, `order` and the list `key`, sorted by `order`
    (the sample's position in its split) so callers see the source order.
    """
    model.eval()
    logits, targets, orders, keys = [], [], [], []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x = normalize(batch["image"].to(acc.device, non_blocking=True), mean, std, channels_last)
        with acc.autocast():
            out = model(x).float()
            if tta:
                out = (out + model(torch.flip(x, dims=[3])).float()) / 2
        logits.append(out)
        targets.append(batch["target"].to(acc.device))
        orders.append(batch["order"].to(acc.device))
        keys.extend(batch["key"])
    num_classes = acc.unwrap_model(model).num_classes
    local = {
        "logits": torch.cat(logits) if logits else torch.zeros(0, num_classes, device=acc.device),
        "target": torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=acc.device),
        "order": torch.cat(orders) if orders else torch.zeros(0, dtype=torch.long, device=acc.device),
    }
    out = {k: gather_varlen(acc, v).cpu().numpy() for k, v in local.items()}
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        keys = gather_object(keys)
    idx = np.argsort(out["order"], kind="stable")
    out = {k: v[idx] for k, v in out.items()}
    out["key"] = [keys[i] for i in idx]
    return out


def evaluate(model, loader, acc, mean, std, cfg: Config, class_names: list[str], mask_tasks: bool,
             out_dir: Path | None, limit: int | None = None) -> dict:
    """Validation metrics over the whole split; confusion matrix files written on the main process."""
    res = infer(model, loader, acc, mean, std, channels_last=cfg.channels_last, limit=limit)
    logits, target = torch.from_numpy(res["logits"]), torch.from_numpy(res["target"])
    labeled = target >= 0
    val_loss = F.cross_entropy(logits[labeled], target[labeled]).item() if labeled.any() else float("nan")
    preds = logits.argmax(1).numpy()
    stats = summarize(preds[labeled.numpy()], res["target"][labeled.numpy()], len(class_names), class_names, mask_tasks)
    if out_dir is not None and acc.is_main_process:
        save_confusion(stats["confusion"], class_names, out_dir / "confusion.csv", out_dir / "confusion.png")
    metrics = {"val_loss": val_loss, "val_acc": stats["acc"], "val_macro_f1": stats["macro_f1"], "val_samples": int(len(preds))}
    for task in ("mask_acc", "gender_acc", "age_acc"):
        if task in stats:
            metrics[f"val_{task}"] = stats[task]
    return metrics


# ----------------------------------------------------------------------------- staging
class Stager:
    """Applies the unfreezing schedule; rebuilds DDP whenever the trainable set changes.

    DDP registers gradient hooks only for parameters that require grad when it is built, so a
    stage change unwraps the model, sets `requires_grad`, and prepares it again. The optimizer
    holds every layer group from the start: a frozen parameter never gets a gradient, hence no
    optimizer state and no update, and unfreezing needs no optimizer surgery.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module) -> None:
        self.cfg = cfg
        self.stages = parse_schedule(cfg.unfreeze)
        self.names = [trainable_names(model, s.groups) for s in self.stages]
        self.current: int | None = None

    def stage_at(self, epoch: int) -> int:
        return stage_for_epoch(self.stages, epoch, self.cfg.epochs)

    def enter(self, acc: Accelerator, model: torch.nn.Module, stage: int, progress: "Progress") -> torch.nn.Module:
        """Make `stage` current: set the trainable set and rebuild the DDP wrapper over it."""
        if stage == self.current:
            return model
        raw = acc.unwrap_model(model)
        # Accelerate remembers every prepared model and would save each one; keep only the live one.
        acc._models[:] = [m for m in acc._models if acc.unwrap_model(m) is not raw]
        apply_trainable(raw, self.names[stage], train_bn=self.cfg.train_bn)
        if stage != progress.stage:
            progress.stage, progress.stage_start = stage, progress.step
        self.current = stage
        return acc.prepare(raw)

    def set_warmup(self, optimizer: Any, progress: "Progress") -> None:
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
            n = s.epochs if s.epochs is not None else self.cfg.epochs - start
            lines.append(f"  stage {i}: epochs {start}-{start + n - 1} train {s.groups} "
                         f"({count_params(model, self.names[i]):,} params)")
            start += n
        return lines


# ----------------------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything a training run is built from, so that `train` is only the loop."""

    cfg: Config
    acc: Accelerator
    info: dict
    class_names: list[str]
    mask_tasks: bool
    out: Path
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    stager: Stager
    progress: Progress
    ckpts: Checkpoints
    train_loader: Any
    val_loader: Any
    criterion: Callable
    mixup: Any
    erase: Any
    mean: tuple
    std: tuple
    crop_pct: float
    batches: int  # per epoch on every rank (fewer with --debug)
    steps_per_epoch: int
    resume_from: Path | None


def build_run(cfg: Config) -> Run:
    """Check the input, then build accelerator, model, optimizer, schedule and loaders; resume."""
    if cfg.debug:
        cfg.workers = 0
        if cfg.output is None:
            cfg.output = tempfile.mkdtemp(prefix="dist_train-debug-")
    if cfg.output is None:
        raise UserError("--output is required (the run folder)")
    if cfg.secure and "://" in cfg.data:  # webdataset's secure mode: no pipe:, no URL rewriting
        os.environ["WDS_SECURE"] = "1"
        webdataset.utils.enforce_security = True
    info = load_info(cfg.data)
    n_train = split_info(info, cfg.train_split)["num_samples"]
    if cfg.val_split:
        split_info(info, cfg.val_split)
    class_names = list(info["classes"])
    num_classes = len(class_names)
    mask_tasks = info.get("layout") in ("mask", "mask-eval") and num_classes == L.NUM_CLASSES
    if cfg.head == "multi" and not mask_tasks:
        raise UserError("--head multi needs mask-layout shards (18 classes)")

    acc = make_accelerator(cfg)
    ckpts = Checkpoints(cfg.output, cfg.keep_checkpoints)
    resume_from = resolve_resume(cfg, ckpts)
    if resume_from is not None:
        check_resume_compatible(resume_from, cfg, num_classes)
    global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum_steps
    if global_batch > n_train:
        raise UserError(f"global batch {global_batch} (batch {cfg.batch_size} x {acc.num_processes} processes x "
                        f"{cfg.grad_accum_steps} accumulation) is larger than split '{cfg.train_split}' ({n_train} samples)")
    set_seed(cfg.seed, device_specific=True)
    torch.autograd.set_detect_anomaly(cfg.debug)
    if acc.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Loader workers and ranks share the cores; oversubscribed OpenMP threads slow CPU runs 10x.
        torch.set_num_threads(max(1, usable_cpus() // acc.num_processes - cfg.workers))
    out = Path(cfg.output)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        atomic_write_json(out / "run.json", {"model": cfg.model, "num_classes": num_classes, "head": cfg.head,
                                             "classes": class_names})
    acc.init_trackers("tb", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})

    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained and not cfg.pretrained_path,
                         pretrained_path=cfg.pretrained_path, img_size=cfg.img_size, drop_rate=cfg.drop,
                         drop_path_rate=cfg.drop_path, head=cfg.head)
    dcfg = data_config(model)
    crop_pct = cfg.crop_pct or dcfg["crop_pct"]
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()  # in place, before DDP wraps it; state_dict keys stay plain
    stager = Stager(cfg, model)
    optimizer = build_optimizer(cfg, model)

    aug = augment_config(cfg, dcfg)
    loader_kw = dict(aug=aug, batch_size=cfg.batch_size, workers=cfg.workers, world_size=acc.num_processes,
                     rank=acc.process_index, pin_memory=acc.device.type == "cuda", gpu_decode=cfg.gpu_decode,
                     device=acc.device)
    train_loader = build_train_loader(cfg.data, info, cfg.train_split, seed=cfg.seed,
                                      target_fn=make_target_fn(cfg, info), **loader_kw)
    val_loader = build_eval_loader(cfg.data, info, cfg.val_split, **loader_kw) if cfg.val_split else None
    batches = min(len(train_loader), cfg.debug_steps) if cfg.debug else len(train_loader)
    steps_per_epoch = math.ceil(batches / cfg.grad_accum_steps)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    optimizer = acc.prepare(optimizer)
    progress = Progress()
    acc.register_for_checkpointing(progress)
    if resume_from is not None:
        progress.load_state_dict(read_progress(resume_from).state_dict())
        model = stager.enter(acc, model, progress.stage, progress)  # groups must match before loading
        acc.load_state(str(resume_from))
    else:
        model = stager.enter(acc, model, stager.stage_at(0), progress)
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                   num_classes=num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
    erase = RandomErasing(cfg.reprob, mode="pixel", device=acc.device.type) if cfg.reprob > 0 else None
    run = Run(cfg, acc, info, class_names, mask_tasks, out, model, optimizer, scheduler, stager, progress, ckpts,
              train_loader, val_loader, build_criterion(cfg, info, num_classes, acc.device), mixup, erase,
              tuple(dcfg["mean"]), tuple(dcfg["std"]), crop_pct, batches, steps_per_epoch, resume_from)
    if acc.is_main_process:
        print_start(run, global_batch, n_train)
    return run


def print_start(run: Run, global_batch: int, n_train: int) -> None:
    cfg, acc, st = run.cfg, run.acc, run.stager
    print(f"dist_train: world size {acc.num_processes} ({acc.distributed_type.value}), device {acc.device}, "
          f"precision {acc.mixed_precision}\n"
          f"  model {cfg.model}: {count_params(run.model):,} params, "
          f"{count_params(run.model, st.names[st.current]):,} trainable\n"
          f"  global batch {global_batch}, {run.batches} batches / {run.steps_per_epoch} steps per epoch, "
          f"{n_train} train samples, {len(run.info['splits'][cfg.train_split]['filenames'])} shards, "
          f"{run.train_loader.shards_per_rank} per rank ({acc.num_processes} ranks x {max(1, cfg.workers)} workers)\n"
          f"  output {run.out}" + (f"\n  resumed from {run.resume_from}" if run.resume_from else ""))
    print("\n".join(st.summary(run.model)), flush=True)


class Meter:
    """Training loss and throughput since the last evaluation (kept on the device: no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.n, self.images, self.t0 = 0, 0, time.time()

    def add(self, loss: torch.Tensor, finite: torch.Tensor, images: int) -> None:
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.n += 1
        self.images += images

    def images_per_s(self, world: int) -> float:
        return self.images * world / max(time.time() - self.t0, 1e-9)


def evaluate_and_log(run: Run, meter: Meter) -> dict:
    """One `metrics.jsonl` line: training stats since the last one, validation, best/ if improved."""
    cfg, acc, p, model = run.cfg, run.acc, run.progress, run.model
    m = {"epoch": p.epoch, "step": p.step, "lr": run.optimizer.param_groups[-1]["lr"],
         "train_loss": acc.reduce(meter.loss_sum, reduction="mean").item() / max(meter.n, 1),
         "images_per_s": meter.images_per_s(acc.num_processes),
         "trainable_params": count_params(model, run.stager.names[run.stager.current]), "stage": run.stager.current,
         "bad_samples": int(acc.reduce(torch.tensor(run.train_loader.bad_samples, device=acc.device), "sum").item())}
    if m["bad_samples"] > cfg.max_bad_fraction * max(p.batch, 1) * cfg.batch_size * acc.num_processes:
        raise RunFailed(f"{m['bad_samples']} undecodable samples in epoch {p.epoch} exceed --max-bad-fraction "
                        f"{cfg.max_bad_fraction}: check the shards with `python -m dist_train.shard --inspect`")
    if run.val_loader is not None:
        m.update(evaluate(model, run.val_loader, acc, run.mean, run.std, cfg, run.class_names, run.mask_tasks,
                          run.out, limit=cfg.debug_steps if cfg.debug else None))
        if acc.is_main_process and m["val_macro_f1"] > p.best_f1:
            p.best_f1 = m["val_macro_f1"]
            save_for_timm(acc.unwrap_model(model), run.out / "best", model_name=cfg.model,
                          num_classes=len(run.class_names), label_names=run.class_names, img_size=cfg.img_size,
                          crop_pct=run.crop_pct, mean=run.mean, std=run.std,
                          extra={**m, "head": cfg.head, "age_bins": cfg.age_bins})
        p.best_f1 = float(acc.reduce(torch.tensor(p.best_f1, device=acc.device), "max").item())
    if acc.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
    acc.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=p.step)
    meter.reset()
    model.train()
    freeze_bn(acc.unwrap_model(model), run.stager.names[run.stager.current], cfg.train_bn)
    return m


# ----------------------------------------------------------------------------- the loop
def train(cfg: Config) -> dict:
    """Train per `cfg`; returns the last evaluation's metrics, the step and the output folder."""
    run = build_run(cfg)
    acc, p, optimizer = run.acc, run.progress, run.optimizer
    guard, meter = StepGuard(cfg.max_bad_steps), Meter(acc.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
    metrics: dict = {}
    batches_seen, stopped = 0, False
    total = cfg.epochs * run.steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * run.steps_per_epoch)
    bar = tqdm(total=total, initial=p.step, disable=not acc.is_main_process, dynamic_ncols=True)
    try:  # closed on every way out, so that an error line starts its own line
        while p.epoch < cfg.epochs and not (cfg.max_steps and p.step >= cfg.max_steps) and not stopped:
            run.model = model = run.stager.enter(acc, run.model, run.stager.stage_at(p.epoch), p)
            run.train_loader.set_epoch(p.epoch, skip_batches=p.batch)
            model.train()
            freeze_bn(acc.unwrap_model(model), run.stager.names[run.stager.current], cfg.train_bn)
            buffers = list(model.buffers())  # restored when a step is skipped: BN must not keep its forwards
            snapshot = [b.detach().clone() for b in buffers]
            group_start = p.batch
            for images, targets in run.train_loader:
                if p.batch >= run.batches:
                    break
                images = normalize(images.to(acc.device, non_blocking=True), run.mean, run.std, cfg.channels_last)
                targets = targets.to(acc.device, non_blocking=True)
                if cfg.debug and p.step == 0 and p.batch == 0 and acc.is_main_process:
                    print(f"debug: images {tuple(images.shape)} {images.dtype}, targets {tuple(targets.shape)}, label "
                          f"histogram {torch.bincount(targets, minlength=len(run.class_names)).tolist()}")
                if run.mixup is not None:
                    images, targets = run.mixup(images, targets)
                if run.erase is not None:
                    images = run.erase(images)
                if p.batch == group_start and buffers:
                    torch._foreach_copy_(snapshot, buffers)
                p.batch += 1
                batches_seen += 1
                group = min(cfg.grad_accum_steps, run.batches - group_start)
                sync = p.batch - group_start == group
                with contextlib.nullcontext() if sync else acc.no_sync(model):
                    with acc.autocast():
                        loss = run.criterion(model(images), targets)
                    acc.backward(loss / group)
                finite = torch.isfinite(loss.detach())
                nonfinite |= ~finite
                meter.add(loss.detach(), finite, images.shape[0])
                if not sync:
                    continue
                skip, stopped = guard.check(acc, nonfinite, p.step)
                nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
                if not skip:
                    if cfg.clip_grad:
                        acc.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], cfg.clip_grad)
                    run.stager.set_warmup(optimizer, p)
                    optimizer.step()
                    if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule does not advance
                        p.updates += 1
                        run.scheduler.step_update(p.updates)
                elif buffers:
                    torch._foreach_copy_(buffers, snapshot)
                optimizer.zero_grad(set_to_none=True)
                p.step += 1
                group_start = p.batch
                bar.update(1)
                if p.step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}",
                                    img_s=f"{meter.images_per_s(acc.num_processes):.0f}")
                end_of_epoch = p.batch >= run.batches
                done = bool(cfg.max_steps and p.step >= cfg.max_steps)
                if cfg.eval_every and p.step % cfg.eval_every == 0 and not end_of_epoch:
                    metrics = evaluate_and_log(run, meter)
                if not end_of_epoch and (stopped or done or (cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0)):
                    run.ckpts.save(acc, p)
                if stopped or done or end_of_epoch:
                    break
            if p.batch >= run.batches:
                metrics = evaluate_and_log(run, meter)
                p.epoch, p.batch = p.epoch + 1, 0
                run.ckpts.save(acc, p)
    finally:
        bar.close()
    finished = p.epoch >= cfg.epochs or bool(cfg.max_steps and p.step >= cfg.max_steps)
    write_summary(acc, run.model, p, batches_seen, run.out, finished=finished and not stopped)
    if stopped and acc.is_main_process:
        print(f"dist_train: stopped by signal at step {p.step}; checkpoint saved, continue with --resume auto", flush=True)
    acc.end_training()
    return {**metrics, "step": p.step, "output": str(run.out), "stopped": stopped, "is_main": acc.is_main_process}


def augment_config(cfg: Config, dcfg: dict) -> AugmentConfig:
    """The loaders' transforms from the flags, with the model's crop_pct and mean as defaults."""
    return AugmentConfig(img_size=cfg.img_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
                         aa=cfg.aa, crop_pct=cfg.crop_pct or dcfg["crop_pct"], train_crop=cfg.crop,
                         mean=tuple(dcfg["mean"]))


# timm names of the torch optimizers with a fused kernel on CPU and CUDA: one kernel for all
# parameters instead of a Python loop over them (resnet18 AdamW step on one CPU thread: 6.6 ms
# fused, 25 ms foreach, 50 ms torch's CPU default).
FUSED_OPTS = ("adam", "adamw", "sgd", "momentum", "nesterov")


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm optimizer over every layer group (weight-decay and layer-decay aware)."""
    groups = param_groups(model, {n for n, _ in model.named_parameters()}, weight_decay=cfg.weight_decay,
                          layer_decay=cfg.layer_decay)
    for g in groups:
        g["base_lr_scale"] = g.get("lr_scale", 1.0)
    opt = cfg.opt.lower()
    kw: dict[str, Any] = {"momentum": cfg.momentum} if opt in ("sgd", "momentum", "nesterov") else {}
    if opt in FUSED_OPTS:
        kw["fused"] = True
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


def overfit(cfg: Config) -> dict:
    """Train on N fixed batches: a model and loss that cannot drive this toward 0 have a bug."""
    cfg.debug, cfg.workers = True, 0
    info = load_info(cfg.data)
    num_classes = len(info["classes"])
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    set_seed(cfg.seed)
    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained and not cfg.pretrained_path,
                         pretrained_path=cfg.pretrained_path,
                         img_size=cfg.img_size, head=cfg.head).to(acc.device)
    dcfg = data_config(model)
    optimizer = build_optimizer(cfg, model)
    aug = augment_config(cfg, dcfg)
    loader = build_train_loader(cfg.data, info, cfg.train_split, aug=aug, batch_size=cfg.batch_size, workers=0,
                                world_size=1, rank=0, seed=cfg.seed, target_fn=make_target_fn(cfg, info))
    loader.set_epoch(0)
    fixed = [b for _, b in zip(range(cfg.overfit_batches), loader)]
    criterion = build_criterion(cfg, info, num_classes, acc.device)
    steps = cfg.max_steps or 100
    losses = []
    model.train()
    for i in range(steps):
        images, targets = fixed[i % len(fixed)]
        x = normalize(images.to(acc.device), dcfg["mean"], dcfg["std"], cfg.channels_last)
        loss = criterion(model(x), targets.to(acc.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first = float(np.mean(losses[: len(fixed)]))
    last = float(np.mean(losses[-len(fixed):]))
    floor = cfg.smoothing * math.log(num_classes) + 0.05  # label smoothing keeps the optimum above 0
    ok = last < max(0.1 * first, floor)
    print(f"overfit: {len(fixed)} batches, {steps} steps: loss {first:.4f} -> {last:.4f} "
          + ("falls toward 0 (OK)" if ok else "does NOT fall toward 0: check the model, loss and labels"))
    return {"overfit_ok": ok, "first_loss": first, "last_loss": last, "is_main": True}


def make_target_fn(cfg: Config, info: dict) -> Callable | None:
    """Training labels recomputed at load time: other age bins, corrected persons (mask data)."""
    bins = L.parse_age_bins(cfg.age_bins)
    if tuple(bins) == L.DEFAULT_AGE_BINS and not cfg.relabel:
        return None
    if info.get("layout") != "mask":
        raise UserError("--age-bins/--relabel need mask-layout shards (they recompute labels from person metadata)")
    fixes = L.load_relabel(cfg.relabel) if cfg.relabel else {}
    return functools.partial(L.target_from_meta, bins=bins, fixes=fixes)


def write_summary(acc: Accelerator, model: torch.nn.Module, progress: Progress, batches_seen: int, out: Path,
                  finished: bool) -> None:
    """`summary.json`: per-rank step and batch counts and a hash of every parameter and buffer.

    Under DDP all of them must agree; a difference means ranks diverged, which would otherwise
    go unnoticed until someone compares the weights.
    """
    from accelerate.utils import gather_object

    if acc.num_processes > 1:
        # DDP broadcasts rank 0's buffers at the start of each forward, so after the last training
        # step every rank still holds BatchNorm statistics of its own last batch. Adopt rank 0's, as
        # the next forward would; parameters are left alone: a difference there is real divergence.
        for b in acc.unwrap_model(model).buffers():
            torch.distributed.broadcast(b.data, src=0)
    h = hashlib.sha256()
    for name, t in acc.unwrap_model(model).state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    mine = [{"step": progress.step, "batches": batches_seen, "hash": h.hexdigest()}]
    everyone = gather_object(mine) if acc.num_processes > 1 else mine
    if acc.is_main_process:
        summary = {"finished": finished, "world_size": acc.num_processes, "epoch": progress.epoch, "step": progress.step,
                   "best_val_macro_f1": progress.best_f1,
                   "steps_per_rank": [r["step"] for r in everyone],
                   "batches_per_rank": [r["batches"] for r in everyone],
                   "param_hash_per_rank": [r["hash"] for r in everyone]}
        if len(set(summary["param_hash_per_rank"])) > 1:
            print("dist_train: WARNING: parameters differ across ranks", file=sys.stderr)
        atomic_write_json(out / "summary.json", summary)


class StepGuard:
    """What all ranks must agree on before each optimizer step, in one all-reduce.

    - A non-finite loss on any rank: every rank skips the step (the gradients are dropped);
      `max_bad_steps` in a row stop the run, leaving the last good checkpoint as it was.
    - SIGTERM/SIGUSR1 (as SLURM sends before preemption) on any rank: every rank finishes the
      same step, checkpoints and exits 0. Ranks are signalled at different moments, hence the
      agreement.
    """

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.bad_in_row = 0
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def check(self, acc: Accelerator, nonfinite: torch.Tensor, step: int) -> tuple[bool, bool]:
        """-> (skip this step, stop after it)."""
        flags = torch.stack([nonfinite.float(), torch.tensor(float(self.signalled), device=nonfinite.device)])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        skip, stop = (flags > 0).tolist()
        self.bad_in_row = self.bad_in_row + 1 if skip else 0
        if skip and acc.is_main_process:
            tqdm.write(f"dist_train: non-finite loss at step {step}: step skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.max_bad_steps:
            raise RunFailed(f"{self.bad_in_row} non-finite losses in a row (--max-bad-steps {self.max_bad_steps}) at "
                            f"step {step}: stopped; the newest checkpoint is the last good one (lower --lr or use --clip-grad)")
        return skip, stop
