"""Label-noise suspects from a cross-validation: `python -m dist_train.suspects CV --out CV/suspects.csv`.

CV is the folder holding `oof.probs.npz` (python -m dist_train.oof) or that file itself. Writes
the labeled samples ranked by 1 - p(given label) under the fold model that never trained on
them, with confident learning's issue flag (`suspects.csv`), any task tables beside it (the mask
task: `suspects.relabel.csv`, corrections per person in the `--relabel` format), and with
`--grid` a picture of the top suspects read back from the shard set.

The fold models are judged first: below MIN_GAIN above the majority-class rate (OOF accuracy)
they are refused (`--force` lists anyway, with a warning); at most `--max-fraction` of the
samples are flagged and of the persons (a task's groups) proposed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ArgParser, UserError, check_writable_file, cli_main
from .infer.files import OutOfFold, load_oof
from .infer.suspects import (COLUMNS, MAX_FRACTION, MIN_GAIN, Suspects, find_suspects, judge_models, sample_rows,
                             table_path, write_table)
from .report import draw_suspects, load_thumbnails
from .shardset.duplicates import cross_label_pairs
from .shardset.format import is_url, load_info, split_info
from .tasks import task_for
from .trust.files import stored_address

GRID_MAX = 64  # thumbnails in --grid at most (the top of the ranking)


def parser() -> ArgParser:
    p = ArgParser(prog="python -m dist_train.suspects", description=__doc__.split("\n\n")[0])
    p.add_argument("cv", type=Path, help="cross-validation folder holding oof.probs.npz, or an oof.probs.npz")
    p.add_argument("--out", type=Path, help="per-sample CSV to write (default: suspects.csv beside the OOF file)")
    p.add_argument("--top", type=int, default=100, help="rows of the CSV and the grid: the N most suspect "
                   f"samples (default 100; 0: every labeled sample; the grid shows at most {GRID_MAX})")
    p.add_argument("--grid", type=Path, metavar="PNG", help="also draw the top suspects' images with given and "
                   "predicted labels")
    p.add_argument("--data", help="shard set to read the task and images from (default: the one the OOF file records)")
    p.add_argument("--max-fraction", type=float, default=MAX_FRACTION, metavar="F",
                   help=f"flag at most this share of the samples, propose new labels for at most this share of "
                        f"the persons (a task's groups), the most suspect first (default {MAX_FRACTION})")
    p.add_argument("--force", action="store_true",
                   help=f"list suspects even when the fold models are too weak to judge labels (OOF accuracy "
                        f"less than {MIN_GAIN} above always answering the most common label)")
    return p


def check_models(path: Path, oof: OutOfFold, force: bool) -> None:
    """Refuse (or with --force warn) when the models cannot tell wrong labels from their own errors."""
    q = judge_models(oof.preds)
    if q.ok:
        print(f"{path}: {q.line()}: the models can judge the labels", flush=True)
        return
    why = f"the fold models are too weak to judge labels: {q.line()}"
    if not force:
        raise UserError(f"{path}: {why}; train better folds first (or pass --force to list suspects anyway)")
    print(f"WARNING: {path}: {why}. Listing suspects anyway (--force): most of them will be the models' own "
          "errors, not wrong labels; do not train with the relabel file unreviewed", file=sys.stderr, flush=True)


def oof_file(cv: Path) -> Path:
    path = cv / "oof.probs.npz" if cv.is_dir() else cv
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a cross-validation folder with oof.probs.npz "
                        "(python -m dist_train.oof CV) or the path of one")
    return path


def draw_grid(png: Path, oof: OutOfFold, s: Suspects, data: str, info: dict, top: int) -> int:
    """The grid of the top suspects; returns how many images were found in the shard set."""
    split_info(info, oof.split)
    p = oof.preds
    chosen = s.order[:min(top or GRID_MAX, GRID_MAX)]
    thumbs = load_thumbnails(data, info, oof.split, [p.ids[i] for i in chosen])
    pred = p.prob.argmax(axis=1)
    items = [{"key": p.ids[i], "label": p.classes[p.label[i]], "pred": p.classes[pred[i]],
              "p_label": float(p.prob[i, p.label[i]]), "p_pred": float(p.prob[i, pred[i]]),
              "image": thumbs.get(p.ids[i])} for i in chosen]
    draw_suspects(png, items, f"{len(items)} most suspect labels of {data} / {oof.split} "
                              "(out-of-fold: given label, its probability; predicted)")
    return len(thumbs)


@cli_main
def main(argv: list[str] | None = None) -> Suspects:
    args = parser().parse_args(argv)
    if args.top < 0:
        raise UserError(f"--top {args.top}: expected 0 (all) or a positive number of rows")
    if not 0 < args.max_fraction <= 1:
        raise UserError(f"--max-fraction {args.max_fraction}: expected a share in (0, 1]")
    path = oof_file(args.cv)
    out = args.out or path.parent / "suspects.csv"
    check_writable_file(out, "--out")
    if args.grid:
        check_writable_file(args.grid, "--grid")
    oof = load_oof(path)
    data = args.data or stored_address(oof.data, path)
    check_models(path, oof, args.force)
    info = load_info(data)
    s = find_suspects(oof, task_for(info), args.max_fraction)
    rows = sample_rows(oof, s, args.top)
    write_table(out, COLUMNS, rows)
    capped = (f"; {s.flagged} before the cap of {args.max_fraction:g} of the samples (--max-fraction)"
              if s.flagged > s.issue.sum() else "")
    print(f"{path}: {len(oof.preds.ids)} labeled samples, {int(s.issue.sum())} flagged by confident learning "
          f"({s.issue.mean():.1%}{capped}); wrote the {len(rows)} most suspect to {out}", flush=True)
    for r in rows[:5]:
        print(f"  {r[0]:>3}. {r[1]}: given {r[4]} (p {r[7]}), predicted {r[6]} (p {r[8]})")
    if not is_url(data):  # the shard step's duplicates with different labels: one label of each pair is wrong
        pairs = cross_label_pairs(data, set(oof.preds.ids))
        if pairs:
            print(f"{len(pairs)} pair(s) of duplicate images with different labels among these samples "
                  f"({Path(data) / '_duplicates.csv'}, cross_label 1):", flush=True)
            for r in pairs[:5]:
                print(f"  {r['key_a']} [{r['label_a']}] = {r['key_b']} [{r['label_b']}] ({r['kind']}, {r['distance']} bits)")
    for t in s.tables:
        write_table(table_path(out, t.name), t.header, t.rows)
        print(f"{t.summary}: wrote {table_path(out, t.name)}", flush=True)
    if args.grid:
        found = draw_grid(args.grid, oof, s, data, info, args.top)
        print(f"wrote {args.grid} ({found} images found in {data} / {oof.split})", flush=True)
    return s


if __name__ == "__main__":
    main()
