"""Is a checkpoint folder whole, and is it safe to load? Both are answered before loading it.

`progress.json`, written last, lists every other file of its checkpoint with its size and
sha256 (`files`); `verify` compares the folder with that list, so a missing, truncated, altered
or planted file is found without loading anything. `check_loadable` runs every pickle-format
file through the same weights-only unpickler Accelerate uses (tensors, numbers, numpy arrays;
no other global), memory-mapped, so a file that would run code is refused before Accelerate
sees it: Accelerate itself swallows a failed RNG-state load without a word, and loads
`custom_checkpoint_*.pkl` as full pickles (weights-only checking off), which dist_train never
lets it reach unchecked.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from accelerate.utils import load as accelerate_load

from dist_train.errors import UserError
from dist_train.trust.runs import PROGRESS_HINT, read_progress
from dist_train.trust.weights import check_safetensors

PROGRESS_NAME = "progress.json"
FILES_KEY = "files"
PICKLED = (".bin", ".pt", ".pth", ".pkl")  # what Accelerate reads with torch.load
RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: `problem` None means good; `listed` False: an older checkpoint whose
    progress.json has no file list, accepted unverified."""

    path: Path
    problem: str | None = None
    listed: bool = True

    @property
    def good(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        if self.problem:
            return f"{self.path.name}: damaged: {self.problem}"
        if not self.listed:
            return f"{self.path.name}: good, unverified (written before checksums: no file list in {PROGRESS_NAME})"
        return f"{self.path.name}: good"


def digest(path: Path, sync: bool = False) -> dict:
    """{"size", "sha256"} of a file; `sync` also flushes it to disk (it is about to be marked complete)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def files_of(folder: Path) -> list[str]:
    """Every file below `folder` but progress.json, as relative POSIX names, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != PROGRESS_NAME)


def manifest(folder: Path) -> dict[str, dict]:
    """The `files` entry of progress.json: size and sha256 of every file, each fsynced."""
    return {name: digest(folder / name, sync=True) for name in files_of(folder)}


def _read_listing(folder: Path) -> tuple[dict | None, str | None]:
    """(the `files` mapping or None if absent, the problem with progress.json or None)."""
    path = folder / PROGRESS_NAME
    if not path.is_file():
        return None, f"{PROGRESS_NAME} missing (an unfinished write)"
    try:
        state = read_progress(path)  # every field checked: a resume would use them
    except UserError as e:
        return None, f"{PROGRESS_NAME}: {str(e).removeprefix(f'{path}: ').removesuffix(f': {PROGRESS_HINT}')}"
    files = state.get(FILES_KEY)
    if files is None:
        return None, None
    well_formed = all(not PurePosixPath(n).is_absolute() and ".." not in PurePosixPath(n).parts for n in files)
    return (files, None) if well_formed else (None, f"{PROGRESS_NAME}: malformed file list")


def _file_problem(folder: Path, name: str, want: dict) -> str | None:
    path = folder / name
    if not path.is_file():
        return f"{name} missing"
    size = path.stat().st_size
    if size != want["size"]:
        if size < want["size"]:
            return f"{name} truncated ({size:,} of {want['size']:,} bytes)"
        return f"{name} has {size:,} bytes, {want['size']:,} were written"
    if digest(path)["sha256"] != want["sha256"]:
        return f"{name} altered (sha256 differs from {PROGRESS_NAME})"
    return None


def verify(folder: str | os.PathLike) -> Verdict:
    """Compare a checkpoint folder with the file list in its progress.json; loads nothing."""
    folder = Path(folder)
    files, problem = _read_listing(folder)
    if problem:
        return Verdict(folder, problem)
    if files is None:
        return Verdict(folder, listed=False)
    problems = [p for name, want in files.items() if (p := _file_problem(folder, name, want))]
    problems += [f"unexpected file {name} (not written with this checkpoint)"
                 for name in files_of(folder) if name not in files]
    return Verdict(folder, "; ".join(problems) or None)


def _refusal(name: str, e: Exception) -> str:
    text = " ".join(str(e).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use| Check the documentation|$)", text)
    return f"{name} refused: it would run code when loaded ({(found.group(1) if found else text)[:200]})"


def check_loadable(folder: str | os.PathLike, rank: int) -> str | None:
    """None if every pickle-format file this rank would load passes the weights-only unpickler;
    else the first refusal. Tensors stay memory-mapped, so a large optimizer state costs little."""
    folder = Path(folder)
    for name in files_of(folder):
        if name.endswith(".safetensors"):
            try:
                check_safetensors(folder / name)
            except UserError as e:
                return f"{name} unreadable ({str(e).removeprefix(f'{folder / name}: ')})"
            continue
        rng = RNG_FILE.fullmatch(PurePosixPath(name).name)
        if not name.endswith(PICKLED) or (rng and int(rng.group(1)) != rank):
            continue
        path = folder / name
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols: not ours to print
                warnings.simplefilter("ignore")
                accelerate_load(str(path), map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
        except pickle.UnpicklingError as e:
            return _refusal(name, e)
        except Exception as e:  # a damaged file: not code, but not loadable either
            return f"{name} unreadable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"
    return None
