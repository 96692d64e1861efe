"""Predict: `accelerate launch dist_train/predict.py --run runs/NAME --data SHARDS --out FILE.csv`.

Also `python -m dist_train.predict ...` (one process). The file is the same for any number of
processes: every sample is inferred exactly once on some rank, the results are gathered and
put back into source order, and only the main process writes (to a temporary name, renamed).

Rows: `ImageID,ans` in info.csv order for the competition's eval set (mask-eval shards) — the
file to submit; otherwise `key,ans,class`, plus `label` when the samples carry one.
`--save-probs` also writes `FILE.probs.npz` (ids + per-class probabilities) for soft-vote
ensembles (`python -m dist_train.ensemble`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from dist_train.config import Config  # noqa: E402
from dist_train.data import AugmentConfig, build_eval_loader, load_info, split_info  # noqa: E402
from dist_train.engine import infer, make_accelerator  # noqa: E402
from dist_train.errors import ArgParser, UserError, atomic_write_bytes, atomic_write_text, cli_main  # noqa: E402
from dist_train.model import create_model, data_config, load_trained  # noqa: E402
from dist_train.report import read_meta  # noqa: E402
from dist_train.unfreeze import strip_wrappers  # noqa: E402

EVAL_LAYOUT = "mask-eval"
ID_COLUMNS = ("ImageID", "key")


# ----------------------------------------------------------------------------- the model
@dataclass
class Loaded:
    """A trained model ready for inference and what preprocessing it needs."""

    model: torch.nn.Module
    info: dict  # label_names, num_classes, input_size, mean, std, crop_pct, head (as model.load_trained)
    run: Path  # the run folder (metrics.jsonl, config.yaml)
    source: Path  # the folder the weights came from


def load_checkpoint(ckpt: Path, run: Path) -> tuple[torch.nn.Module, dict]:
    """A resumable Accelerate checkpoint (`RUN/checkpoints/step-*/model.safetensors`), rebuilt
    from the run's `config.yaml` and `run.json` (model name, image size, head, classes)."""
    cfg_file, run_file = run / "config.yaml", run / "run.json"
    if not cfg_file.is_file() or not run_file.is_file():
        raise UserError(f"--checkpoint {ckpt}: rebuilding the model needs {cfg_file} and {run_file} "
                        "(pass --run RUN for the run folder that wrote it)")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        meta = json.loads(run_file.read_text())
        name, num_classes, classes = cfg["model"], int(meta["num_classes"]), list(meta["classes"])
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"{run}: unreadable config.yaml / run.json ({type(e).__name__}: {e})") from None
    head = meta.get("head", cfg.get("head", "single"))
    model = create_model(name, num_classes, img_size=cfg.get("img_size"), head=head)
    try:
        state = {strip_wrappers(k): v for k, v in safetensors.torch.load_file(str(ckpt / "model.safetensors")).items()}
        model.load_state_dict(state, strict=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{ckpt / 'model.safetensors'}: does not fit {name} ({head} head, {num_classes} classes) "
                        f"from {cfg_file}: {type(e).__name__}: {first}") from None
    dcfg = data_config(model)
    img = int(cfg.get("img_size") or dcfg["input_size"][-1])
    info = {
        "architecture": name,
        "num_classes": num_classes,
        "label_names": classes,
        "input_size": (3, img, img),
        "mean": tuple(dcfg["mean"]),
        "std": tuple(dcfg["std"]),
        "crop_pct": float(cfg.get("crop_pct") or dcfg["crop_pct"]),
        "head": head,
        "metrics": {},
    }
    return model.eval(), info


