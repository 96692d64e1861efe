"""Train: `accelerate launch dist_train/run.py --data SHARDS --output runs/NAME [flags]`.

Also `dist-train train --processes N ...` (`python -m dist_train train ...`: one error line and
the run's own exit status, dist_train/launcher.py), `torchrun --nproc_per_node N dist_train/run.py
...`, `python -m dist_train.run ...`, and `python dist_train/run.py --debug ...` for one process on
cuda:0 or the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dist_train.config import parse_config  # noqa: E402
from dist_train.data.device import check_gpu_decode_device  # noqa: E402
from dist_train.errors import check_writable_dir, cli_main, same_on_every_rank  # noqa: E402
from dist_train.train.overfit import overfit  # noqa: E402
from dist_train.train.results import done_line  # noqa: E402
from dist_train.train.trainer import Trainer  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> dict:
    with same_on_every_rank():  # under a launcher: the line from the main process only
        cfg = parse_config(argv)
        check_gpu_decode_device(cfg.data.gpu_decode)
        if cfg.checkpoint.output is not None:
            check_writable_dir(cfg.checkpoint.output, "--output")
    if cfg.runtime.overfit_batches:
        return overfit(cfg)
    trainer = Trainer(cfg)
    result = trainer.train()
    if result["is_main"] and not result.get("stopped"):
        print(done_line(result), flush=True)
        end_report(trainer)
    return result


def end_report(trainer: Trainer) -> None:
    """RUN/report.png (main process), or one line saying why there is none: training is done,
    so a picture that cannot be drawn is no reason to fail."""
    shown = trainer.evaluator.shown
    if not trainer.cfg.runtime.plots:
        print("report.png: not drawn (--no-plots)", flush=True)
        return
    if shown is None:
        print("report.png: not drawn (nothing was evaluated: no validation split, or the run ended before an "
              "evaluation)", flush=True)
        return
    try:
        from dist_train.report import draw_training_report

        path = draw_training_report(trainer.out, trainer.cfg.data.data, trainer.info, trainer.val_split, shown,
                                    trainer.class_names)
    except Exception as e:  # matplotlib missing or broken, a shard unreadable now
        print(f"report.png: not drawn ({type(e).__name__}: {str(e).strip()[:200]})", flush=True)
        return
    print(f"report: {path} (curves, confusion matrix and worst mistakes of the {'best' if shown['best'] else 'last'} "
          "evaluation)", flush=True)


if __name__ == "__main__":
    main()
