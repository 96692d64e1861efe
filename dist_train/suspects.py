"""Label-noise suspects from a cross-validation: `python -m dist_train.suspects CV --out CV/suspects.csv`.

CV is the folder holding `oof.probs.npz` (python -m dist_train.oof) or that file itself. Writes
the labeled samples ranked by 1 - p(given label) under the fold model that never trained on
them, with confident learning's issue flag (`suspects.csv`), any task tables beside it (the mask
task: `suspects.relabel.csv`, corrections per person in the `--relabel` format), and with
`--grid` a picture of the top suspects read back from the shard set.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ArgParser, UserError, check_writable_file, cli_main
from .infer.files import OutOfFold, load_oof
from .infer.suspects import COLUMNS, Suspects, find_suspects, sample_rows, table_path, write_table
from .report import draw_suspects, load_thumbnails
from .shardset.format import load_info, split_info
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
    return p


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
    path = oof_file(args.cv)
    out = args.out or path.parent / "suspects.csv"
    check_writable_file(out, "--out")
    if args.grid:
        check_writable_file(args.grid, "--grid")
    oof = load_oof(path)
    data = args.data or stored_address(oof.data, path)
    info = load_info(data)
    s = find_suspects(oof, task_for(info))
    rows = sample_rows(oof, s, args.top)
    write_table(out, COLUMNS, rows)
    print(f"{path}: {len(oof.preds.ids)} labeled samples, {int(s.issue.sum())} flagged by confident learning "
          f"({s.issue.mean():.1%}); wrote the {len(rows)} most suspect to {out}", flush=True)
    for r in rows[:5]:
        print(f"  {r[0]:>3}. {r[1]}: given {r[4]} (p {r[7]}), predicted {r[6]} (p {r[8]})")
    for t in s.tables:
        write_table(table_path(out, t.name), t.header, t.rows)
        print(f"{t.summary}: wrote {table_path(out, t.name)}", flush=True)
    if args.grid:
        found = draw_grid(args.grid, oof, s, data, info, args.top)
        print(f"wrote {args.grid} ({found} images found in {data} / {oof.split})", flush=True)
    return s


if __name__ == "__main__":
    main()
