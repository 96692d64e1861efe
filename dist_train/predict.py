"""Predict: `accelerate launch dist_train/predict.py --run runs/NAME --data SHARDS --out FILE.csv`.

Or straight from image files: `--images PATH...` (files, folders searched recursively, glob
patterns; jpg/jpeg/png/webp) instead of `--data`, read and preprocessed as the shard readers
do, with the same TTA and exact-once gather; rows `path,ans,class` in the order given (a
folder's files sorted), a file that cannot be read or decoded (or is over the size limits)
warned about, counted and listed, and left out.

Also `python -m dist_train.predict ...` (one process). The file is the same for any number of
processes: every sample is inferred exactly once on some rank, the results are gathered and
put back into source order, and only the main process writes (to a temporary name, renamed).

Rows: `key,ans,class`, plus `label` when the samples carry one; a task may write its own
submission format instead (the competition's eval set: `ImageID,ans` in info.csv order).
`--save-probs` also writes `FILE.probs.npz` (ids + per-class probabilities) for soft-vote
ensembles (`python -m dist_train.ensemble`). `--calibration FILE` (from `python -m
dist_train.calibrate`) adds its per-class offsets to the log-probabilities before the argmax;
the saved probabilities are then the renormalised softmax(log p + offset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from accelerate import Accelerator  # noqa: E402

from dist_train.data.files import find_images  # noqa: E402
from dist_train.errors import ArgParser, UserError, check_writable_file, cli_main  # noqa: E402
from dist_train.system import default_workers  # noqa: E402
from dist_train.infer.calibration import apply_offsets, check_classes, load_calibration  # noqa: E402
from dist_train.infer.files import (PATH_COLUMN, Predictions, predictions_for, probs_path,  # noqa: E402
                                    save_probs, write_csv)
from dist_train.infer.load import Loaded, load_model  # noqa: E402
from dist_train.infer.metrics import summarize  # noqa: E402
from dist_train.infer.cv import fold_runs, is_cv  # noqa: E402
from dist_train.infer.run import default_split, run_models, run_on_images, soft_vote  # noqa: E402
from dist_train.infer.tta import SPEC_HELP, TTA, parse_tta  # noqa: E402
from dist_train.shardset.format import REJECTED_NAME, load_info  # noqa: E402
from dist_train.tasks import task_for  # noqa: E402
from dist_train.tasks.base import RowIds  # noqa: E402


def add_model_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    """Flags predict and evaluate share: which model, which data, how to run it."""
    p.add_argument("--run", type=Path, help="run folder written by dist_train/run.py (model from RUN/best/); "
                   "predict: a cross-validation folder (fold-k/ runs) averages every fold model's probabilities")
    p.add_argument("--checkpoint", type=Path,
                   help="use this model instead: a best/-style folder or RUN/checkpoints/step-*/")
    p.add_argument("--data", required=data_required, help="shard set folder or URL (python -m dist_train.shard)")
    add_loader_args(p)


def add_loader_args(p: argparse.ArgumentParser, tta_default: str | None = "none") -> None:
    """How to run the model(s): what predict, evaluate and oof share. `tta_default` None: the
    caller's own default (oof: each fold's --val-tta)."""
    p.add_argument("--batch-size", type=int, default=64, help="batch size per process (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader workers per process (default: the cores per process less one, at most 8)")
    default = tta_default or "each model's own validation TTA (its config's val_tta)"
    p.add_argument("--tta", default=tta_default, metavar="SPEC",
                   help=f"test-time augmentation, the views' probabilities averaged: {SPEC_HELP} (default {default})")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast for inference (default: Accelerate's config)")


def check_loader_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.workers is None:
        args.workers = default_workers()
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 or more")


def parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m dist_train.predict", description=__doc__.split("\n\n")[0])
    add_model_args(p, data_required=False)
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="predict these image files instead of a shard set: files, folders (recursive), glob "
                        "patterns (quote them); jpg/jpeg/png/webp. Rows `path,ans,class`")
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    p.add_argument("--split", help="split to predict (default: test when the shard set has one, else validation)")
    p.add_argument("--save-probs", action="store_true", help="also write FILE.probs.npz (per-class probabilities)")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="calibration.json from python -m dist_train.calibrate: per-class log-probability offsets")
    return p


def check_args(args: argparse.Namespace) -> None:
    check_loader_args(args)
    if (args.data is None) == (args.images is None):
        raise UserError("give the data to predict: --data SHARDS or --images PATH... (one of them)")
    if args.images is not None and args.split is not None:
        raise UserError("--split: only with --data (a shard set's split); --images predicts the files given")
    check_writable_file(args.out, "--out")
    if args.save_probs:
        check_writable_file(probs_path(args.out), "--out")


def load_models(args: argparse.Namespace) -> list[Loaded]:
    """The model, or with `--run CV` every fold's model (soft-voted)."""
    if args.run is not None and args.checkpoint is None and is_cv(args.run):
        instead = (f"predict each fold with --run {args.run}/fold-k --save-probs and combine them with "
                   "python -m dist_train.ensemble")
        return [load_model(r.run) for r in fold_runs(args.run, instead=instead)]
    return [load_model(args.run, args.checkpoint)]


