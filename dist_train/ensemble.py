"""Combine predictions of several models: `python -m dist_train.ensemble --out FILE.csv A B ...`.

- Probability files (`*.probs.npz` from `predict --save-probs`): soft vote — the per-class
  probabilities are averaged and the argmax is the answer.
- Prediction CSVs: hard vote — the most frequent `ans` per row; a tie goes to the answer of
  the earliest file among the tied ones (so with two files, the first file wins).

All inputs must list the same ids in the same order (the same split predicted by each model);
anything else is refused rather than guessed at. The output has the inputs' format
(`ID,ans` or `key,ans,class[,label]`); `--save-probs` adds the averaged probabilities
after a soft vote; `--calibration FILE` (soft vote) applies per-class offsets from
`python -m dist_train.calibrate` to the averaged probabilities.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ArgParser, UserError, atomic_write_text, check_writable_file, cli_main
from .infer.calibration import apply_offsets, check_classes, load_calibration
from .infer.files import (ID_RE, Predictions, load_oof, load_probs, probs_path, read_folds, save_oof, save_probs,
                          write_csv)


def _same_rows(first: Path, other: Path, a: Sequence[str], b: Sequence[str], what: str) -> None:
    if list(a) == list(b):
        return
    if len(a) != len(b):
        raise UserError(f"{other}: {len(b)} {what}, {first} has {len(a)}: ensemble inputs must predict the same samples")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    raise UserError(f"{other}: row {i + 1} is {b[i]!r}, {first} has {a[i]!r}: ensemble inputs must list the same "
                    f"{what} in the same order")


def _same_labels(paths: Sequence[Path], files: Sequence[Predictions]) -> np.ndarray | None:
    """The labels the labeled inputs share (None if none is labeled); inputs labeled differently
    (OOF files of runs trained with other --age-bins or --relabel) are refused."""
    labeled = [(path, f) for path, f in zip(paths, files) if f.label is not None]
    if not labeled:
        return None
    first, label = labeled[0][0], labeled[0][1].label
    for path, f in labeled[1:]:
        if not np.array_equal(f.label, label):
            i = int(np.flatnonzero(f.label != label)[0])
            raise UserError(f"{path}: row {i + 1} ({f.ids[i]!r}) is labeled {int(f.label[i])}, {first} has "
                            f"{int(label[i])}: ensemble inputs must carry the same labels (OOF files of runs "
                            "trained with other --age-bins or --relabel?)")
    return label


def soft_vote(paths: Sequence[Path]) -> Predictions:
    """Average the probabilities of several probability files."""
    files = [load_probs(p) for p in paths]
    base = files[0]
    for path, f in zip(paths[1:], files[1:]):
        if f.id_column != base.id_column:
            raise UserError(f"{path}: ids are {f.id_column}, {paths[0]} has {base.id_column}")
        _same_rows(paths[0], path, base.classes, f.classes, "classes")
        _same_rows(paths[0], path, base.ids, f.ids, "ids")
    prob = np.mean([f.prob for f in files], axis=0)
    return Predictions(base.id_column, base.ids, prob.argmax(axis=1), base.classes, _same_labels(paths, files), prob)


def save_vote(path: Path, preds: Predictions, inputs: Sequence[Path]) -> None:
    """--save-probs: the averaged probabilities; when every input is an out-of-fold file, as an
    out-of-fold file with the first one's folds, metadata and shard set, so `calibrate` cross-fits
    over whole persons (the folds) and `suspects` reads the ensemble as it reads one CV's OOF."""
    if preds.label is not None and all(read_folds(x) is not None for x in inputs):
        try:
            oof = load_oof(inputs[0])
        except UserError:  # folds without the rest of an OOF file: a plain probability file
            oof = None
        if oof is not None:
            save_oof(path, preds, oof.fold, oof.meta, oof.data, oof.split)
            return
    save_probs(path, preds)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not rows or len(rows[0]) < 2 or not ID_RE.match(rows[0][0]) or rows[0][1] != "ans":
        raise UserError(f"{path}: expected a prediction CSV with columns ID,ans or key,ans,...")
    header, body = rows[0], rows[1:]
    bad = next((i for i, r in enumerate(body) if len(r) != len(header) or not r[1].strip().lstrip("-").isdigit()), None)
    if bad is not None:
        raise UserError(f"{path}: line {bad + 2}: expected {len(header)} cells with an integer ans")
    return header, body


def hard_vote(paths: Sequence[Path]) -> tuple[list[str], list[list[str]]]:
    """Majority of `ans` per row; returns (header, rows) in the inputs' format."""
    tables = [_read_csv(p) for p in paths]
    header, base = tables[0]
    for path, (h, body) in zip(paths[1:], tables[1:]):
        if h != header:
            raise UserError(f"{path}: columns {','.join(h)}, {paths[0]} has {','.join(header)}")
        _same_rows(paths[0], path, [r[0] for r in base], [r[0] for r in body], "ids")
    class_col = header.index("class") if "class" in header else None
    names = {int(r[1]): r[class_col] for _, body in tables for r in body} if class_col is not None else {}
    rows = []
    for i, first in enumerate(base):
        votes = [int(body[i][1]) for _, body in tables]
        counts = Counter(votes)
        top = max(counts.values())
        winner = next(v for v in votes if counts[v] == top)
        row = list(first)
        row[1] = str(winner)
        if class_col is not None:
            row[class_col] = names[winner]
        rows.append(row)
    return header, rows


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(path, buf.getvalue())


def is_probs(path: Path) -> bool:
    return path.name.endswith(".npz")


@cli_main
def main(argv: list[str] | None = None) -> Path:
    p = ArgParser(prog="python -m dist_train.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    p.add_argument("--save-probs", action="store_true", help="soft vote: also write FILE.probs.npz")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="soft vote: calibration.json (python -m dist_train.calibrate) applied to the averaged probabilities")
    p.add_argument("inputs", type=Path, nargs="+", help="probability files (.probs.npz) or prediction CSVs")
    args = p.parse_args(argv)
    check_writable_file(args.out, "--out")
    if args.save_probs:
        check_writable_file(probs_path(args.out), "--out")
    missing = [str(x) for x in args.inputs if not x.is_file()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    kinds = {is_probs(x) for x in args.inputs}
    if len(kinds) > 1:
        raise UserError("mix of probability files and CSVs: give only .probs.npz files (soft vote) or only CSVs "
                        "(hard vote)")
    calibration = load_calibration(args.calibration) if args.calibration else None
    if kinds == {True}:
        preds = soft_vote(args.inputs)
        if calibration:
            check_classes(args.calibration, calibration[0], preds.classes, str(args.inputs[0]))
            preds = apply_offsets(preds, calibration[1])
        write_csv(args.out, preds)
        if args.save_probs:
            save_vote(probs_path(args.out), preds, args.inputs)
        n, how = len(preds.ids), "soft"
    else:
        if args.save_probs or calibration:
            raise UserError(f"{'--save-probs' if args.save_probs else '--calibration'} needs probability files as "
                            "inputs (a hard vote has no probabilities)")
        header, rows = hard_vote(args.inputs)
        _write_rows(args.out, header, rows)
        n, how = len(rows), "hard"
    note = f", calibrated by {args.calibration}" if calibration else ""
    print(f"wrote {args.out}: {n} rows, {how} vote over {len(args.inputs)} files{note}", flush=True)
    return args.out


if __name__ == "__main__":
    main()