def load_model(run: str | Path | None, checkpoint: str | Path | None = None) -> Loaded:
    """`RUN/best/` by default; `checkpoint` may be a best/-style folder (config.json +
    model.safetensors) or an Accelerate checkpoint folder holding model.safetensors."""
    run = Path(run) if run is not None else None
    if run is not None and not run.is_dir():
        raise UserError(f"--run {run}: no such folder (expected a run folder written by dist_train/run.py)")
    if checkpoint is None:
        if run is None:
            raise UserError("--run RUN or --checkpoint PATH is required")
        best = run / "best"
        if not (best / "config.json").is_file() or not (best / "model.safetensors").is_file():
            raise UserError(f"--run {run}: no trained model in {best} (it is written at the first evaluation); "
                            f"pass --checkpoint {run}/checkpoints/step-... to use a checkpoint")
        model, info = load_trained(best)
        return Loaded(model, info, run, best)
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"--checkpoint {ckpt}: no such folder")
    if (ckpt / "config.json").is_file():
        model, info = load_trained(ckpt)
        return Loaded(model, info, run or ckpt.parent, ckpt)
    if not (ckpt / "model.safetensors").is_file():
        raise UserError(f"--checkpoint {ckpt}: expected a best/-style folder (config.json + model.safetensors) "
                        "or a checkpoint folder holding model.safetensors")
    run = run or ckpt.parent.parent
    model, info = load_checkpoint(ckpt, run)
    return Loaded(model, info, run, ckpt)


# ----------------------------------------------------------------------------- inference
def default_split(info: dict) -> str:
    """`test` when the shard set has one (the data to predict), else `validation`."""
    splits = info.get("splits", {})
    for name in ("test", "validation"):
        if name in splits:
            return name
    raise UserError(f"shard set has neither a 'test' nor a 'validation' split (has: {', '.join(splits)}); "
                    "pass --split")


def run_inference(loaded: Loaded, data: str, info: dict, split: str, *, batch_size: int, workers: int,
                  tta: bool, mixed_precision: str | None) -> tuple[Accelerator, dict]:
    """Gathered results of `engine.infer` over the whole split on every rank, plus `prob`.

    Refuses a result that is not exactly the split's samples, once each: a file with rows
    missing would be silently wrong.
    """
    s = split_info(info, split)
    n_classes = len(info.get("classes") or [])
    if n_classes and n_classes != loaded.info["num_classes"]:
        raise UserError(f"the model predicts {loaded.info['num_classes']} classes, the shard set {data} has "
                        f"{n_classes}")
    # Config supplies only the precision; no tracker is started, so nothing is written to the run.
    acc = make_accelerator(Config(output=str(loaded.run), mixed_precision=mixed_precision))
    model = loaded.model.to(acc.device)
    aug = AugmentConfig(img_size=int(loaded.info["input_size"][-1]), crop_pct=float(loaded.info["crop_pct"]))
    loader = build_eval_loader(data, info, split, aug=aug, batch_size=batch_size, workers=workers,
                               world_size=acc.num_processes, rank=acc.process_index,
                               pin_memory=acc.device.type == "cuda")
    res = infer(model, loader, acc, tuple(loaded.info["mean"]), tuple(loaded.info["std"]), tta=tta)
    n, expected = len(res["key"]), int(s["num_samples"])
    if n != expected:
        raise UserError(f"split {split!r} of {data}: {n} of {expected} samples could be read (see the warnings "
                        "above); refusing to write an incomplete result")
    if len(set(res["key"])) != n:
        raise RuntimeError(f"split {split!r}: gathered keys are not unique ({n - len(set(res['key']))} repeats)")
    res["prob"] = torch.softmax(torch.from_numpy(res["logits"]).double(), dim=1).numpy()
    return acc, res


# ----------------------------------------------------------------------------- prediction files
@dataclass
class Predictions:
    """What a prediction file holds: ids (ImageID or key), answers, and optionally probabilities."""

    id_column: str
    ids: list[str]
    ans: np.ndarray  # int class per row
    classes: list[str]
    label: np.ndarray | None = None  # true class per row, when known
    prob: np.ndarray | None = None  # (rows, classes)


def predictions_for(res: dict, data: str, info: dict, split: str, classes: Sequence[str]) -> Predictions:
    """Rows in source order: mask-eval by info.csv index with its ImageID, else by key."""
    keys, prob = list(res["key"]), res["prob"]
    ans = prob.argmax(axis=1)
    if info.get("layout") == EVAL_LAYOUT:
        meta = read_meta(data, info, split)
        try:
            index = np.array([int(meta[k]["index"]) for k in keys])
            ids = [str(meta[k]["image_id"]) for k in keys]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{data} split {split!r}: sample metadata lacks image_id/index ({e!r}); "
                            "reshard the eval set with python -m dist_train.shard") from None
        if len(set(index.tolist())) != len(index):
            raise UserError(f"{data} split {split!r}: info.csv indices repeat in the sample metadata")
        o = np.argsort(index, kind="stable")
        return Predictions("ImageID", [ids[i] for i in o], ans[o], list(classes), None, prob[o])
    target = res["target"]
    label = target if len(target) and (target >= 0).all() else None
    return Predictions("key", keys, ans, list(classes), label, prob)


