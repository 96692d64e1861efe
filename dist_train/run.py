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
    result = Trainer(cfg).train()
    if result["is_main"] and not result.get("stopped"):
        scores = (f" val_macro_f1={result['val_macro_f1']:.4f} val_acc={result['val_acc']:.4f}"
                  if "val_macro_f1" in result else "")
        print(f"done: step {result['step']}{scores} run={result['output']}")
    return result


if __name__ == "__main__":
    main()
