"""`--overfit-batches N`: train on N fixed batches; a model and loss that cannot drive the loss
toward 0 there have a bug (wrong labels, a broken head, a loss that ignores its input)."""

from __future__ import annotations

import math

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
    """One process, workers 0, fp32, constant LR; prints whether the loss falls toward 0."""
    d, r = cfg.data, cfg.runtime
    info = load_info(d.data)
    task = task_for(info)
    task.check(cfg.task, info)
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
    floor = cfg.task.smoothing * math.log(num_classes) + 0.05  # label smoothing keeps the optimum above 0
    ok = last < max(0.1 * first, floor)
    print(f"overfit: {len(fixed)} batches, {steps} steps: loss {first:.4f} -> {last:.4f} "
          + ("falls toward 0 (OK)" if ok else "does NOT fall toward 0: check the model, loss and labels"))
    return {"overfit_ok": ok, "first_loss": first, "last_loss": last, "is_main": True}
