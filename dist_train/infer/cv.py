"""A cross-validation folder: `CV/fold-k/` run folders, one per fold of a `--folds K` shard set.

What the OOF builder and `predict --run CV` share: finding the fold runs, checking that every
fold is there and finished (a missing or unfinished fold is one line that says how to get it),
and the out-of-fold view each fold model is evaluated on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from dist_train.errors import UserError
from dist_train.shardset.format import cv_splits, load_info, split_info

FOLD_RE = re.compile(r"^fold-(\d+)$")


@dataclass(frozen=True)
class FoldRun:
    """One fold's run folder and what its config.yaml says about its data."""

    fold: int
    run: Path
    config: dict  # the run's resolved config (flat keys)

    @property
    def data(self) -> str:
        return str(self.config["data"])

    @property
    def train_split(self) -> str:
        return str(self.config.get("train_split") or "train")


def is_cv(path: Path) -> bool:
    """A folder of fold runs (fold-0/ with a config.yaml) rather than one run."""
    return Path(path).is_dir() and (Path(path) / "fold-0" / "config.yaml").is_file()


def _read_config(run: Path) -> dict:
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{run}/config.yaml: unreadable ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or not cfg.get("data"):
        raise UserError(f"{run}/config.yaml: not a dist_train run config (no data)")
    return cfg


def _finished(run: Path) -> bool:
    try:
        return bool(json.loads((run / "summary.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def fold_runs(cv: Path) -> list[FoldRun]:
    """Every fold's run, in fold order; refuses a CV folder with a fold missing, unfinished,
    without best/, trained on another fold or shard set than its name and siblings say."""
    cv = Path(cv)
    if not cv.is_dir():
        raise UserError(f"{cv}: no such folder (expected a CV folder of fold-k/ runs, see launch/kfold.sh)")
    runs = {int(m.group(1)): cv / m.group(0) for p in cv.iterdir() if (m := FOLD_RE.match(p.name)) and p.is_dir()}
    if not runs:
        raise UserError(f"{cv}: no fold-k/ run folders (run launch/kfold.sh, or dist_train/run.py --fold k "
                        f"--output {cv}/fold-k for each fold)")
    first = _read_config(runs[min(runs)])
    k = split_info(load_info(str(first["data"])), str(first.get("train_split") or "train")).folds
    if not k:
        raise UserError(f"{runs[min(runs)]}: trained on {first['data']}, which has no folds")
    out = []
    for f in range(k):
        run = runs.get(f)
        hint = f"dist_train/run.py --data {first['data']} --fold {f} --output {cv}/fold-{f}"
        if run is None or not (run / "config.yaml").is_file():
            raise UserError(f"{cv}: fold {f} of {k} is missing (train it: {hint})")
        cfg = _read_config(run)
        if str(cfg.get("fold")) != str(f) or cfg["data"] != first["data"]:
            raise UserError(f"{run}: trained with --fold {cfg.get('fold')} on {cfg['data']}, expected --fold {f} on "
                            f"{first['data']}")
        if not _finished(run) or not (run / "best" / "model.safetensors").is_file():
            raise UserError(f"{run}: fold {f} is unfinished (no finished summary.json and best/): continue it "
                            f"with {hint} --resume auto")
        out.append(FoldRun(f, run, cfg))
    extra = sorted(set(runs) - set(range(k)))
    if extra:
        raise UserError(f"{cv}: fold-{extra[0]}/ but the shard set has folds 0..{k - 1}")
    return out


def held_out(run: FoldRun) -> tuple[dict, str]:
    """(info with the fold views, the held-out split's name) of a fold run: the samples its
    model never trained on."""
    info, _, val = cv_splits(load_info(run.data), run.train_split, None, str(run.fold))
    return info, val
