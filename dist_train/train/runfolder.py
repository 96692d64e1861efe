"""The run folder's first files (config.yaml, run.json) and the trackers, started only after
every check passed, and taken back when a tracker does not start: a refused run leaves the
folder as it found it (no new file; config.yaml and run.json of an earlier run as they were)."""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import Accelerator

from dist_train.config import Config, save_config
from dist_train.errors import atomic_write_bytes, atomic_write_json

from .trackers import start_trackers

OWN_FILES = ("config.yaml", "run.json")


def _snapshot(out: Path) -> tuple[set[str] | None, dict[str, bytes]]:
    """(every path under `out`, None if it does not exist; the bytes of the files we rewrite)."""
    if not out.is_dir():
        return None, {}
    paths = {os.path.relpath(os.path.join(root, n), out) for root, dirs, files in os.walk(out) for n in dirs + files}
    return paths, {n: (out / n).read_bytes() for n in OWN_FILES if (out / n).is_file()}


def _take_back(out: Path, before: set[str] | None, kept: dict[str, bytes]) -> None:
    """Remove what appeared under `out` since the snapshot (deepest first; folders only when
    empty), put our rewritten files back, and `out` itself if it was not there."""
    now = ({os.path.relpath(os.path.join(root, n), out) for root, dirs, files in os.walk(out) for n in dirs + files}
           if out.is_dir() else set())
    for rel in sorted(now - (before or set()), key=lambda r: r.count(os.sep), reverse=True):
        path = out / rel
        try:
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError:
            pass  # a folder something else wrote into: left as it is
    for name, data in kept.items():
        atomic_write_bytes(out / name, data)
    if before is None:
        try:
            out.rmdir()
        except OSError:
            pass


def open_run(acc: Accelerator, cfg: Config, classes: list[str]) -> None:
    """Write config.yaml and run.json (main process), then start the trackers on every rank."""
    out = Path(cfg.checkpoint.output)
    before, kept = _snapshot(out) if acc.is_main_process else (None, {})
    try:
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            # the precision Accelerate resolved (its launch config) when no flag said: what ran, as workers
            save_config(cfg.replace(mixed_precision=cfg.runtime.mixed_precision or acc.mixed_precision),
                        out / "config.yaml")
            atomic_write_json(out / "run.json", {"model": cfg.model.model, "num_classes": len(classes),
                                                 "head": cfg.task.head, "classes": classes,
                                                 "img_size": cfg.model.img_size})
        start_trackers(acc, cfg)
    except BaseException:
        if acc.is_main_process:
            _take_back(out, before, kept)
        raise