def predict_images(args: argparse.Namespace, models: list[Loaded], tta: TTA
                   ) -> tuple[Accelerator, Predictions | None, str]:
    """--images: (accelerator, rows on the main process, what the summary line adds)."""
    images = find_images(args.images)
    kw = dict(batch_size=args.batch_size, workers=args.workers, tta=tta, mixed_precision=args.mixed_precision)
    acc, res = soft_vote(models, lambda m: run_on_images(m, images, **kw))
    if not acc.is_main_process:
        return acc, None, ""
    read = set(res["order"].tolist())
    bad = [f.name for i, f in enumerate(images) if i not in read]
    if len(bad) == len(images):
        raise UserError(f"--images: none of the {len(images)} images could be read (see the warnings above)")
    rows = RowIds(PATH_COLUMN, list(res["key"]), np.arange(len(res["key"])))
    note = f"{len(images)} images"
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        note += f", {len(bad)} unreadable and left out: {shown}"
    return acc, predictions_for(res, rows, models[0].info["label_names"]), note


def predict_split(args: argparse.Namespace, models: list[Loaded], tta: TTA
                  ) -> tuple[Accelerator, Predictions | None, str]:
    """--data: (accelerator, rows on the main process, what the summary line adds)."""
    info = load_info(args.data)
    split = args.split or default_split(info)
    acc, res = run_models(models, args.data, info, split, batch_size=args.batch_size, workers=args.workers,
                          tta=tta, mixed_precision=args.mixed_precision)
    if not acc.is_main_process:
        return acc, None, ""
    rows = task_for(info).row_ids(res["key"], args.data, info, split)
    note = f"split {split!r}"
    if info.get("rejected"):  # unreadable when sharded: in no split, so in no prediction file either
        note += (f"; {info['rejected']} image(s) of the source were rejected when it was sharded and have no row "
                 f"(see {args.data.rstrip('/')}/{REJECTED_NAME})")
    return acc, predictions_for(res, rows, models[0].info["label_names"]), note


@cli_main
def main(argv: list[str] | None = None) -> Path | None:
    args = parser().parse_args(argv)
    check_args(args)
    tta = parse_tta(args.tta)
    calibration = load_calibration(args.calibration) if args.calibration else None
    models = load_models(args)
    loaded = models[0]
    if calibration:
        check_classes(args.calibration, calibration[0], loaded.info["label_names"], f"model {loaded.source}")
    acc, preds, what = (predict_images if args.images is not None else predict_split)(args, models, tta)
    if preds is None:
        return None
    if calibration:
        preds = apply_offsets(preds, calibration[1])
    write_csv(args.out, preds)
    extra = f", calibrated by {args.calibration}" if calibration else ""
    if args.save_probs:
        save_probs(probs_path(args.out), preds)
        extra = f" + {probs_path(args.out)}{extra}"
    acc_note = ""
    if preds.label is not None:  # a labeled split: the competition's score too (after --calibration, if given)
        s = summarize(preds.ans, preds.label, len(preds.classes), list(preds.classes))
        acc_note = f", accuracy {s['acc']:.4f}, macro F1 {s['macro_f1']:.4f}"
    source = loaded.source if len(models) == 1 else f"{args.run} ({len(models)} fold models averaged)"
    print(f"wrote {args.out}{extra}: {len(preds.ids)} rows, {what}, model {source}, "
          f"{acc.num_processes} process(es){acc_note}", flush=True)
    return Path(args.out)


if __name__ == "__main__":
    main()
