"""Checkpoints: where the run is, and the folders that let it continue after any stop.

`RUN/checkpoints/step-XXXXXXXX/` holds Accelerate's state (model.safetensors, optimizer,
scaler, RNG) and `progress.json`, written last: a folder without it is incomplete and ignored.
progress.json also lists every other file with its size and sha256, so a resume verifies the
folder before loading it and falls back past a damaged one (`integrity`). Each checkpoint is
written to a temporary folder and renamed; the newest `keep` are kept. The Checkpointer decides
itself when to save (`save(..., force=)`): every `every` steps, and whenever the trainer says
the moment must not be lost (epoch end, stop, last step). Every step of a save ends in an
agreement across ranks, so a write that fails on any one rank (a full disk, an I/O error)
stops every rank with one line, instead of leaving the others waiting.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from dist_train.errors import RunFailed, UserError, atomic_write_json, follow_umask, replace_dir
from dist_train.trust.runs import read_progress as trust_read_progress
from dist_train.trust.runs import read_run_json

from .integrity import FILES_KEY, PROGRESS_NAME, Verdict, check_loadable, files_of, manifest, verify

CKPT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # a checkpoint being written
PRUNE_PREFIX = ".prune-"  # an old checkpoint being removed: renamed first, so no half-deleted one looks complete


@dataclass
class Progress:
    """Where the run is; saved as JSON in every checkpoint so a resume continues mid-epoch."""

    epoch: int = 0
    batch: int = 0  # batches of the epoch's current plan already consumed on each rank
    samples: int = 0  # samples of `epoch` delivered, over all ranks (padding aside): drives the LR
    plan: dict | None = None  # the current plan's layout: world, workers, batch, done (data.plan)
    step: int = 0  # optimizer steps taken
    updates: int = 0  # optimizer steps not skipped by the fp16 scaler
    best_f1: float = -1.0
    best: dict | None = None  # the best evaluation: epoch, step, weights, val_macro_f1, val_acc, val_loss
    stale: int = 0  # evaluations since val macro F1 last improved (--patience)
    stage: int = 0
    stage_start: int = 0  # step at which the current stage began (for --unfreeze-warmup)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def read_progress(ckpt: Path) -> Progress:
    """The run's position in a checkpoint, its progress.json checked field by field (`trust.runs`)."""
    state = trust_read_progress(ckpt / PROGRESS_NAME)
    state.pop(FILES_KEY, None)  # the checkpoint's file list, not a position of the run
    p = Progress()
    p.load_state_dict(state)
    return p


def warn(line: str) -> None:
    """One warning line on stderr, on a line of its own even under the progress bar."""
    tqdm.write(f"warning: {line}", file=sys.stderr)


def describe(e: Exception) -> str:
    """An exception in a few words: what failed and on which file when the OS says so."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def attempt(fn: Callable[[], object] | None) -> str | None:
    """Run this rank's part of a step; None if it went well (or it had none), else what failed."""
    try:
        if fn is not None:
            fn()
    except Exception as e:  # safetensors and torch.save report a full disk as their own errors
        return describe(e)
    return None


def _groups_hint(problem: str) -> str:
    """Why an optimizer state may not fit this run's optimizer (torch names only the symptom)."""
    if "parameter group" not in problem:
        return ""
    return ("; the checkpoint's optimizer holds other parameter groups than this run's: it was saved with other "
            "stages or --layer-decay, or by a dist_train before 443eb97 (whose `head` stage held the layers "
            "next to the classifier too); start a new run from its best/ weights (--pretrained-path)")


def keep_hyperparameters(optimizer: Any, fresh: list[dict]) -> str | None:
    """torch's load_state_dict takes each group's hyperparameters from the checkpoint with its
    state: --weight-decay (or betas, momentum...) changed on --resume was ignored silently (the
    LR follows the schedule, which is rebuilt from the flags). The checkpoint's moments stay;
    the optimizer's own hyperparameters (its `defaults`, but the LR) and the --layer-decay scales
    come from this run's groups.
    A checkpoint of another --opt lacks some of them: what is wrong, or None."""
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
    hyper = [k for k in torch_optimizer.defaults if k != "lr"]
    for group, own in zip(optimizer.param_groups, fresh):
        missing = [k for k in hyper if k not in group]
        if missing:
            return (f"the checkpoint's optimizer is not this run's {type(torch_optimizer).__name__} (its settings "
                    f"have no {', '.join(missing[:4])}): resume with the --opt the run was started with (its "
                    "config.yaml records it)")
        group.update({k: own[k] for k in hyper if k in own})
        before, now = group.get("base_lr_scale"), own.get("base_lr_scale")
        if before and now is not None and now != before:  # --layer-decay changed: its scales (an unfreeze ramp kept)
            ramp = group["lr_scale"] / before
            group["lr"] *= now * ramp / group["lr_scale"]
            group["base_lr_scale"], group["lr_scale"] = now, now * ramp
    return None


