"""Export a trained model: `python -m dist_train.export --run RUN --format onnx --out model.onnx`.

The model is `RUN/best/` unless `--checkpoint` (as in predict); a `--head multi` model leaves
as its equivalent single classifier. The file's metadata holds the preprocessing it expects
(input size, mean, std, interpolation, crop_pct, class names). The graph takes normalized
NCHW images and returns logits (dist_train/infer/deploy.py). Before the file is written
(atomically), its outputs are checked against PyTorch on real images of the run's shard set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dist_train.errors import ArgParser, UserError, check_writable_file, cli_main  # noqa: E402
from dist_train.infer.deploy import export_trained, load_for_export, run_data  # noqa: E402
from dist_train.model.deploy import FORMATS, require_onnx  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m dist_train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="run folder written by dist_train/run.py (model from RUN/best/)")
    p.add_argument("--checkpoint", type=Path,
                   help="use this model instead: a best/-style folder or RUN/checkpoints/step-*/")
    p.add_argument("--format", choices=FORMATS, required=True, help="onnx (needs the 'export' extra) or torchscript")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (checked with two)")
    p.add_argument("--batch-size", type=int, default=1, help="the graph's fixed batch size without --dynamic-batch "
                                                             "(default 1)")
    p.add_argument("--half", action="store_true", help="float16 weights and input (checked loosely, see README)")
    p.add_argument("--data", help="shard set whose images check the export (default: the run's own, from its "
                                  "config.yaml; random inputs when there is none)")
    p.add_argument("--split", help="split of --data to check on (default: validation when there is one)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive integer")
    check_writable_file(args.out, "--out")
    if args.format == "onnx":
        require_onnx()  # before any work
    loaded = load_for_export(args.run, args.checkpoint)
    data = args.data or run_data(loaded)
    res = export_trained(loaded, args.format, args.out, dynamic_batch=args.dynamic_batch, half=args.half,
                         batch_size=args.batch_size, data=data, split=args.split)
    batch = "dynamic" if res["batch"] == "batch" else res["batch"]
    print(f"wrote {res['out']}: {res['format']}, {res['dtype']}, batch {batch}, model {loaded.source}; "
          f"max abs diff vs PyTorch {res['max_abs_diff']:.3g} (tolerance {res['tolerance']:.3g}) on "
          f"{res['checked_on']}, batch sizes {res['checked_batch_sizes']}", flush=True)
    return res


if __name__ == "__main__":
    main()
