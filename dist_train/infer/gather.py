"""Inference over a split with every sample counted exactly once across ranks."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from dist_train.data.device import BatchPrep

from .tta import TTA


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
def infer(model: torch.nn.Module, loader: Any, acc: Accelerator, prep: BatchPrep, *, tta: TTA = TTA(),
          limit: int | None = None) -> dict:
    """Logits for every sample of `loader` (an EvalLoader) across all ranks, each exactly once.

    Returns numpy arrays `logits`, `target`, `order` and the list `key`, sorted by `order`
    (the sample's position in its split) so callers see the source order. `tta`: several views
    per image (infer.tta), their probabilities averaged; `logits` is then the log of the mean.
    """
    model.eval()
    logits, targets, orders, keys = [], [], [], []
    for batch in itertools.islice(loader, limit):  # limit None: every batch; else not one more is read
        x = prep.images(batch["image"])
        with acc.autocast():
            out = tta.predict(model, x)
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
        keys = gather_object(keys)
    idx = np.argsort(out["order"], kind="stable")
    out = {k: v[idx] for k, v in out.items()}
    out["key"] = [keys[i] for i in idx]
    return out