def _ema_hint(problem: str, ckpt: Path) -> str:
    """Accelerate counts the custom state files (the EMA's, --model-ema) against the objects this
    run registered and names neither."""
    if "custom checkpoints" not in problem:
        return ""
    had = (ckpt / "custom_checkpoint_0.pkl").is_file()
    return (f"; the checkpoint was saved {'with' if had else 'without'} --model-ema, this run "
            f"{'has none' if had else 'asks for it'}: resume {'with' if had else 'without'} --model-ema, or start "
            f"a new --output from its weights (--pretrained-path {ckpt})")


def agree(acc: Accelerator | None, problem: str | None) -> str | None:
    """Every rank learns whether any rank failed, and the first failure's words. A collective,
    so it is also the barrier between the steps of a save; costs one all-reduce when all is well."""
    if acc is None or acc.num_processes == 1:
        return problem
    failed = acc.reduce(torch.tensor(int(problem is not None), device=acc.device), reduction="sum")
    if int(failed.item()) == 0:
        return None
    said = gather_object([problem])
    rank = next(r for r, words in enumerate(said) if words is not None)
    return said[rank] if rank == 0 else f"rank {rank}: {said[rank]}"


def _accepted(verdict: Verdict) -> Path:
    """A good checkpoint to resume from; one written before file lists were, with a warning."""
    if not verdict.listed:
        warn(f"{verdict.path} was written before checksums (no file list in {PROGRESS_NAME}): loading it unverified")
    return verdict.path


