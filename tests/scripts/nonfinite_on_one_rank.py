"""dist_train/run.py whose loss turns non-finite on ONE rank (NAN_RANK) from step NAN_FROM on.

Run under `accelerate launch` by tests/test_robust.py: every rank must skip the same steps (the
decision is all-reduced) and stop together after --max-bad-steps, with one error line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the checkout's dist_train

from dist_train.config import parse_config  # noqa: E402
from dist_train.errors import RunFailed, cli_main  # noqa: E402
from dist_train.train.trainer import Trainer  # noqa: E402

NAN_RANK, NAN_FROM = int(os.environ["NAN_RANK"]), int(os.environ["NAN_FROM"])


class NonFiniteOnOneRank(Trainer):
    def build_criterion(self):
        loss = super().build_criterion()

        def criterion(out, y):
            value = loss(out, y)
            if self.acc.process_index == NAN_RANK and self.progress.step >= NAN_FROM:
                return value * float("nan")
            return value

        return criterion


@cli_main
def main() -> dict:
    trainer = NonFiniteOnOneRank(parse_config(sys.argv[1:]))
    try:
        return trainer.train()
    except RunFailed:  # each rank notes where it stopped itself
        stop = {"rank": trainer.acc.process_index, "step": trainer.progress.step}
        (trainer.out / f"stopped-rank{stop['rank']}.json").write_text(json.dumps(stop))
        raise


if __name__ == "__main__":
    main()
