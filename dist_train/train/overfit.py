"""`--overfit-batches N`: train on N fixed batches; a model and loss that cannot drive the loss
toward its floor there have a bug (wrong labels, a broken head, a loss that ignores its input).

The floor is what the configured loss can reach on those batches at all, found by minimising
it over free logits: with label smoothing s and C classes cross-entropy cannot go below the
entropy of the smoothed target (0.58 for s = 0.1, C = 18), and focal, soft-F1, class-weighted
and multi-head losses have their own floors. The verdict asks whether training closed most of
the gap between the first loss and that floor."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dist_train.config import Config
from dist_train.data.device import BatchPrep
from dist_train.data.loaders import build_train_loader
from dist_train.model.build import data_config
from dist_train.model.recompute import KeepRunningStats
from dist_train.shardset.format import class_names, load_info
from dist_train.tasks import task_for

from .optim import build_optimizer
from .parts import augment_config, create_run_model


def overfit(cfg: Config) -> dict:
    """One process, workers 0, fp32, constant LR; prints whether the loss falls to its floor."""
    d, r = cfg.data, cfg.runtime
    info = load_info(d.data)
    task = task_for(info)
    task.check(cfg.task, info)
    info = task.training_info(cfg.task, d.data, info, d.train_split)
    num_classes = len(class_names(info))
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    set_seed(r.seed)
    model = create_run_model(task, cfg, num_classes).to(acc.device)
    dcfg = data_config(model)
    optimizer = build_optimizer(cfg.optim, cfg.stages, model)
    loader = build_train_loader(d.data, info, d.train_split, aug=augment_config(cfg, dcfg),
                                batch_size=cfg.optim.batch_size, workers=0, world_size=1, rank=0, seed=r.seed,
                                target_fn=task.target_fn(cfg.task, info))
    loader.set_epoch(0)
    fixed = [b for _, b in zip(range(r.overfit_batches), loader)]
    criterion = task.criterion(cfg.task, info, d.train_split, num_classes, acc.device)
    prep = BatchPrep(acc.device, dcfg["mean"], dcfg["std"], cfg.model.channels_last)
    steps = r.max_steps or 100
    losses = []
    keep_stats = KeepRunningStats(cfg.model.grad_checkpointing)
    model.train()
    for i in range(steps):
        images, targets, _ = fixed[i % len(fixed)]
        loss = criterion(model(prep.images(images)), targets.to(acc.device))
        optimizer.zero_grad(set_to_none=True)
        with keep_stats(model):
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = float(np.mean(losses[: len(fixed)])), float(np.mean(losses[-len(fixed):]))
    floor = reachable_floor(criterion, [t.to(acc.device) for _, t, _ in fixed], num_classes)
    ok = falls_to_floor(first, last, floor)
    print(f"overfit: {len(fixed)} batches, {steps} steps: loss {first:.4f} -> {last:.4f} (lowest reachable with this "
          f"loss: {floor:.4f}): " + ("falls to the floor (OK)" if ok else
                                     "does NOT fall toward the floor: check the model, loss and labels"))
    return {"overfit_ok": ok, "first_loss": first, "last_loss": last, "floor": floor, "is_main": True}


def reachable_floor(criterion: Callable, targets: list[torch.Tensor], num_classes: int, steps: int = 300) -> float:
    """The mean over the batches of the lowest loss `criterion` can give for each batch's
    targets, minimised over free (N, C) logits with Adam (a model can at best output those)."""
    floors, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend
    try:
        for y in targets:
            floors.append(_floor(criterion, y, num_classes, steps))
    finally:
        torch.set_num_threads(threads)
    return float(np.mean(floors))


def _floor(criterion: Callable, y: torch.Tensor, num_classes: int, steps: int) -> float:
    """min over z of criterion(z, y), for one batch's targets."""
    z = torch.zeros(len(y), num_classes, device=y.device, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            criterion(z, y).backward()
            opt.step()
    with torch.no_grad():
        return float(criterion(z, y))


def falls_to_floor(first: float, last: float, floor: float, closed: float = 0.9) -> bool:
    """Training closed at least `closed` of the gap between the first loss and the floor."""
    return last - floor <= (1.0 - closed) * max(first - floor, 0.0) + 1e-3