def free_space(path: Path) -> int:
    """Bytes free on the filesystem that holds `path` (or would hold it)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """`OUT/checkpoints/`: save on its own timing, find (and verify) the checkpoint to resume from."""

    def __init__(self, output: str | Path, keep: int, every: int | None = None) -> None:
        self.root = Path(output) / "checkpoints"
        self.keep = keep
        self.every = every
        self._low_space = False  # warned already; again only after space recovered
        self._swept = False

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.name.startswith(CKPT_PREFIX) and (p / PROGRESS_NAME).is_file())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    # ------------------------------------------------------------------ resuming
    def resume_path(self, resume: str, output: str, acc: Accelerator | None = None) -> Path | None:
        """The checkpoint `--resume` names (auto: the newest good one), verified; none with
        existing checkpoints refuses. With `acc`, the main process verifies and tells the others."""
        if resume == "none":
            if self.complete():
                raise UserError(f"--output {output} already holds checkpoints: pass --resume auto to continue it, "
                                "or choose a new --output")
            return None
        many = acc is not None and acc.num_processes > 1
        choice = self._choose(resume) if acc is None or acc.is_main_process else None
        if many:
            choice = broadcast_object_list([choice], from_process=0)[0]
        path, error = choice
        if error:
            raise UserError(error, all_ranks=many)
        return Path(path) if path else None

    def _choose(self, resume: str) -> tuple[str | None, str | None]:
        """(checkpoint or None, None) or (None, why not): picklable, for the other ranks."""
        try:
            path = self._newest_good() if resume == "auto" else self._named(Path(resume))
        except UserError as e:
            return None, str(e)
        return (str(path) if path else None), None

    def _named(self, path: Path) -> Path:
        if not (path / PROGRESS_NAME).is_file():
            raise UserError(f"--resume {path}: not a complete checkpoint (no {PROGRESS_NAME})")
        verdict = verify(path)
        if not verdict.good:
            raise UserError(f"--resume {path}: damaged checkpoint: {verdict.problem}")
        return _accepted(verdict)

    def _newest_good(self) -> Path | None:
        damaged = 0
        for ckpt in reversed(self.complete()):
            verdict = verify(ckpt)
            if verdict.good:
                return _accepted(verdict)
            damaged += 1
            warn(f"checkpoint {ckpt} is damaged: {verdict.problem}; falling back to the one before it")
        if damaged:
            raise UserError(f"--resume auto: no good checkpoint in {self.root} ({damaged} damaged, none intact; "
                            f"python -m dist_train.checkpoint --verify {self.root.parent} lists them)")
        return None

    def load(self, acc: Accelerator, ckpt: Path, optimizer: Any) -> None:
        """Accelerate's load_state, once every pickle-format file of `ckpt` passed the
        weights-only check; agreed, so a refusal on any rank stops every rank with one line.
        `optimizer` (this run's) keeps its hyperparameters (`keep_hyperparameters`)."""
        problem = check_loadable(ckpt, acc.process_index)
        if problem is None:
            fresh = [dict(g) for g in optimizer.param_groups]
            problem = attempt(lambda: acc.load_state(str(ckpt))) or keep_hyperparameters(optimizer, fresh)
        problem = agree(acc, problem)
        if problem:
            raise UserError(f"--resume {ckpt}: {problem.rstrip(': ')}{_groups_hint(problem)}{_ema_hint(problem, ckpt)}",
                            all_ranks=acc.num_processes > 1)

    # ------------------------------------------------------------------ saving
    def save(self, acc: Accelerator, progress: Progress, force: bool = False) -> Path | None:
        """Save if forced or `every` steps have passed; returns the folder, None if not saved.
        Raises RunFailed on every rank if any part could not be written (the partial folder removed)."""
        if not force and not (self.every and progress.step % self.every == 0):
            return None
        name = f"{CKPT_PREFIX}{progress.step:08d}"
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        main = acc.is_main_process
        self._agreed(acc, name, tmp, "creating its folder", (lambda: self._prepare(tmp)) if main else None)
        self._agreed(acc, name, tmp, "writing the model, optimizer and RNG state",
                     lambda: acc.save_state(str(tmp), safe_serialization=True))
        self._agreed(acc, name, tmp, f"writing {PROGRESS_NAME} and renaming",
                     (lambda: self._finish(tmp, final, progress)) if main else None)
        return final

    def _agreed(self, acc: Accelerator, name: str, tmp: Path, what: str, part: Callable[[], object] | None) -> None:
        """This rank's part of one step of a save, then the agreement; on a failure anywhere the
        main process removes the partial folder and every rank raises the same RunFailed."""
        problem = agree(acc, attempt(part))
        if problem is None:
            return
        free, held = free_space(self.root), ", ".join(files_of(tmp)) if tmp.is_dir() else ""
        if acc.is_main_process:  # every rank is past its part: nobody writes into tmp any more
            shutil.rmtree(tmp, ignore_errors=True)
        last = self.latest()
        raise RunFailed(f"cannot write checkpoint {name} in {self.root} ({what}): {problem}; "
                        + (f"the partial folder held {held} (removed); " if held else "")
                        + f"{mib(free)} free there; last good checkpoint: "
                        + (f"{last} (continue with --resume auto)" if last else "none"),
                        all_ranks=acc.num_processes > 1)

    def _prepare(self, tmp: Path) -> None:
        if not self._swept:  # leftovers of a run killed while writing or pruning: never complete
            for p in self.root.glob(f"{TMP_PREFIX}{CKPT_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
            for p in self.root.glob(f"{PRUNE_PREFIX}{CKPT_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
            self._swept = True
        self._warn_if_low_space()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _warn_if_low_space(self) -> None:
        """Once, when the free space drops below twice the last checkpoint (the new one is
        written before the oldest is removed); again only after it recovered."""
        last = self.latest()
        if last is None:
            return
        size = sum((last / n).stat().st_size for n in [*files_of(last), PROGRESS_NAME])
        free = free_space(self.root)
        if free < 2 * size and not self._low_space:
            warn(f"{mib(free)} free in {self.root}, less than twice the last checkpoint ({last.name}, "
                 f"{mib(size)}): the next checkpoint may not fit")
        self._low_space = free < 2 * size

    def _finish(self, tmp: Path, final: Path, progress: Progress) -> None:
        follow_umask(tmp)  # safetensors writes its files 0600
        atomic_write_json(tmp / PROGRESS_NAME, {**progress.state_dict(), FILES_KEY: manifest(tmp)})  # complete now
        replace_dir(tmp, final)
        fsync_dir(self.root)
        self._prune(final)

    def _prune(self, current: Path) -> None:
        """Keep the newest `keep` up to `current`; newer ones (left by a run resumed from an
        older checkpoint) stay until this run writes over them."""
        older = [c for c in self.complete() if c.name <= current.name]
        for old in older[: -self.keep]:
            gone = old.with_name(PRUNE_PREFIX + old.name)
            try:
                os.replace(old, gone)
            except OSError as e:
                warn(f"could not remove old checkpoint {old}: {describe(e)}")
                continue
            shutil.rmtree(gone, ignore_errors=True)


def check_resume_compatible(ckpt: Path, model: str, classes: list[str], head: str, img_size: int) -> None:
    """Refuse a checkpoint of another model, class list or image size before loading tensors into
    it. Same count, other names (another --data): output i would mean another class, silently."""
    run_json = ckpt.parent.parent / "run.json"  # RUN/checkpoints/step-N -> RUN/run.json
    if not run_json.is_file():
        return
    saved = read_run_json(run_json)
    if saved.get("model") != model or saved.get("num_classes") != len(classes) or saved.get("head") != head:
        raise UserError(
            f"--resume {ckpt}: checkpoint is {saved.get('model')} with {saved.get('num_classes')} classes "
            f"({saved.get('head')} head), this run is {model} with {len(classes)} ({head})"
        )
    start_new = f"or start a new --output (--pretrained-path {ckpt} starts from its weights)"
    if saved["classes"] != list(classes):
        raise UserError(f"--resume {ckpt}: checkpoint's classes are {_listed(saved['classes'])}, --data's are "
                        f"{_listed(classes)}: resume on data with the same classes, {start_new}")
    if saved.get("img_size", img_size) != img_size:
        raise UserError(f"--resume {ckpt}: checkpoint was trained at --img-size {saved['img_size']}, this run asks "
                        f"for {img_size}: pass --img-size {saved['img_size']} to continue it, {start_new}")


def _listed(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" ... ({len(names)} in all)" if len(names) > most else "")
