"""The shard writer's output folder: what it may remove there, and checking a finished set.

Never delete what we did not write: the writer removes only the files listed by the shard set
it replaces (its `_info.json`), those listed in the journal of a run that was stopped before it
finished (`_writing.json`: written before the old `_info.json` goes, removed once the new one
is written), and its own temporary names. A folder that holds other files and no shard set is
refused unless `--overwrite`, which writes the set beside those files and keeps them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from dist_train.errors import UserError, atomic_write_json
from dist_train.trust.media import tar_counts

from .duplicates import CONTACT_NAME, DUPLICATES_NAME, FINGERPRINTS_NAME
from .format import INFO_NAME, REJECTED_NAME, SHARD_RE, file_sha256, read_local_info, split_info, summary, write_info

JOURNAL_NAME = "_writing.json"
# Temporary names of the writer's files (errors.temp_file: ".NAME.XXXX.tmp").
# The spool (`spool.SPOOL_NAME`) holds a run's encoded images until its shards are written.
TMP_RE = re.compile(r"^\.([A-Za-z0-9_]+-\d{6}\.tar|_info\.json|_rejected\.jsonl|_writing\.json|_fingerprints\.npz"
                    r"|_duplicates\.csv|_duplicates\.png|_spool)\..+\.tmp$")
# The set's files beside its shards (the rejected list, the duplicate check's files).
SIDE_NAMES = frozenset({REJECTED_NAME, FINGERPRINTS_NAME, DUPLICATES_NAME, CONTACT_NAME})


sha256_file = file_sha256


def _ours(names: Iterable[object]) -> set[str]:
    """The names among `names` the writer could have written (shards, the rejected list)."""
    return {n for n in names if isinstance(n, str) and (SHARD_RE.fullmatch(n) or n in SIDE_NAMES)}


def owned_files(out: Path) -> set[str]:
    """Names in OUT this writer wrote: the set's (`_info.json`'s shards and the rejected list)
    and those journaled by a run that did not finish."""
    names: set[str] = set()
    info = read_local_info(out)
    if isinstance(info, dict) and isinstance(info.get("sha256"), dict):
        names |= _ours(info["sha256"]) | SIDE_NAMES
    journal = out / JOURNAL_NAME
    if journal.is_file():
        try:
            files = json.loads(journal.read_text(encoding="utf-8")).get("files", [])
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{journal}: unreadable ({e}); remove it to write a shard set in {out}") from None
        names |= _ours(files if isinstance(files, list) else [])
    return names


def check_out_dir(out: Path) -> None:
    """Refuse an OUT holding other files and no shard set (nor a stopped run's journal); the writer
    asks only without --overwrite."""
    if not out.is_dir() or (out / INFO_NAME).is_file() or (out / JOURNAL_NAME).is_file():
        return
    others = sorted(p.name for p in out.iterdir() if not TMP_RE.match(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(f"--out {out}: holds {shown} and no shard set ({INFO_NAME}); expected a new or empty "
                        "folder or a shard set to replace: pass --overwrite to write the set beside these files "
                        "(they are kept)")


def begin_replacing(out: Path, new_names: Iterable[str], keep: str | None = None) -> set[str]:
    """Journal what this run may remove or create, then drop the old `_info.json` and the
    writer's temporary files but `keep` (this run's spool); returns the names of the files the run
    may remove."""
    owned = owned_files(out)
    atomic_write_json(out / JOURNAL_NAME, {"files": sorted(owned | set(new_names) | SIDE_NAMES)})
    (out / INFO_NAME).unlink(missing_ok=True)
    for p in out.iterdir():
        if TMP_RE.match(p.name) and p.name != keep:  # left by a killed run
            p.unlink()
    return owned


def publish(out: Path, info: dict) -> None:
    """Write the new `_info.json` (last and atomically: it marks the set complete); then the journal
    has done its work."""
    write_info(out, info)
    (out / JOURNAL_NAME).unlink(missing_ok=True)


def inspect(out: str | Path) -> tuple[dict, bool]:
    """Print the summary of the shard set in OUT, verify every shard's sha256 and count its samples
    against `_info.json` (every tar is read whole). Returns (info, all present and matching)."""
    out = Path(out)
    info = read_local_info(out)
    if info is None:
        raise UserError(f"{out}: no {INFO_NAME}; not a finished shard set (run python -m dist_train.shard --src ... --out {out})")
    print(summary(out, info))
    checksums = info.get("sha256") if isinstance(info.get("sha256"), dict) else {}
    lengths = {f: n for name in info["splits"] for s in [split_info(info, name)]
               for f, n in zip(s.filenames, s.shard_lengths)}
    total, ok = 0, bool(checksums) and bool(lengths)
    for filename in sorted(set(lengths) | set(checksums)):
        path = out / filename
        if not path.is_file():
            print(f"  MISSING  {filename}")
            ok = False
            continue
        total += path.stat().st_size
        problem = _shard_problem(path, checksums.get(filename), lengths.get(filename))
        if problem:
            print(f"  {problem}")
            ok = False
    if not checksums:
        print(f"  {total / 1e6:.1f} MB; no checksums in {INFO_NAME}: nothing verified")
    else:
        print(f"  {total / 1e6:.1f} MB, {len(lengths)} shards; " + ("checksums ok, sample counts ok" if ok else
                                                                      "checksums and sample counts FAILED"))
    return info, ok


def _shard_problem(path: Path, expected_sha: str | None, expected_len: int | None) -> str | None:
    """What is wrong with one shard file, or None: checksum, listing, tar structure, sample count."""
    name = path.name
    if expected_sha is None:
        return f"NO CHECKSUM {name}: listed in a split but not in {INFO_NAME}'s sha256"
    if sha256_file(path) != expected_sha:
        return f"MISMATCH {name}: sha256 differs from {INFO_NAME}"
    if expected_len is None:
        return f"UNLISTED {name}: has a checksum but is in no split"
    try:
        n, problems = tar_counts(path)
    except UserError as e:
        return f"NOT A TAR {name}: {e}"
    if problems:
        return f"BAD      {name}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    if n != expected_len:
        return f"COUNT    {name}: {n} samples, {INFO_NAME} says {expected_len}"
    return None