def write_csv(path: str | Path, p: Predictions) -> None:
    """`ImageID,ans` or `key,ans,class[,label]`, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if p.id_column == "ImageID":
        w.writerow(["ImageID", "ans"])
        w.writerows(zip(p.ids, (int(a) for a in p.ans)))
    else:
        w.writerow(["key", "ans", "class"] + (["label"] if p.label is not None else []))
        for i, (k, a) in enumerate(zip(p.ids, p.ans)):
            w.writerow([k, int(a), p.classes[int(a)]] + ([int(p.label[i])] if p.label is not None else []))
    atomic_write_text(path, buf.getvalue())


def probs_path(csv_path: str | Path) -> Path:
    """sub.csv -> sub.probs.npz beside it."""
    return Path(csv_path).with_suffix(".probs.npz")


def save_probs(path: str | Path, p: Predictions) -> None:
    """npz: id_column, ids, classes, prob (rows x classes, float32)[, label]; loads without pickle."""
    if p.prob is None:
        raise ValueError("save_probs: no probabilities")
    arrays = {"id_column": np.array(p.id_column), "ids": np.array(p.ids, dtype=str),
              "classes": np.array(p.classes, dtype=str), "prob": p.prob.astype(np.float32)}
    if p.label is not None:
        arrays["label"] = np.asarray(p.label, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_probs(path: str | Path) -> Predictions:
    try:
        with np.load(path, allow_pickle=False) as z:
            prob = z["prob"].astype(np.float64)
            p = Predictions(str(z["id_column"]), z["ids"].tolist(), prob.argmax(axis=1), z["classes"].tolist(),
                            z["label"] if "label" in z else None, prob)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a probability file written by --save-probs ({type(e).__name__}: {e})") from None
    if p.id_column not in ID_COLUMNS or prob.shape != (len(p.ids), len(p.classes)):
        raise UserError(f"{path}: inconsistent probability file ({len(p.ids)} ids, {len(p.classes)} classes, "
                        f"prob {prob.shape})")
    return p


# ----------------------------------------------------------------------------- command line
def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags predict and evaluate share: which model, which data, how to run it."""
    p.add_argument("--run", type=Path, help="run folder written by dist_train/run.py (model from RUN/best/)")
    p.add_argument("--checkpoint", type=Path,
                   help="use this model instead: a best/-style folder or RUN/checkpoints/step-*/")
    p.add_argument("--data", required=True, help="shard set folder or URL (python -m dist_train.shard)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size per process (default 64)")
    p.add_argument("--workers", type=int, default=4, help="data loader workers per process (default 4)")
    p.add_argument("--tta", choices=("none", "hflip"), default="none",
                   help="test-time augmentation: hflip averages logits with the mirrored image")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast for inference (default: Accelerate's config)")


def check_loader_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 or more")


def parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="dist_train/predict.py", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    p.add_argument("--split", help="split to predict (default: test when the shard set has one, else validation)")
    p.add_argument("--save-probs", action="store_true", help="also write FILE.probs.npz (per-class probabilities)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> Path | None:
    args = parser().parse_args(argv)
    check_loader_args(args)
    loaded = load_model(args.run, args.checkpoint)
    info = load_info(args.data)
    split = args.split or default_split(info)
    acc, res = run_inference(loaded, args.data, info, split, batch_size=args.batch_size, workers=args.workers,
                             tta=args.tta == "hflip", mixed_precision=args.mixed_precision)
    if not acc.is_main_process:
        return None
    preds = predictions_for(res, args.data, info, split, loaded.info["label_names"])
    write_csv(args.out, preds)
    extra = ""
    if args.save_probs:
        save_probs(probs_path(args.out), preds)
        extra = f" + {probs_path(args.out)}"
    acc_note = f", accuracy {float((preds.ans == preds.label).mean()):.4f}" if preds.label is not None else ""
    print(f"wrote {args.out}{extra}: {len(preds.ids)} rows, split {split!r}, model {loaded.source}, "
          f"{acc.num_processes} process(es){acc_note}", flush=True)
    return Path(args.out)


if __name__ == "__main__":
    main()
