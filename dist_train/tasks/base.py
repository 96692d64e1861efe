"""The Task interface: what a shard set's labels mean, and everything that follows from it.

The generic packages (shard set, data, trainer, inference) know images, class indices and
sample keys. A Task adds the rest, as timm's `task/` and Lightning's LightningModule do: which
raw layouts it shards, which training labels it derives from a sample's metadata, which model
heads it offers, its loss, the metrics beyond accuracy and F1, and the rows of a prediction
file. `Task` itself is plain classification (the `folder` layout); a task for a particular
dataset subclasses it and overrides what differs.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from dist_train.errors import UserError
from dist_train.shardset.format import label_counts
from dist_train.shardset.sources import Layout

from .losses import class_weights_from_counts, make_loss

if TYPE_CHECKING:
    from dist_train.config import TaskSection

TargetFn = Callable[[dict, "int | None"], int]  # (sample json metadata, stored class) -> training class
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, targets) -> loss


@dataclass(frozen=True)
class RowIds:
    """How a prediction file names and orders its rows.

    column: the id column's header ("key": the sample keys, with class names and labels beside
    them; any other name: a submission file of `column,ans` only). ids: one per row.
    order: the inference results' indices in row order.
    """

    column: str
    ids: list[str]
    order: np.ndarray


@dataclass(frozen=True)
class SuspectTable:
    """A task's own table of label-noise suspects, written beside the per-sample suspects.csv as
    `<out>.<name>.csv` (e.g. corrections for groups of samples, in the format its training reads back)."""

    name: str
    header: list[str]
    rows: list[list]  # most suspect first
    summary: str  # one line for the console
    units: int = 0  # how many groups (e.g. persons) the rows were chosen from: the cap's base; 0: no cap


class Task:
    """Plain N-class classification: labels as stored, one linear head, ce / focal / soft-F1."""

    name = "classify"
    layouts: tuple[Layout, ...] = ()  # raw layouts this task adds to the shard writer
    heads: tuple[str, ...] = ("single",)
    # TaskSection fields beyond the generic ones that this task understands (see `check`)
    options: frozenset[str] = frozenset()
    description = "any labeled image set"

    def claims(self, info: dict) -> bool:
        """Whether this task handles the shard set described by `info` (`_info.json`)."""
        return True

    # ------------------------------------------------------------------ shard writer
    def add_shard_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags of `python -m dist_train.shard` for this task's layouts."""

    def shard_options(self, args: argparse.Namespace) -> dict:
        """The layout options (recorded in `_info.json`) from those flags."""
        return {}

    # ------------------------------------------------------------------ training
    def check(self, cfg: "TaskSection", info: dict) -> None:
        """Refuse a task-specific option (a TaskSection field marked `task_option`) this task does
        not take, with one line naming it; `head` must be one of this task's heads."""
        where = f"task {self.name}, {info.get('layout')} layout, {len(info.get('classes') or [])} classes"
        if cfg.head not in self.heads:
            raise UserError(f"--head {cfg.head}: expected {' or '.join(self.heads)} for this shard set ({where})")
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name == "head" or not f.metadata.get("task_option") or value == f.default or f.name in self.options:
                continue
            raise UserError(f"--{f.name.replace('_', '-')} {value}: not available for this shard set ({where})")

    def target_fn(self, cfg: "TaskSection", info: dict) -> TargetFn | None:
        """Training labels recomputed from each sample's metadata at load time; None: as stored."""
        return None

    def describe_targets(self, cfg: "TaskSection", data: str, info: dict, split: str) -> str | None:
        """A line for the start of training saying how `target_fn` changes the stored labels of
        `split` (e.g. how many a relabel file changed); None when it changes nothing to report."""
        return None

    def training_info(self, cfg: "TaskSection", data: str, info: dict, split: str) -> dict:
        """`info` with `split`'s class counts those of the training labels, which --class-weights
        auto and --sampler weigh: _info.json's as they are unless `target_fn` recomputes labels."""
        return info

    def create_model(self, name: str, num_classes: int, head: str = "single", **kwargs: Any) -> torch.nn.Module:
        """The model for `head` (`model.build.create_model` options in kwargs)."""
        if head not in self.heads:
            raise UserError(f"--head {head!r}: task {self.name} offers {', '.join(self.heads)}")
        from dist_train.model.build import create_model  # timm (~2 s) only where a model is made: not in `shard`

        return create_model(name, num_classes, **kwargs)

    def criterion(self, cfg: "TaskSection", info: dict, split: str, num_classes: int,
                  device: torch.device) -> Criterion:
        """Loss for (model output, targets): (N,) classes, or (N, C) probabilities from Mixup/CutMix
        (smoothed there already), for every --loss and --class-weights."""
        counts = self.class_counts(cfg, info, split, num_classes)
        weight = None if counts is None else class_weights_from_counts(counts, num_classes).to(device)
        return make_loss(cfg.loss, num_classes, weight, cfg.smoothing)

    def class_counts(self, cfg: "TaskSection", info: dict, split: str, num_classes: int) -> list[int] | None:
        """Training samples per class for --class-weights auto (None without it), from _info.json."""
        if cfg.class_weights != "auto":
            return None
        counts = label_counts(info, split)
        if not counts:
            raise UserError(f"--class-weights auto: _info.json has no label_counts for split '{split}'")
        out = [0] * num_classes
        for k, v in counts.items():
            if not 0 <= int(k) < num_classes:
                raise UserError(f"--class-weights auto: _info.json counts class {k} of split '{split}', "
                                f"expected 0..{num_classes - 1}")
            out[int(k)] = int(v)
        return out

    # ------------------------------------------------------------------ evaluation and prediction
    def extra_metrics(self, preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Metrics beyond accuracy and macro F1 (logged with a `val_` prefix in training)."""
        return {}

    def row_ids(self, keys: Sequence[str], data: str, info: dict, split: str) -> RowIds:
        """Rows of a prediction file: by default one per sample key, in the split's source order."""
        return RowIds("key", list(keys), np.arange(len(keys)))

    def suspects(self, keys: Sequence[str], metas: Sequence[dict], prob: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str]) -> list[SuspectTable]:
        """Label-noise suspects beyond single samples, from out-of-fold probabilities (rows x
        classes) and the given labels; plain classification has none (per-sample ranking only)."""
        return []
