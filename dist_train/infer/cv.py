"""A cross-validation folder: `CV/fold-k/` run folders, one per fold of a `--folds K` shard set.

What the OOF builder and `predict --run CV` share: finding the fold runs, checking that every
fold is there and finished (a missing or unfinished fold is one line that says how to get it),
and the out-of-fold view each fold model is evaluated on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dist_train.errors import UserError
from dist_train.shardset.format import cv_splits, load_info, split_info
from dist_train.trust.files import stored_address
from dist_train.trust.runs import read_run_config, read_summary

FOLD_RE = re.compile(r"^fold-(\d+)$")


@dataclass(frozen=True)
class FoldRun:
    """One fold's run folder and what its config.yaml says about its data."""

    fold: int
    run: Path
    config: dict  # the run's resolved config (flat keys)
    data: str  # the shard set: --data as typed, else the config's address when it is a plain one

    @property
    def train_split(self) -> str:
        return str(self.config.get("train_split") or "train")


def is_cv(path: Path) -> bool:
    """A folder of fold runs (fold-0/ with a config.yaml) rather than one run."""
    return Path(path).is_dir() and (Path(path) / "fold-0" / "config.yaml").is_file()


def _read_config(run: Path) -> dict:
    return read_run_config(run, required=("data",))


def _finished(run: Path) -> bool:
    path = run / "summary.json"
    return path.is_file() and bool(read_summary(path).get("finished"))


def fold_runs(cv: Path, data: str | None = None, instead: str | None = None) -> list[FoldRun]:
    """Every fold's run, in fold order; refuses a CV folder with a fold missing, unfinished,
    without best/, trained on another fold or shard set than its name and siblings say.

    `data`: the shard set the folds trained on as the user typed it (--data); without it, the
    address fold-0's config.yaml records, used only when it is a plain path or URL
    (`stored_address`, whose refusal says `instead` where the command has no such flag): a
    command read from a file is never run."""
    cv = Path(cv)
    if not cv.is_dir():
        raise UserError(f"{cv}: no such folder (expected a CV folder of fold-k/ runs, see launch/kfold.sh)")
    runs = {int(m.group(1)): cv / m.group(0) for p in cv.iterdir() if (m := FOLD_RE.match(p.name)) and p.is_dir()}
    if not runs:
        raise UserError(f"{cv}: no fold-k/ run folders (run launch/kfold.sh, or dist_train/run.py --fold k "
                        f"--output {cv}/fold-k for each fold)")
    first = _read_config(runs[min(runs)])
    address = data if data is not None else stored_address(first["data"], runs[min(runs)] / "config.yaml",
                                                           instead=instead)
    k = split_info(load_info(address), str(first.get("train_split") or "train")).folds
    if not k:
        raise UserError(f"{runs[min(runs)]}: trained on {first['data']}, which has no folds")
    out = []
    for f in range(k):
        run = runs.get(f)
        hint = f"dist_train/run.py --config {runs[min(runs)] / 'config.yaml'} --fold {f} --output {cv}/fold-{f}"
        if run is None or not (run / "config.yaml").is_file():
            raise UserError(f"{cv}: fold {f} of {k} is missing (train it with fold {min(runs)}'s settings: {hint})")
        cfg = _read_config(run)
        if str(cfg.get("fold")) != str(f) or cfg["data"] != first["data"]:
            raise UserError(f"{run}: trained with --fold {cfg.get('fold')} on {cfg['data']}, expected --fold {f} on "
                            f"{first['data']}")
        if not _finished(run) or not (run / "best" / "model.safetensors").is_file():
            raise UserError(f"{run}: fold {f} is unfinished (no finished summary.json and best/): continue it "
                            f"with dist_train/run.py --config {run / 'config.yaml'} --output {run} --resume auto")
        out.append(FoldRun(f, run, cfg, address))
    extra = sorted(set(runs) - set(range(k)))
    if extra:
        raise UserError(f"{cv}: fold-{extra[0]}/ but the shard set has folds 0..{k - 1}")
    return out


def held_out(run: FoldRun) -> tuple[dict, str]:
    """(info with the fold views, the held-out split's name) of a fold run: the samples its
    model never trained on."""
    info, _, val = cv_splits(load_info(run.data), run.train_split, None, str(run.fold))
    return info, val
