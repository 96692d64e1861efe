"""Validation during training: when to evaluate, the metrics, confusion files and `best/`.

The Evaluator owns its timing (`should_evaluate`: every `every` steps and at each epoch end)
and its outputs: val_* metrics through the shared inference package (every validation sample
exactly once over all ranks; `--val-tta` views averaged as in predict), the task's extra
metrics, RUN/confusion.csv/png (the picture to the trackers too), and RUN/best/ (timm format)
whenever val macro F1 improves.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from dist_train.data.device import BatchPrep
from dist_train.infer.gather import infer
from dist_train.infer.metrics import save_confusion, summarize
from dist_train.infer.tta import TTA
from dist_train.model.export import save_for_timm
from dist_train.tasks import Task

from .checkpoint import Progress
from .guard import require_finite
from .trackers import log_confusion


class Evaluator:
    """`loader` None (no validation split): the timing still drives the metrics lines."""

    def __init__(self, loader: Any, *, every: int | None, task: Task, class_names: list[str], out: Path,
                 prep: BatchPrep, export: dict, meta: dict, tta: TTA = TTA(), limit: int | None = None, plots: bool = True) -> None:
        self.loader, self.every, self.task = loader, every, task
        self.class_names, self.out, self.prep = class_names, Path(out), prep
        self.export = export  # save_for_timm's model description: model_name, img_size, crop_pct, mean, std
        self.meta = meta  # recorded beside the metrics in best/metrics.json (the task options)
        self.tta = tta  # --val-tta: the views whose probabilities val_* metrics average
        self.limit = limit
        self.plots = plots  # --plots: confusion.png at each evaluation (and to the trackers)
        # The predictions behind the best evaluation of this process (else its last one), for the
        # end-of-training report: epoch, step, weights, key, target, prob, confusion.
        self.shown: dict | None = None
        self._latest: dict = {}
        self._when = ""  # the evaluation in progress: "epoch E, step S"

    def should_evaluate(self, step: int, end_of_epoch: bool) -> bool:
        return end_of_epoch or bool(self.every and step % self.every == 0)

    def validate(self, model: torch.nn.Module, acc: Accelerator, progress: Progress,
                 ema: torch.nn.Module | None = None, end_of_epoch: bool = False) -> dict:
        """val_* metrics over the whole split ({} without one), and val_*_ema for the EMA weights;
        best/ gets whichever weights scored the better val macro F1 when it beats the best so far;
        without a validation split, at each epoch end, the current weights (the EMA's if kept)."""
        if self.loader is None:
            if end_of_epoch:
                which, weights = ("ema", ema) if ema is not None else ("model", acc.unwrap_model(model))
                progress.best = {"epoch": progress.epoch, "step": progress.step, "weights": which}
                require_finite(acc, weights, self.out / "best")
            if end_of_epoch and acc.is_main_process:
                save_for_timm(weights, self.out / "best", label_names=self.class_names,
                              num_classes=len(self.class_names), **self.export,
                              extra={"epoch": progress.epoch, "step": progress.step, **self.meta, "weights": which,
                                     "validation": None})
            return {}
        self._when = f"epoch {progress.epoch}, step {progress.step}"  # confusion.png's title
        m = self.metrics(model, acc)
        views = {"model": {**self._latest, "weights": "model"}}  # the predictions behind m
        if self.plots:
            log_confusion(acc, self.out / "confusion.png", progress.step)
        candidates = [("model", acc.unwrap_model(model), m["val_macro_f1"])]
        if ema is not None:
            m_ema = self.metrics(ema, acc, write_confusion=False)
            views["ema"] = {**self._latest, "weights": "ema"}
            m.update({f"{k}_ema": v for k, v in m_ema.items() if k != "val_samples"})
            candidates.append(("ema", ema, m_ema["val_macro_f1"]))
        which, weights, score = max(candidates, key=lambda c: c[2])  # the model's on a tie
        where = {"epoch": progress.epoch, "step": progress.step}
        if score > progress.best_f1:  # the same gathered predictions, so the same verdict, on every rank
            require_finite(acc, weights, self.out / "best")
            chosen = m if which == "model" else m_ema
            scores = {k: chosen[k] for k in ("val_macro_f1", "val_acc", "val_loss")}
            if not math.isfinite(scores["val_loss"]):  # progress.json holds finite numbers only
                scores["val_loss"] = None
            progress.best = {**where, "weights": which, **scores}
            self.shown = {**views[which], **where, "best": True}
        elif self.shown is None or not self.shown["best"]:
            self.shown = {**views["model"], **where, "best": False}
        if acc.is_main_process and score > progress.best_f1:
            progress.best_f1 = score
            save_for_timm(weights, self.out / "best", label_names=self.class_names, num_classes=len(self.class_names),
                          **self.export, extra={**m, **self.meta, "weights": which})
        progress.best_f1 = float(acc.reduce(torch.tensor(progress.best_f1, device=acc.device), "max").item())
        return m

    def metrics(self, model: torch.nn.Module, acc: Accelerator, write_confusion: bool = True) -> dict:
        """Loss, accuracy, macro F1, sample count and the task's metrics; confusion files on the
        main process, titled with the evaluation's epoch and step."""
        res = infer(model, self.loader, acc, self.prep, tta=self.tta, limit=self.limit)
        logits, target = torch.from_numpy(res["logits"]), torch.from_numpy(res["target"])
        labeled = target >= 0
        val_loss = F.cross_entropy(logits[labeled], target[labeled]).item() if labeled.any() else float("nan")
        preds = logits.argmax(1).numpy()
        y_pred, y_true = preds[labeled.numpy()], res["target"][labeled.numpy()]
        stats = summarize(y_pred, y_true, len(self.class_names), self.class_names)
        if acc.is_main_process and write_confusion:
            save_confusion(stats["confusion"], self.class_names, self.out / "confusion.csv",
                           self.out / "confusion.png" if self.plots else None,
                           title=f"validation, {self._when}" if self._when else "validation")
        self._latest = {"key": [k for k, ok in zip(res["key"], labeled.tolist()) if ok], "target": y_true,
                        "prob": torch.softmax(logits[labeled].float(), 1).numpy(), "confusion": stats["confusion"],
                        "acc": stats["acc"], "macro_f1": stats["macro_f1"]}
        m = {"val_loss": val_loss, "val_acc": stats["acc"], "val_macro_f1": stats["macro_f1"],
             "val_samples": int(len(preds))}
        m.update({f"val_{k}": v for k, v in self.task.extra_metrics(y_pred, y_true).items()})
        return m
