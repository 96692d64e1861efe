"""The mask-status competition as a Task: 18 classes = mask (3) x gender (2) x age group (3).

Plugged in through `dist_train.tasks.register`: its raw layouts (`mask`, `mask-eval`) join the
shard writer, `--age-bins` / `--relabel` recompute training labels from each sample's person
metadata, `--head multi` puts three heads on the backbone, evaluation adds per-task accuracy
(mask, gender, age), and predictions for the eval set are the submission file `ImageID,ans` in
info.csv order; label-noise suspects are also listed per person, as a `--relabel` file.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Sequence

import numpy as np
import torch

from dist_train.errors import UserError
from dist_train.shardset.format import read_meta
from dist_train.tasks import register
from dist_train.tasks.base import Criterion, RowIds, SuspectTable, TargetFn, Task
from dist_train.tasks.losses import class_weights_from_counts, make_loss

from . import labels as L
from .layouts import MASK, MASK_EVAL
from .model import HEAD_SIZES, create_multi_head, multi_head_loss, split_counts
from .suspects import person_suspects

SUBMISSION_ID = "ImageID"


def _age_bins_arg(text: str) -> str:
    try:
        L.parse_age_bins(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class MaskTask(Task):
    name = "mask"
    layouts = (MASK, MASK_EVAL)
    heads = ("single", "multi")
    options = frozenset({"head", "age_bins", "relabel"})
    description = "the mask-status competition (layouts mask, mask-eval)"

    def claims(self, info: dict) -> bool:
        return info.get("layout") in (MASK.name, MASK_EVAL.name)

    def add_shard_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--age-bins", default="30,60", type=_age_bins_arg,
                            help="mask layouts: age group cuts of the labels and the split's strata (default 30,60)")

    def shard_options(self, args: argparse.Namespace) -> dict:
        return {"age_bins": args.age_bins}

    def check(self, cfg: Any, info: dict) -> None:
        super().check(cfg, info)
        try:
            L.parse_age_bins(cfg.age_bins)
        except ValueError as e:
            raise UserError(f"--age-bins: {e}") from None
        if cfg.head == "multi" and len(info.get("classes") or []) != L.NUM_CLASSES:
            raise UserError(f"--head multi needs the {L.NUM_CLASSES} mask classes; this shard set has "
                            f"{len(info.get('classes') or [])}")
        if (cfg.relabel or tuple(L.parse_age_bins(cfg.age_bins)) != L.DEFAULT_AGE_BINS) and \
                info.get("layout") != MASK.name:
            raise UserError("--age-bins/--relabel need mask-layout shards (they recompute labels from person metadata)")

    def target_fn(self, cfg: Any, info: dict) -> TargetFn | None:
        bins = L.parse_age_bins(cfg.age_bins)
        if tuple(bins) == L.DEFAULT_AGE_BINS and not cfg.relabel:
            return None
        fixes = L.load_relabel(cfg.relabel) if cfg.relabel else {}
        return functools.partial(L.target_from_meta, bins=bins, fixes=fixes)

    def describe_targets(self, cfg: Any, data: str, info: dict, split: str) -> str | None:
        """--relabel: how many of the split's labels the file changes, per task (one pass over
        the split's shards, the metadata only)."""
        if not cfg.relabel:
            return None
        metas = list(read_meta(data, info, split).values())
        return L.relabel_summary(cfg.relabel, metas, L.load_relabel(cfg.relabel), L.parse_age_bins(cfg.age_bins))

    def training_info(self, cfg: Any, data: str, info: dict, split: str) -> dict:
        """With --age-bins or --relabel the training labels are not _info.json's: their counts, from
        one pass over the split's metadata, replace the split's stored ones (a person aged 58 is in
        the >=58 classes with --age-bins 30,58; --class-weights auto and --sampler weigh those)."""
        fn = self.target_fn(cfg, info)
        if fn is None or split not in info.get("label_counts", {}):
            return info
        counts = [0] * L.NUM_CLASSES
        for meta in read_meta(data, info, split).values():
            counts[fn(meta, None)] += 1
        return {**info, "label_counts": {**info["label_counts"], split: {str(c): n for c, n in enumerate(counts)}}}

    def create_model(self, name: str, num_classes: int, head: str = "single", **kwargs: Any) -> torch.nn.Module:
        if head == "multi":
            return create_multi_head(name, num_classes, **kwargs)
        return super().create_model(name, num_classes, head=head, **kwargs)

    def criterion(self, cfg: Any, info: dict, split: str, num_classes: int, device: torch.device) -> Criterion:
        """`--head multi`: the --loss on each head, its class weights from that task's counts
        (the 18 classes' counts summed over the other two tasks), soft targets marginalised."""
        if cfg.head != "multi":
            return super().criterion(cfg, info, split, num_classes, device)
        counts = self.class_counts(cfg, info, split, num_classes)
        head_counts = split_counts(counts) if counts is not None else (None,) * len(HEAD_SIZES)
        losses = [make_loss(cfg.loss, n, None if c is None else class_weights_from_counts(c, n).to(device),
                            cfg.smoothing) for n, c in zip(HEAD_SIZES, head_counts)]
        return lambda out, y: multi_head_loss(out, y, losses=losses)

    def extra_metrics(self, preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Accuracy of each task's part of the class (labels.decode): mask, gender, age."""
        p, t = np.asarray(preds, dtype=np.int64), np.asarray(targets, dtype=np.int64)
        if not t.size or max(p.max(), t.max()) >= L.NUM_CLASSES:
            return {}
        parts = (lambda c: c // 6, lambda c: (c // 3) % 2, lambda c: c % 3)
        return {f"{task}_acc": float((part(p) == part(t)).mean()) for task, part in zip(("mask", "gender", "age"), parts)}

    def row_ids(self, keys: Sequence[str], data: str, info: dict, split: str) -> RowIds:
        """The eval set: `ImageID` rows in info.csv order (the sample metadata's index)."""
        if info.get("layout") != MASK_EVAL.name:
            return super().row_ids(keys, data, info, split)
        meta = read_meta(data, info, split)
        try:
            index = np.array([int(meta[k]["index"]) for k in keys])
            ids = [str(meta[k]["image_id"]) for k in keys]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{data} split {split!r}: sample metadata lacks image_id/index ({e!r}); "
                            "reshard the eval set with python -m dist_train.shard") from None
        if len(set(index.tolist())) != len(index):
            raise UserError(f"{data} split {split!r}: info.csv indices repeat in the sample metadata")
        order = np.argsort(index, kind="stable")
        return RowIds(SUBMISSION_ID, [ids[i] for i in order], order)

    def suspects(self, keys: Sequence[str], metas: Sequence[dict], prob: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str]) -> list[SuspectTable]:
        """Per person: wrong gender or age, a swapped incorrect_mask/normal pair (suspects.relabel.csv)."""
        if len(classes) != L.NUM_CLASSES:
            return []
        return [person_suspects(metas, prob, labels)]


TASK = register(MaskTask())
