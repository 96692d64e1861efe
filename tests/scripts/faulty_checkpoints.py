"""dist_train/run.py with a fault injected into its checkpoint writes (run by tests/test_checkpoint.py).

FAIL_PART=state|progress, FAIL_RANK, FAIL_AT (the n-th save, from 1): that rank's part of that
save raises ENOSPC -- `state`: Accelerate's save_state, `progress`: the progress.json write
(only the main process writes it). Every rank must stop with exit 1, one error line, no hang.

SLOW_SAVE=SECONDS: instead, the main process sleeps that long after each file Accelerate writes
and after progress.json, so a test can kill the run while a checkpoint is half-written.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the checkout's dist_train

import accelerate.checkpointing  # noqa: E402
from accelerate import Accelerator  # noqa: E402

import dist_train.train.checkpoint as checkpoint  # noqa: E402
from dist_train.run import main  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def failing(real, at: int, path_arg: int):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(args[path_arg]))
        return real(*args, **kwargs)

    return wrapper


def slowed(real, seconds: float):
    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(seconds)
        return out

    return wrapper


if os.environ.get("FAIL_PART") and RANK == int(os.environ["FAIL_RANK"]):
    at = int(os.environ["FAIL_AT"])
    if os.environ["FAIL_PART"] == "state":
        Accelerator.save_state = failing(Accelerator.save_state, at, path_arg=1)
    else:
        checkpoint.atomic_write_json = failing(checkpoint.atomic_write_json, at, path_arg=0)
if os.environ.get("SLOW_SAVE") and RANK == 0:
    seconds = float(os.environ["SLOW_SAVE"])
    accelerate.checkpointing.save = slowed(accelerate.checkpointing.save, seconds)
    checkpoint.atomic_write_json = slowed(checkpoint.atomic_write_json, seconds)

if __name__ == "__main__":
    main(sys.argv[1:])
