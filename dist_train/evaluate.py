"""Evaluate a trained run: `python -m dist_train.evaluate --run runs/NAME --data SHARDS [--split validation]`.

Writes into `--out` (default `RUN/eval-SPLIT/`, with `--tta SPEC` `RUN/eval-SPLIT-tta-SPEC/`: each
TTA keeps its own folder, e.g. `eval-validation-tta-hflip+five-crop`). Without `--split`, a run
trained with `--fold k` on this shard set is scored on fold k, the samples it never trained on,
into `RUN/eval-fold-k/`; any other run on the `validation` split.
- `metrics.json`: loss, accuracy, macro F1 and the task's own metrics (the competition's: per-task
  accuracy of mask, gender, age) — always against the stored labels (for the competition the
  true 30/60 age groups, whatever `--age-bins` the model was trained with);
- `per_class.csv`: precision, recall, F1 and support per class (also printed); every class of the
  model, one the split has no sample of (a hold-out set sharded with `--classes-from` without it)
  with support 0 and recall 0 (undefined, scikit-learn's zero_division=0); macro F1 (scikit-learn's)
  averages the classes present in the labels or the predictions, so such a class counts (with F1
  0) only if the model predicts it;
- `confusion.csv` / `confusion.png`;
- `errors.csv`: every misclassified sample, worst first (lowest probability on the true class);
- `report.png`: loss and F1 curves from `RUN/metrics.jsonl`, the confusion matrix and the worst
  mistakes as thumbnails with true and predicted labels.

Runs under `accelerate launch` too (inference is split over the processes; the main process
writes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (dist-train evaluate --processes N, accelerate launch): import
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the package, not sibling modules

import csv  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dist_train.errors import (ArgParser, UserError, atomic_write_json, atomic_write_text,  # noqa: E402
                               check_writable_dir, cli_main)
from dist_train.infer.load import load_model  # noqa: E402
from dist_train.infer.metrics import save_confusion, summarize  # noqa: E402
from dist_train.infer.run import run_inference  # noqa: E402
from dist_train.infer.tta import parse_tta  # noqa: E402
from dist_train.predict import add_model_args, check_loader_args  # noqa: E402
from dist_train.report import draw_report, load_thumbnails, read_history  # noqa: E402
from dist_train.shardset.format import (TABLE_CLASSES, class_names, cv_splits, is_labeled, load_info,  # noqa: E402
                                        split_info)
from dist_train.tasks import task_for  # noqa: E402
from dist_train.trust.runs import read_run_config  # noqa: E402


def per_class_csv(stats: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "name", "precision", "recall", "f1", "support"])
    for r in stats["per_class"]:
        w.writerow([r["class"], r["name"], f"{r['precision']:.6f}", f"{r['recall']:.6f}", f"{r['f1']:.6f}", r["support"]])
    return buf.getvalue()


WORST_CLASSES = 20  # classes the printed table shows past TABLE_CLASSES


def per_class_table(stats: dict) -> str:
    """The per-class table as aligned text, with the overall numbers underneath. A class with no
    sample in the split (support 0) says so: its recall is undefined (0 in the numbers, as
    scikit-learn's zero_division=0), and macro F1 leaves it out unless the model predicts it."""
    rows = stats["per_class"]
    if len(rows) > TABLE_CLASSES:  # the lowest F1 first; per_class.csv has them all
        rows = sorted(rows, key=lambda r: (r["f1"], -r["support"], r["class"]))[:WORST_CLASSES]
    width = max(len("class"), *(len(r["name"]) for r in rows))
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    if len(rows) < len(stats["per_class"]):
        lines[0] += f"   ({len(rows)} of {len(stats['per_class'])} classes: the lowest F1; all in per_class.csv)"
    predicted = np.asarray(stats["confusion"]).sum(axis=0)
    for r in rows:
        line = f"{r['name']:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}  {r['support']:7d}"
        if r["support"] == 0:
            n = int(predicted[r["class"]])
            line += (f"  not in this split: predicted {n} time{'s' * (n != 1)}, F1 0 in macro F1" if n
                     else "  not in this split: left out of macro F1")
        lines.append(line)
    lines.append(f"{'accuracy':<{width}}  {stats['acc']:9.4f}  ({stats['num_samples']} samples)")
    lines.append(f"{'macro F1':<{width}}  {stats['macro_f1']:9.4f}")
    for name, value in stats.get("extra", {}).items():
        lines.append(f"{name.replace('_', ' '):<{width}}  {value:9.4f}")
    return "\n".join(lines)


def mistakes_of(keys: list[str], target: np.ndarray, prob: np.ndarray) -> list[dict]:
    """Misclassified samples, worst (lowest probability on the true class) first."""
    pred = prob.argmax(axis=1)
    wrong = np.flatnonzero(pred != target)
    p_true = prob[np.arange(len(target)), target]
    order = wrong[np.argsort(p_true[wrong], kind="stable")]
    return [{"key": keys[i], "true": int(target[i]), "pred": int(pred[i]), "prob_true": float(p_true[i]),
             "prob_pred": float(prob[i, pred[i]])} for i in order]


def errors_csv(mistakes: list[dict], names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "true", "true_name", "pred", "pred_name", "prob_true", "prob_pred"])
    for m in mistakes:
        w.writerow([m["key"], m["true"], names[m["true"]], m["pred"], names[m["pred"]], f"{m['prob_true']:.6f}",
                    f"{m['prob_pred']:.6f}"])
    return buf.getvalue()


