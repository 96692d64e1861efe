"""One trained model over one whole split: the results predict and evaluate write out."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from accelerate import Accelerator

from dist_train.data.device import BatchPrep
from dist_train.data.files import ImageFile, build_file_loader
from dist_train.data.loaders import EvalLoader, build_eval_loader
from dist_train.data.readers import TargetFn
from dist_train.data.transforms import AugmentConfig
from dist_train.errors import UserError
from dist_train.shardset.format import class_names, split_info

from .accel import make_accelerator
from .gather import infer
from .load import Loaded
from .tta import TTA


def default_split(info: dict) -> str:
    """`test` when the shard set has one (the data to predict), else `validation`."""
    splits = info.get("splits", {})
    for name in ("test", "validation"):
        if name in splits:
            return name
    raise UserError(f"shard set has neither a 'test' nor a 'validation' split (has: {', '.join(splits)}); "
                    "pass --split")


def eval_augment(info: dict) -> AugmentConfig:
    """The eval transform for a loaded model (resize to size / crop_pct, center crop): what
    evaluation, prediction and an exported model's metadata all describe."""
    return AugmentConfig(img_size=int(info["input_size"][-1]), crop_pct=float(info["crop_pct"]))


def check_class_order(loaded: Loaded, names: list[str], data: str) -> None:
    """The shard set's classes are the model's: as many, and no class name the two share at another
    index (a folder set sharded with one class folder more, less or renamed numbers its classes
    differently; its labels would be silently wrong). Names that differ at the same index (the
    mask task's age cut) are left alone."""
    if names and len(names) != loaded.info["num_classes"]:
        raise UserError(f"the model predicts {loaded.info['num_classes']} classes, the shard set {data} has "
                        f"{len(names)}")
    model = list(loaded.info.get("label_names") or [])
    for i, name in enumerate(names):
        if name in model and model.index(name) != i:
            raise UserError(f"the shard set {data} numbers its classes differently from the model: {name!r} is "
                            f"class {i} there and {model.index(name)} in the model (model: {', '.join(model)}; "
                            f"set: {', '.join(names)}); expected the same classes in the same order")


def run_inference(loaded: Loaded, data: str, info: dict, split: str, *, batch_size: int, workers: int,
                  tta: TTA, mixed_precision: str | None, target_fn: TargetFn | None = None
                  ) -> tuple[Accelerator, dict]:
    """Gathered results of `infer` over the whole split on every rank, plus `prob`.
    `target_fn`: the training labels (a task's relabelling) instead of the stored classes.

    Refuses a result that is not exactly the split's samples, once each: a file with rows
    missing would be silently wrong.
    """
    s = split_info(info, split)
    check_class_order(loaded, class_names(info), data)
    acc = make_accelerator(mixed_precision)
    loader = build_eval_loader(data, info, split, aug=eval_augment(loaded.info), batch_size=batch_size, workers=workers,
                               world_size=acc.num_processes, rank=acc.process_index,
                               pin_memory=acc.device.type == "cuda", target_fn=target_fn)
    res = _probabilities(loaded, loader, acc, tta, f"split {split!r}")
    n, expected = len(res["key"]), s.num_samples
    if n != expected:
        raise UserError(f"split {split!r} of {data}: {n} of {expected} samples could be read (see the warnings "
                        "above); refusing to write an incomplete result")
    return acc, res


def _probabilities(loaded: Loaded, loader: EvalLoader, acc: Accelerator, tta: TTA, what: str) -> dict:
    """`infer` over the loader on every rank (gathered), plus `prob`; the keys checked unique."""
    res = infer(loaded.model.to(acc.device), loader, acc,
                BatchPrep(acc.device, loaded.info["mean"], loaded.info["std"]), tta=tta)
    n = len(res["key"])
    if len(set(res["key"])) != n:
        raise RuntimeError(f"{what}: gathered keys are not unique ({n - len(set(res['key']))} repeats)")
    res["prob"] = torch.softmax(torch.from_numpy(res["logits"]).double(), dim=1).numpy()
    return res


def run_on_images(loaded: Loaded, images: Sequence[ImageFile], *, batch_size: int, workers: int, tta: TTA,
                  mixed_precision: str | None) -> tuple[Accelerator, dict]:
    """`run_inference` over image files (`data.files`) instead of a split: the same transform,
    TTA and exact-once gather; `key` is each file's name, `order` its index in `images`. Files
    that could not be read are missing from the result (warned and counted by the reader)."""
    acc = make_accelerator(mixed_precision)
    loader = build_file_loader(images, aug=eval_augment(loaded.info), batch_size=batch_size, workers=workers,
                               world_size=acc.num_processes, rank=acc.process_index,
                               pin_memory=acc.device.type == "cuda")
    return acc, _probabilities(loaded, loader, acc, tta, "--images")


def run_models(models: Sequence[Loaded], data: str, info: dict, split: str, **kw) -> tuple[Accelerator, dict]:
    """`run_inference` of each model (a CV folder's fold models) over the same split, the
    probabilities averaged (soft vote); the rows are the split's, in its order, for any models."""
    return soft_vote(models, lambda m: run_inference(m, data, info, split, **kw))


def soft_vote(models: Sequence[Loaded], run: Callable[[Loaded], tuple[Accelerator, dict]]
              ) -> tuple[Accelerator, dict]:
    """`run(model)` for each model, the probabilities averaged over the rows every model gave
    (an image file that failed to read is missing from all of them alike)."""
    names = {tuple(m.info["label_names"]) for m in models}
    if len(names) > 1:
        raise UserError(f"the models predict different classes ({len(names)} different class lists): cannot average")
    acc, res = run(models[0])
    for m in models[1:]:
        _, other = run(m)
        if other["key"] != res["key"]:
            raise RuntimeError("the models' rows differ in order")
        res["prob"] = res["prob"] + other["prob"]
    res["prob"] = res["prob"] / len(models)
    return acc, res
