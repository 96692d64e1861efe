"""Fit per-class offsets for macro F1: `python -m dist_train.calibrate CV/oof.probs.npz --out CV/calibration.json`.

The input is any probability file with labels: the out-of-fold file of a cross-validation
(its `fold` array is used for cross-fitting) or `predict --save-probs` on a labeled split
(cross-fitted over `--folds` stratified splits). Prints macro F1 before and after, in-sample
(optimistic: fitted and scored on the same samples) and cross-fitted (the estimate to believe).
Apply the result with `predict --calibration FILE` (or `ensemble --calibration FILE`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import ArgParser, UserError, check_writable_file, cli_main
from .infer.calibration import Grid, calibrate, save_calibration
from .infer.files import load_probs, read_folds


def parser() -> ArgParser:
    p = ArgParser(prog="python -m dist_train.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("probs", type=Path, help="probability file with labels (CV/oof.probs.npz, or predict --save-probs)")
    p.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    p.add_argument("--max-offset", type=float, default=Grid.max_offset,
                   help=f"largest |offset| tried, in log-probability (default {Grid.max_offset})")
    p.add_argument("--step", type=float, default=Grid.step, help=f"grid step of the offsets (default {Grid.step})")
    p.add_argument("--passes", type=int, default=Grid.passes,
                   help=f"coordinate-ascent passes over the classes (default {Grid.passes})")
    p.add_argument("--folds", type=int, default=5,
                   help="cross-fitting splits for a file without a fold array (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of those splits (default 0)")
    return p


def _grid(args: argparse.Namespace) -> Grid:
    if not (args.step > 0 and args.max_offset >= args.step) or args.max_offset / args.step > 1000:
        raise UserError(f"--max-offset {args.max_offset} --step {args.step}: expected 0 < step <= max-offset, "
                        "at most 1000 steps each way")
    if args.passes < 1:
        raise UserError(f"--passes {args.passes}: expected a positive integer")
    return Grid(args.max_offset, args.step, args.passes)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    grid = _grid(args)
    check_writable_file(args.out, "--out")
    if not args.probs.is_file():
        raise UserError(f"{args.probs}: no such file; expected a probability file (CV/oof.probs.npz)")
    preds = load_probs(args.probs)
    result = calibrate(preds, read_folds(args.probs), grid, folds=args.folds, seed=args.seed, source=str(args.probs))
    save_calibration(args.out, result)
    ins, cf = result["macro_f1"], result["cross_fitted"]
    print(f"{args.probs}: {result['samples']} samples, {len(result['classes'])} classes", flush=True)
    print(f"macro F1 in-sample:    {ins['before']:.4f} -> {ins['after']:.4f} ({ins['gain']:+.4f}; optimistic)")
    print(f"macro F1 cross-fitted: {cf['before']:.4f} -> {cf['after']:.4f} ({cf['gain']:+.4f}; "
          f"{cf['folds']} folds from {cf['folds_from']})")
    moved = [f"{r['name']} {r['offset']:+.2f}" for r in result["per_class"] if r["offset"]]
    print(f"offsets: {', '.join(moved) if moved else 'none (argmax is already best)'}")
    print(f"wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