def eval_folder(split: str, tta: str) -> str:
    """`eval-SPLIT`, or `eval-SPLIT-tta-SPEC` with the spec made a file name (',' -> '+', ':' and
    '/' -> '-', spaces dropped): a TTA try never overwrites another's results."""
    if tta.strip() == "none":
        return f"eval-{split}"
    spec = re.sub(r"[^A-Za-z0-9.+_-]", "", tta.replace(",", "+").replace(":", "-").replace("/", "-"))
    return f"eval-{split}-tta-{spec}"


def _same_set(a: str, b: str) -> bool:
    """Two --data addresses name one shard set: equal, or local paths to the same folder."""
    local = not any(x.startswith("pipe:") or "://" in x for x in (a, b))
    return a == b or (local and os.path.realpath(a) == os.path.realpath(b))


def held_out_split(run: Path, data: str, info: dict) -> tuple[dict, str, str] | None:
    """(info with the fold views, the held-out split, its folder name `fold-k`) when `run` was
    trained with `--fold k` on `data`: the samples that model never trained on. None otherwise
    (no config.yaml, no fold or `--fold all`, another shard set, one without folds)."""
    if not (run / "config.yaml").is_file():
        return None
    cfg = read_run_config(run)
    fold, train = str(cfg.get("fold", "")), str(cfg.get("train_split") or "train")  # YAML may say 0 or '0'
    if not fold.isdigit() or not _same_set(str(cfg.get("data") or ""), data):
        return None
    if train not in info.get("splits", {}) or not split_info(info, train).folds:
        return None
    fold_info, _, val = cv_splits(info, train, None, fold)
    return fold_info, val, f"fold-{fold}"


def pick_split(split: str | None, run: Path, data: str, info: dict) -> tuple[dict, str, str]:
    """(info, split, its folder name) to evaluate: --split as given; without it a --fold k run's
    held-out fold, else `validation`, whose absence from a set of folds says what to pass."""
    if split is not None:
        return info, split, split
    fold = held_out_split(run, data, info)
    if fold is not None:
        return fold
    splits = info.get("splits", {})
    if "validation" not in splits:
        folds = [f"{name} has {s['folds']} folds" for name, s in splits.items() if s.get("folds")]
        hint = (f" ({', '.join(folds)}: a run trained with --fold k on this set, the path its config.yaml "
                "records, is scored on fold k)") if folds else ""
        raise UserError(f"{data} has no 'validation' split, only {', '.join(sorted(splits))}{hint}; pass "
                        "--split NAME")
    return info, "validation", "validation"


def parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m dist_train.evaluate", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--split", help="labeled split to evaluate (default: a --fold k run's held-out fold k of the "
                   "shard set it trained on, else validation)")
    p.add_argument("--out", type=Path, help="output folder (default RUN/eval-SPLIT, with --tta RUN/eval-SPLIT-tta-SPEC)")
    p.add_argument("--worst", type=int, default=16, help="mistakes drawn in report.png (default 16)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> dict | None:
    args = parser().parse_args(argv)
    check_loader_args(args)
    tta = parse_tta(args.tta)
    if args.worst < 0:
        raise UserError(f"--worst {args.worst}: expected 0 or more")
    out = check_writable_dir(args.out, "--out") if args.out is not None else None  # before the model loads
    loaded = load_model(args.run, args.checkpoint)
    info = load_info(args.data)
    info, args.split, folder = pick_split(args.split, loaded.run, args.data, info)
    out = out or check_writable_dir(loaded.run / eval_folder(folder, args.tta), "--out")
    split_info(info, args.split)
    if not is_labeled(info, args.split):
        raise UserError(f"split {args.split!r} of {args.data} has no labels: nothing to evaluate against "
                        "(use python -m dist_train.predict for unlabeled data)")
    acc, res = run_inference(loaded, args.data, info, args.split, batch_size=args.batch_size, workers=args.workers,
                             tta=tta, mixed_precision=args.mixed_precision)
    if not acc.is_main_process:
        return None
    target, prob = res["target"], res["prob"]
    if (target < 0).any():
        raise UserError(f"split {args.split!r}: {int((target < 0).sum())} samples have no label")
    names = class_names(info)
    stats = summarize(prob.argmax(axis=1), target, len(names), names)
    stats["extra"] = task_for(info).extra_metrics(prob.argmax(axis=1), target)
    loss = F.cross_entropy(torch.from_numpy(res["logits"]).float(), torch.from_numpy(target)).item()

    out.mkdir(parents=True, exist_ok=True)
    metrics = {"model": str(loaded.source), "data": str(args.data), "split": args.split, "tta": args.tta,
               "num_samples": stats["num_samples"], "loss": loss if math.isfinite(loss) else None,
               "acc": stats["acc"], "macro_f1": stats["macro_f1"], **stats["extra"]}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "per_class.csv", per_class_csv(stats))
    save_confusion(stats["confusion"], names, out / "confusion.csv", out / "confusion.png",
                   title=f"{loaded.source} on {args.split}" + (f", TTA {args.tta}" if args.tta != "none" else ""))
    mistakes = mistakes_of(res["key"], target, prob)
    atomic_write_text(out / "errors.csv", errors_csv(mistakes, names))
    worst = mistakes[: args.worst]
    thumbs = load_thumbnails(args.data, info, args.split, [m["key"] for m in worst])
    for m in worst:
        m["image"] = thumbs.get(m["key"])
    title = (f"{loaded.source} on {args.split} ({stats['num_samples']} samples): accuracy {stats['acc']:.4f}, "
             f"macro F1 {stats['macro_f1']:.4f}")
    draw_report(out / "report.png", history=read_history(loaded.run), confusion=stats["confusion"],
                class_names=names, mistakes=worst, title=title)
    print(per_class_table(stats))
    print(f"wrote {out}: metrics.json, per_class.csv, confusion.csv/png, errors.csv ({len(mistakes)} errors), "
          "report.png", flush=True)
    return metrics


if __name__ == "__main__":
    main()
