"""LR range test: `python -m dist_train.lr_find --data SHARDS --model M [run.py flags]`.

Also `accelerate launch dist_train/lr_find.py ...` (the loss averaged over the ranks). Takes
every flag of run.py (and --config) so the test runs the pipeline that training would; those
about checkpoints, evaluation, EMA and trackers have no effect. Writes nothing but `lr_find.png`
in --output (default: the current folder) and prints one JSON line, {"lr": ...}, on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dist_train.config import build_parser, config_from_args  # noqa: E402
from dist_train.data.device import check_gpu_decode_device  # noqa: E402
from dist_train.errors import check_writable_dir, cli_main  # noqa: E402
from dist_train.train.lr_find import PLOT_NAME, RangeTest, Sweep  # noqa: E402

SWEEP_FLAGS = {  # dest: (type, help)
    "start_lr": (float, "the LR of the first step"),
    "end_lr": (float, "the LR of the last step"),
    "num_steps": (int, "optimizer steps of the test, LR growing exponentially from --start-lr to --end-lr"),
    "early_stop_threshold": (float, "stop when the smoothed loss exceeds this multiple of its best"),
}


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    parser.prog = "python -m dist_train.lr_find"
    parser.description = (f"LR range test on the training pipeline: writes --output/{PLOT_NAME} (--output defaults "
                          "to the current folder) and prints the suggested --lr as one JSON line.")
    group = parser.add_argument_group("LR range test")
    for dest, (typ, text) in SWEEP_FLAGS.items():
        default = getattr(Sweep, dest)
        group.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, default=default,
                           help=f"{text} (default: {default})")
    args = vars(parser.parse_args(argv))
    sweep = Sweep(**{dest: args.pop(dest) for dest in SWEEP_FLAGS})
    cfg = config_from_args(args)
    check_gpu_decode_device(cfg.data.gpu_decode)
    if cfg.checkpoint.output is None:
        cfg = cfg.replace(output=".")
    check_writable_dir(cfg.checkpoint.output, "--output")
    result = RangeTest(cfg, sweep).find()
    if result["is_main"]:
        print(json.dumps({k: v for k, v in result.items() if k != "is_main"}), flush=True)
    return result


if __name__ == "__main__":
    main()
