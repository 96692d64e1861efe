"""Out-of-fold predictions of a cross-validation folder: `python -m dist_train.oof CV`.

Each fold's model (`CV/fold-k/best`) predicts the fold it never trained on; together they
cover every labeled sample of the training split exactly once. Writes `CV/oof.csv`
(`key,ans,class,label,prob`), `CV/oof.probs.npz` (probabilities, labels, folds, metadata: for
`calibrate`, `suspects`, `ensemble`) and `CV/oof.json` (accuracy and macro F1, overall and per
fold, each fold's also printed). Labels are the training labels (the fold runs' `--relabel` /
`--age-bins` applied). TTA: each fold model's own `--val-tta` (what its validation scores were
measured with) unless `--tta` says otherwise; the line says which.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json  # noqa: E402

import numpy as np  # noqa: E402

from dist_train.config import Config  # noqa: E402
from dist_train.errors import ArgParser, UserError, atomic_write_json, check_writable_file, cli_main  # noqa: E402
from dist_train.infer.cv import FoldRun, fold_runs, held_out  # noqa: E402
from dist_train.infer.files import Predictions, save_oof, write_oof_csv  # noqa: E402
from dist_train.infer.load import load_model  # noqa: E402
from dist_train.infer.metrics import summarize  # noqa: E402
from dist_train.infer.run import run_inference  # noqa: E402
from dist_train.infer.tta import parse_tta  # noqa: E402
from dist_train.predict import add_loader_args, check_loader_args  # noqa: E402
from dist_train.shardset.format import class_names, load_info, read_meta, split_info  # noqa: E402
from dist_train.tasks import task_for  # noqa: E402


def fold_tta(run: FoldRun, given: str | None) -> str:
    """The TTA spec for a fold model: `--tta` when given, else the fold's own --val-tta."""
    return given if given is not None else str(run.config.get("val_tta") or "none")


def _fold_result(run: FoldRun, args) -> tuple[object, dict]:
    """(accelerator, inference results) of one fold model on its held-out fold, training labels."""
    info, split = held_out(run)
    try:
        cfg = Config.from_flat(run.config)
    except (TypeError, UserError) as e:
        raise UserError(f"{run.run / 'config.yaml'}: {e}") from None
    target_fn = task_for(info).target_fn(cfg.task, info)
    tta = parse_tta(fold_tta(run, args.tta), "--tta" if args.tta is not None else f"{run.run}/config.yaml val_tta")
    return run_inference(load_model(run.run), run.data, info, split, batch_size=args.batch_size,
                         workers=args.workers, tta=tta, mixed_precision=args.mixed_precision, target_fn=target_fn)


def _tta_note(runs: list[FoldRun], given: str | None) -> str:
    """Which TTA the OOF used, for the summary and the console."""
    if given is not None:
        return f"{given} (--tta)"
    specs = sorted({fold_tta(r, None) for r in runs})
    if len(specs) == 1:
        return f"{specs[0]} (the folds' --val-tta)"
    return ", ".join(f"fold {r.fold}: {fold_tta(r, None)}" for r in runs) + " (each fold's --val-tta)"


def _print_scores(summary: dict) -> None:
    for f in summary["per_fold"]:
        print(f"  fold {f['fold']}: {f['num_samples']} samples, accuracy {f['acc']:.4f}, macro F1 {f['macro_f1']:.4f}")
    accs = [f["acc"] for f in summary["per_fold"]]
    f1s = [f["macro_f1"] for f in summary["per_fold"]]
    print(f"  OOF ({summary['num_samples']} samples): accuracy {summary['acc']:.4f}, macro F1 {summary['macro_f1']:.4f}"
          f"; over the folds: accuracy {np.mean(accs):.4f} +- {np.std(accs):.4f}, macro F1 {np.mean(f1s):.4f} "
          f"+- {np.std(f1s):.4f}", flush=True)


def _scores(pred: np.ndarray, label: np.ndarray, names: list[str]) -> dict:
    s = summarize(pred, label, len(names), names)
    return {"num_samples": int(len(label)), "acc": s["acc"], "macro_f1": s["macro_f1"]}


@cli_main
def main(argv: list[str] | None = None) -> dict | None:
    p = ArgParser(prog="python -m dist_train.oof", description=__doc__.split("\n\n")[0])
    p.add_argument("cv", type=Path, help="cross-validation folder holding fold-0/ .. fold-(K-1)/ runs")
    p.add_argument("--data", help="shard set the folds were trained on (default: the one fold-0/config.yaml "
                   "records, when it is a local path or an http(s)/s3/gs URL)")
    add_loader_args(p, tta_default=None)
    args = p.parse_args(argv)
    check_loader_args(args)
    if args.tta is not None:
        parse_tta(args.tta)
    for name in ("oof.csv", "oof.probs.npz", "oof.json"):
        check_writable_file(args.cv / name, "CV")
    runs = fold_runs(args.cv, args.data)
    keys, prob, label, fold = [], [], [], []
    acc = None
    for run in runs:
        acc, res = _fold_result(run, args)
        if (res["target"] < 0).any():
            raise UserError(f"{run.run}: its held-out fold has unlabeled samples")
        keys += res["key"]
        prob.append(res["prob"])
        label.append(res["target"])
        fold += [run.fold] * len(res["key"])
    if not acc.is_main_process:
        return None
    info = load_info(runs[0].data)  # read once: it may be remote
    names = class_names(info)
    order = np.argsort(np.array(keys), kind="stable")
    prob, label, fold = np.concatenate(prob)[order], np.concatenate(label)[order], np.array(fold)[order]
    keys = [keys[i] for i in order]
    total = split_info(info, runs[0].train_split).num_samples
    if len(set(keys)) != len(keys) or len(keys) != total:
        raise UserError(f"{args.cv}: the folds' held-out samples are {len(keys)} ({len(set(keys))} distinct), the "
                        f"split has {total}: the fold runs do not partition it")
    meta = read_meta(runs[0].data, info, runs[0].train_split)
    preds = Predictions("key", keys, prob.argmax(axis=1), names, label, prob)
    summary = {"cv": str(args.cv), "data": runs[0].data, "folds": len(runs), "tta": _tta_note(runs, args.tta),
               **_scores(preds.ans, label, names),
               "per_fold": [{"fold": r.fold, **_scores(preds.ans[fold == r.fold], label[fold == r.fold], names)}
                            for r in runs]}
    save_oof(args.cv / "oof.probs.npz", preds, fold, [json.dumps(meta.get(k, {})) for k in keys], runs[0].data,
             runs[0].train_split)
    write_oof_csv(args.cv / "oof.csv", preds)
    atomic_write_json(args.cv / "oof.json", summary)
    print(f"wrote {args.cv}/oof.csv, oof.probs.npz, oof.json: {len(keys)} samples from {len(runs)} folds, "
          f"TTA {summary['tta']}", flush=True)
    _print_scores(summary)
    return summary


if __name__ == "__main__":
    main()
