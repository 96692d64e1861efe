"""Shard a raw image set once into WebDataset tars: `python -m dist_train.shard --src SRC --out OUT`.

Also `--inspect OUT` (summary and checksums of an existing set, `--grid PNG` for a contact
sheet). The writer is `dist_train.shardset.writer`; the format is shards/README.md. Layouts and
their options come from the registered tasks (`dist_train.tasks`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from dist_train.errors import ArgParser, UserError, cli_main
from dist_train.shardset.dedup import DEFAULT_THRESHOLD

# The writer's worker processes import this module again as their __main__ (forkserver), so
# the heavy imports (the tasks, torch through webdataset) happen in the functions, not here.


def _parser() -> argparse.ArgumentParser:
    from dist_train import tasks
    from dist_train.shardset.sources import layouts

    p = ArgParser(prog="python -m dist_train.shard",
                description="Shard a raw image set once into WebDataset tars (format: shards/README.md).")
    p.add_argument("--src", type=Path, help="raw image set (mask: train.csv + images/, mask-eval: info.csv + images/, folder: class subfolders)")
    p.add_argument("--out", type=Path, help="output folder (default: shards/<layout>, or shards/<folder name> for the folder layout)")
    p.add_argument("--layout", help=f"one of {', '.join(lay.name for lay in layouts())} (default: detected)")
    p.add_argument("--val-fraction", type=float, help="share of persons (mask) / images per class (folder) in validation (default 0.2, or 0 with --folds; 0: no validation)")
    p.add_argument("--folds", type=int, default=0, metavar="K", help="give every training sample a fold 0..K-1 (grouped by person for mask, stratified like the validation split) for --fold k training and cross-validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the train shard order (default 0)")
    p.add_argument("--resize", type=int, metavar="SIDE", help="shrink the shorter side to SIDE (never enlarge), store JPEG")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality with --resize (default 95)")
    p.add_argument("--samples-per-shard", type=int, help="max images per shard (default: >= 64 shards per split, <= 1000 images each)")
    p.add_argument("--workers", type=int, help="decode/resize processes (default: all cores)")
    p.add_argument("--max-image-pixels", type=int, metavar="N", default=89_478_485,
                   help="reject, without decoding, images whose header declares more pixels (default 89478485, PIL's "
                        "limit; training skips images over max(that, 1024 x --img-size^2): raise it with --resize)")
    p.add_argument("--overwrite", action="store_true", help="rebuild OUT even if it holds a set made from another source or arguments, or an up-to-date one")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable image instead of skipping it")
    p.add_argument("--as-split", metavar="NAME", help="put every image into one split NAME (no train/validation split; labels kept)")
    p.add_argument("--classes-from", metavar="SHARDS", help="folder layout: number the classes as shard set SHARDS "
                   "does (its class names and order; e.g. the training set, for a hold-out set to evaluate on) "
                   "instead of by the sorted folder names; every class folder must be one of them, a class "
                   "without a folder gets 0 images")
    p.add_argument("--inspect", type=Path, metavar="OUT", help="print the summary of an existing shard set and verify its checksums")
    p.add_argument("--grid", type=Path, metavar="PNG", help="with --inspect: draw a contact sheet of a few samples per class")
    p.add_argument("--grid-split", metavar="SPLIT", help="split drawn by --grid (default: train, else the first labeled one)")
    p.add_argument("--dup-threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BITS", help="near duplicates: "
                   f"perceptual hashes differing in at most BITS of 64 (default {DEFAULT_THRESHOLD}; 0: identical hashes); "
                   "exact and near duplicates stay on one side of the split and the folds, _duplicates.csv lists them")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for task in tasks.all_tasks():
        task.add_shard_arguments(p)
    return p


def classes_from(shards: str) -> list[str]:
    """The class names, in order, of the shard set SHARDS (`--classes-from`)."""
    from dist_train.shardset.format import class_names, load_info

    try:
        names = class_names(load_info(shards))
    except UserError as e:
        raise UserError(f"--classes-from {e}") from None
    if not names:
        raise UserError(f"--classes-from {shards}: the shard set has no class names; expected a labeled shard set "
                        "(e.g. the training set the model was trained on)")
    return names


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    from dist_train import tasks
    from dist_train.duplicates import draw_pairs
    from dist_train.shardset.writer import inspect, write_shards

    args = _parser().parse_args(argv)
    if args.inspect is not None:
        if args.src is not None or args.classes_from is not None:
            raise UserError("--inspect OUT reads an existing shard set; it takes no --src or --classes-from")
        info, ok = inspect(args.inspect)
        if args.grid is not None:
            from dist_train.report import contact_sheet  # drawing needs matplotlib; only this flag does

            print(f"contact sheet: {contact_sheet(args.inspect, info, args.grid, split=args.grid_split)}")
        if not ok:
            raise SystemExit(1)
        return
    if args.grid is not None:
        raise UserError("--grid PNG draws an existing shard set: use it with --inspect OUT")
    if args.src is None:
        raise UserError("--src SRC is required (or --inspect OUT)")
    options = {k: v for t in tasks.all_tasks() for k, v in t.shard_options(args).items()}
    if args.classes_from is not None:
        options["classes"] = classes_from(args.classes_from)
    write_shards(
        args.src, args.out, layout=args.layout, seed=args.seed, folds=args.folds,
        val_fraction=args.val_fraction if args.val_fraction is not None else 0.0 if args.folds else 0.2,
        resize=args.resize, quality=args.quality, samples_per_shard=args.samples_per_shard,
        workers=args.workers, overwrite=args.overwrite, strict=args.strict, as_split=args.as_split,
        max_image_pixels=args.max_image_pixels,
        dup_threshold=args.dup_threshold, draw_pairs=draw_pairs,
        options=options, progress=not args.quiet,
    )


if __name__ == "__main__":
    main()
